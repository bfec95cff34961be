"""Heatmap targets and the summed per-module loss, batched on the training device.

Keypoints arrive from the DALI pipeline in continuous crop coordinates (pixel i covers [i, i+1)),
shape (B, J, 3) = x, y, labelled. A heatmap of stride s has pixel centres at (i + 0.5) * s, so a
keypoint sits at heatmap index x / s - 0.5. Sigma is given at stride 4 and scales with the stride,
so all resolutions mark the same physical neighbourhood.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def swap_flipped(keypoints: torch.Tensor, flip: torch.Tensor, flip_perm: list[int]) -> torch.Tensor:
    """After a horizontal flip the left wrist is where the right wrist was: relabel the joints."""
    perm = torch.as_tensor(flip_perm, device=keypoints.device)
    flipped = flip.view(-1, 1, 1) > 0.5
    return torch.where(flipped, keypoints[:, perm], keypoints)


def joint_weights(keypoints: torch.Tensor, input_size: int) -> torch.Tensor:
    """1 for a labelled joint inside the crop, 0 for unlabelled or out-of-crop joints. (B, J)"""
    x, y, labelled = keypoints.unbind(-1)
    inside = (x >= 0) & (x < input_size) & (y >= 0) & (y < input_size)
    return ((labelled > 0) & inside).float()


def gaussian_heatmaps(keypoints: torch.Tensor, weights: torch.Tensor, input_size: int, stride: int,
                      sigma: float) -> torch.Tensor:
    """(B, J, S/stride, S/stride) Gaussians with peak 1 at each weighted joint, separable in x and y."""
    size = input_size // stride
    s = sigma * 4.0 / stride
    grid = torch.arange(size, device=keypoints.device, dtype=torch.float32)
    centre = keypoints[..., :2].float() / stride - 0.5  # (B, J, 2) in heatmap index coordinates
    # the weights go into the small 1-D factor, so the (B, J, H, W) map is written once (~10x faster)
    gx = torch.exp(-((grid - centre[..., 0:1]) ** 2) / (2 * s * s)) * weights[..., None]  # (B, J, W)
    gy = torch.exp(-((grid - centre[..., 1:2]) ** 2) / (2 * s * s))  # (B, J, H)
    return gy[..., :, None] * gx[..., None, :]


def make_targets(keypoints: torch.Tensor, input_size: int, strides: list[int], sigma: float
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Targets for every distinct stride (128, 64, 32 for a 256 input) and the joint weights."""
    weights = joint_weights(keypoints, input_size)
    heatmaps = {s: gaussian_heatmaps(keypoints, weights, input_size, s, sigma) for s in sorted(set(strides))}
    return heatmaps, weights


@dataclass(frozen=True)
class LossEmphasis:
    """Extra weight on the pixels that matter most, in every module's loss (1 + the sum where several apply):
    `fg` on the pixels near a joint (target >= 0.2, within ~1.8 sigma): on small heatmaps a joint's disc is
    ~2 % of the pixels, so plain MSE first learns to predict nothing (the weighted loss map of Wang et al.
    2019, Adaptive Wing Loss, used W = 10). `twin` on the pixels near a joint's left/right twin in that
    joint's map, where the target is 0 (`flip_perm`: the dataset's left/right permutation; joints that are
    their own twin get none): a left knee put on the right knee, a double count, costs more than one put on
    the background."""
    fg: float = 0.0
    twin: float = 0.0
    flip_perm: list[int] | None = None

    def __post_init__(self):
        if self.twin and self.flip_perm is None:
            raise ValueError("LossEmphasis: a twin weight needs flip_perm, the dataset's left/right permutation")


def cascade_loss(predictions: list[torch.Tensor], heatmaps: dict[int, torch.Tensor], weights: torch.Tensor,
                 strides: list[int], emphasis: LossEmphasis = LossEmphasis()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sum of the per-module weighted MSE losses, and each module's loss for logging; `weights` (B, J): the
    joints' (joint_weights), `emphasis`: the extra weight of the pixels near a joint or its twin."""
    w = weights[..., None, None]
    fg, twin, flip_perm = emphasis.fg, emphasis.twin, emphasis.flip_perm

    def pixel_weight(t: torch.Tensor) -> torch.Tensor:
        extra = fg * (t >= 0.2) if fg else 0.0
        if twin:
            paired = torch.tensor([float(p != j) for j, p in enumerate(flip_perm)], device=t.device).view(1, -1, 1, 1)
            extra = extra + twin * paired * (t[:, list(flip_perm)] >= 0.2)
        return w * (1 + extra) if fg or twin else w

    pixel_weights = {s: pixel_weight(t) for s, t in heatmaps.items()}
    per_module = [(((p.float() - heatmaps[s]) ** 2) * pixel_weights[s]).mean() for p, s in zip(predictions, strides)]
    return torch.stack(per_module).sum(), per_module
