"""MSC-HG: a multi-scale cascade of hourglass modules (and, from the same code, Newell's stacked
hourglass baseline). See docs/model.md for the diagram and the design choices.

    stem:    image (B,3,S,S) -> stem maps at the strides the stages use (S/2, S/4, S/8)
    modules: per stage (stride, n): n hourglass modules chained as in Newell et al. 2016;
             each predicts (B,J,S/stride,S/stride) heatmaps
    fusion:  at a stride change, the last module's features and heatmaps are max-pooled to the
             new stride, passed through 1x1 convs and summed with the stem map of that stride

    model = build_model(cfg.model, num_joints=16, input_size=cfg.data.input_size)
    heatmaps = model(images)  # list, one tensor per module, model.strides[i] is its stride
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import Config, ModelConfig, load_config

# -----------------------------------------------------------------------------
# building blocks


class Residual(nn.Module):
    """Pre-activation bottleneck (BN-ReLU-conv 1x1, 3x3, 1x1 at half width), as in Newell's
    hourglass. The skip is the identity, or a 1x1 conv when the channel count changes. Convs that
    feed a BatchNorm have no bias (the BN's shift replaces it): fewer parameter tensors, which is
    what DeepSpeed's per-tensor gradient hooks cost (docs/cluster.md)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        mid = max(out_ch // 2, 1)
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_ch, 1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv1(F.relu(self.bn1(x)))
        y = self.conv2(F.relu(self.bn2(y)))
        y = self.conv3(F.relu(self.bn3(y)))
        return y + self.skip(x)


class Hourglass(nn.Module):
    """Recursive hourglass: `depth` max-pool halvings down to the smallest side, nearest
    upsampling back, a residual skip branch at every resolution (one residual per step)."""

    def __init__(self, depth: int, channels: int):
        super().__init__()
        self.skip = Residual(channels, channels)
        self.down = Residual(channels, channels)
        self.inner = Hourglass(depth - 1, channels) if depth > 1 else Residual(channels, channels)
        self.up = Residual(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        low = self.down(F.max_pool2d(x, 2))
        low = self.up(self.inner(low))
        return self.skip(x) + F.interpolate(low, scale_factor=2, mode="nearest")


def hourglass_depth(side: int, hg_min_size: int) -> int:
    """Number of halvings from `side` down to (not below) hg_min_size: 5 at 128, 4 at 64, 3 at 32
    for hg_min_size 4. Stops at an odd side, where a halving would not upsample back exactly."""
    depth = 0
    while side % 2 == 0 and side // 2 >= hg_min_size:
        side //= 2
        depth += 1
    return depth


class HourglassModule(nn.Module):
    """One "Modified HourGlass" module: hourglass -> residual -> 1x1 conv-BN-ReLU features ->
    1x1 conv heatmaps. The merge convs that map (features, heatmaps) into the next module's
    input live in PoseNet, since what they add to depends on whether the stride changes."""

    def __init__(self, depth: int, channels: int, num_joints: int):
        super().__init__()
        self.hourglass = Hourglass(depth, channels)
        self.residual = Residual(channels, channels)
        self.features = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.heatmaps = nn.Conv2d(channels, num_joints, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.features(self.residual(self.hourglass(x)))
        return features, self.heatmaps(features)


class Stem(nn.Module):
    """Image -> feature maps at the requested strides (a subset of 2, 4, 8), `widths[stride]` wide.
    The /4 path is Newell's stem (conv7x7/2, residual, max-pool, 2 residuals); /2 branches off
    before the pool, /8 is one more max-pool + residual after /4. `channels` sizes the shared trunk
    (C/4, then C/2 at /2). Only needed branches are built, so every parameter is used (DDP/DeepSpeed
    reject unused parameters)."""

    def __init__(self, channels: int, widths: dict[int, int]):
        super().__init__()
        c4, c2 = max(channels // 4, 1), max(channels // 2, 1)
        self.strides = sorted(widths)
        self.conv = nn.Sequential(nn.Conv2d(3, c4, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(c4), nn.ReLU())
        self.res2 = Residual(c4, c2)  # shared trunk at /2
        self.branch = nn.ModuleDict()
        w4 = widths.get(4, channels)
        if 2 in widths:
            self.branch["2"] = Residual(c2, widths[2])
        if max(self.strides) >= 4:
            self.branch["4"] = nn.Sequential(nn.MaxPool2d(2), Residual(c2, c2), Residual(c2, w4))
        if 8 in widths:
            self.branch["8"] = nn.Sequential(nn.MaxPool2d(2), Residual(w4, widths[8]))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        # string keys ("2", "4", "8"): DeepSpeed ZeRO-3's module hooks read dict outputs by name
        x2 = self.res2(self.conv(x))
        maps = {}
        if "2" in self.branch:
            maps["2"] = self.branch["2"](x2)
        if "4" in self.branch:
            maps["4"] = self.branch["4"](x2)
        if "8" in self.branch:
            maps["8"] = self.branch["8"](maps["4"])
        return maps


# -----------------------------------------------------------------------------
# the network


class PoseNet(nn.Module):
    """A cascade of hourglass modules over one or more strides; returns one heatmap tensor per
    module. stages=[[2,2],[4,4],[8,2]] is MSC-HG, stages=[[4,8]] is Newell's 8-stack. Every module is
    `channels` wide, or `stage_channels[k]` wide in stage k when given (e.g. narrower at stride 2,
    where a module costs 4x the FLOPs of one at stride 4)."""

    def __init__(self, num_joints: int, stages: list[list[int]], channels: int, hg_min_size: int, input_size: int,
                 stage_channels: list[int] | None = None):
        super().__init__()
        self.strides: list[int] = [int(stride) for stride, n in stages for _ in range(int(n))]
        if not self.strides or self.strides != sorted(self.strides) or len({s for s, _ in stages}) != len(stages):
            raise ValueError(f"stages must be [[stride, modules], ...] from fine to coarse; got {stages}")
        if input_size % max(self.strides):
            raise ValueError(f"input_size={input_size} must be a multiple of the largest stride {max(self.strides)}")
        if stage_channels and len(stage_channels) != len(stages):
            raise ValueError(f"stage_channels {stage_channels} must give one width per stage of {stages}")
        widths = {int(s): int(stage_channels[k]) if stage_channels else channels for k, (s, _) in enumerate(stages)}
        self.widths = [widths[s] for s in self.strides]  # of each module
        self.num_joints = num_joints
        self.stem = Stem(channels, widths)
        self.hg_modules = nn.ModuleList()
        for stride, width in zip(self.strides, self.widths):
            depth = hourglass_depth(input_size // stride, hg_min_size)
            if depth < 1:
                raise ValueError(f"input_size={input_size} at stride {stride} leaves no room for an hourglass "
                                 f"down to hg_min_size={hg_min_size}")
            self.hg_modules.append(HourglassModule(depth, width, num_joints))
        # merge convs map module i's (features, heatmaps) into module i+1's input; the last module
        # has none (they would be unused parameters); the two are summed, so one bias serves both
        self.merge_features = nn.ModuleList(nn.Conv2d(a, b, 1) for a, b in zip(self.widths, self.widths[1:]))
        self.merge_heatmaps = nn.ModuleList(nn.Conv2d(num_joints, b, 1, bias=False) for b in self.widths[1:])

    def forward(self, x: Tensor) -> list[Tensor]:
        stem = self.stem(x)
        x = stem[str(self.strides[0])]
        outputs = []
        for i, (stride, module) in enumerate(zip(self.strides, self.hg_modules)):
            features, heatmaps = module(x)
            outputs.append(heatmaps)
            if i == len(self.strides) - 1:
                break
            next_stride = self.strides[i + 1]
            if next_stride == stride:
                # Newell's intermediate supervision merge: residual on the module input
                x = x + self.merge_features[i](features) + self.merge_heatmaps[i](heatmaps)
            else:
                # scale change: max-pool features and heatmaps to the new stride (keeps heatmap
                # peaks at full height), fuse with that stride's stem map
                k = next_stride // stride
                features, heatmaps = F.max_pool2d(features, k), F.max_pool2d(heatmaps, k)
                x = stem[str(next_stride)] + self.merge_features[i](features) + self.merge_heatmaps[i](heatmaps)
        return outputs


def build_model(cfg_model: ModelConfig, num_joints: int, input_size: int) -> PoseNet:
    return PoseNet(num_joints, [list(s) for s in cfg_model.stages], cfg_model.channels,
                   cfg_model.hg_min_size, input_size, list(cfg_model.stage_channels))


# -----------------------------------------------------------------------------
# size and cost


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size: int) -> int:
    """Forward FLOPs for one image, as torch.utils.flop_counter.FlopCounterMode counts them:
    a multiply-add is 2 FLOPs, and only conv/matmul-like ops are counted (BN, ReLU, pooling,
    adds and upsampling are not; they are a few percent)."""
    param = next(model.parameters())
    x = torch.zeros(1, 3, input_size, input_size, dtype=param.dtype, device=param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def modules_per_scale(stages: list[list[int]]) -> str:
    return " + ".join(f"{n}@/{stride}" for stride, n in stages)


def describe_table(cfgs: list[Config], num_joints: int = 16) -> str:
    """A markdown table, one row per config."""
    rows = ["| config | input | channels | modules per scale | params (M) | GFLOPs |",
            "|---|---|---|---|---|---|"]
    for cfg in cfgs:
        model = build_model(cfg.model, num_joints, cfg.data.input_size)
        params = count_parameters(model) / 1e6
        gflops = count_flops(model, cfg.data.input_size) / 1e9
        width = "/".join(map(str, cfg.model.stage_channels)) if cfg.model.stage_channels else cfg.model.channels
        rows.append(f"| {cfg.name} | {cfg.data.input_size} | {width} | "
                    f"{modules_per_scale(cfg.model.stages)} | {params:.2f} | {gflops:.2f} |")
    return "\n".join(rows)


def describe(cfg: Config, num_joints: int = 16) -> str:
    """Config name, modules per scale, params (M), GFLOPs (one image at data.input_size)."""
    return describe_table([cfg], num_joints)


if __name__ == "__main__":
    # python -m pipeline.model configs/lspet_gpu.yaml configs/lspet_gpu_stacked.yaml configs/msc_hg_cpu.yaml
    paths = sys.argv[1:] or ["configs/lspet_gpu.yaml"]
    print(describe_table([load_config(p) for p in paths]))
