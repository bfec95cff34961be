"""`mshg show-batch --config FILE --out batch.png [--shards DIR] [--train|--val]`: look at a batch.

A grid of the crops one batch of the DALI pipeline yields (the full training recipe with --train, the
validation crop with --val), each with
- the skeleton after the flip relabelling (`targets.swap_flipped`): right limbs/joints red, left blue,
  centre (neck, head, ...) yellow; so on a flipped crop the red wrist must still be the person's right;
- the heatmap targets of one resolution (`--stride`, default 4) overlaid in green;
- labelled joints the crop cut off as grey crosses on the border; the tile's caption gives the sample
  id, `F` when flipped, rotation and zoom read back from the matrix, and how many joints are
  unlabelled (`u`) or outside the crop (`o`).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

RIGHT, LEFT, CENTRE, OUTSIDE, HEAT = (230, 40, 40), (40, 110, 255), (250, 220, 0), (170, 170, 170), (0, 255, 90)
COLUMNS = 4  # tiles a row of the grid


def side_of(name: str) -> str:
    n = name.lower()
    if n.startswith(("right", "r-", "r_")):
        return "right"
    if n.startswith(("left", "l-", "l_")):
        return "left"
    return "centre"


def joint_colours(joints: list[str]) -> list[tuple[int, int, int]]:
    return [{"right": RIGHT, "left": LEFT, "centre": CENTRE}[side_of(n)] for n in joints]


class TileStyle(NamedTuple):
    """What every tile of a grid shares: each joint's colour, the limbs drawn, the enlargement."""
    colours: list[tuple[int, int, int]]  # joint_colours
    skeleton: list  # (a, b) joint index pairs
    scale: int  # tile pixels per crop pixel: small crops enlarged, so that the marks stay legible


def draw_tile(image: np.ndarray, keypoints: np.ndarray, weights: np.ndarray, heatmap: np.ndarray, caption: str,
              style: TileStyle) -> np.ndarray:
    """One crop (uint8 HWC) with heatmap, skeleton and marks, enlarged `style.scale` times."""
    colours, scale = style.colours, style.scale
    size = image.shape[0]
    out = cv2.resize(image, (size * scale, size * scale), interpolation=cv2.INTER_NEAREST)
    hm = cv2.resize(np.clip(heatmap.max(0), 0, 1), (size * scale, size * scale), interpolation=cv2.INTER_LINEAR)
    alpha = (0.7 * hm)[..., None]  # heatmaps in green: joints are red / blue / yellow
    out = (out * (1 - alpha) + np.array(HEAT, np.float32) * alpha).astype(np.uint8)
    pts = keypoints[:, :2] * scale  # continuous crop coordinates -> enlarged pixels
    shift = 4
    ip = lambda p: tuple(int(round(v * (1 << shift))) for v in p)  # noqa: E731
    inside = weights > 0
    for a, b in style.skeleton:
        if inside[a] and inside[b]:
            limb = colours[a] if colours[a] == colours[b] else CENTRE  # hips, shoulders, neck: centre
            cv2.line(out, ip(pts[a]), ip(pts[b]), limb, max(1, scale), cv2.LINE_AA, shift)
    for j in np.flatnonzero(inside):
        cv2.circle(out, ip(pts[j]), (scale + 2) << shift, colours[j], -1, cv2.LINE_AA, shift)
        cv2.circle(out, ip(pts[j]), (scale + 2) << shift, (0, 0, 0), 1, cv2.LINE_AA, shift)
    side = size * scale - 1
    for j in np.flatnonzero((keypoints[:, 2] > 0) & ~inside):  # labelled but cut off: a cross on the border
        x, y = np.clip(pts[j], 4, side - 4)
        cv2.drawMarker(out, (int(x), int(y)), OUTSIDE, cv2.MARKER_TILTED_CROSS, 4 * scale + 4, max(1, scale))
    cv2.rectangle(out, (0, 0), (side, 14), (0, 0, 0), -1)
    cv2.putText(out, caption, (3, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def caption_for(sample_id: int, flip: bool, matrix: np.ndarray, keypoints: np.ndarray, weights: np.ndarray) -> str:
    lin = matrix[:, :2].astype(np.float64)
    det = np.linalg.det(lin)
    zoom = math.sqrt(abs(det))
    # R @ diag(+-z, z): the first column is +-z (cos, sin)
    angle = math.degrees(math.atan2(lin[1, 0], lin[0, 0]) if det > 0 else math.atan2(-lin[1, 0], -lin[0, 0]))
    unlabelled = int((keypoints[:, 2] <= 0).sum())
    outside = int(((keypoints[:, 2] > 0) & (weights <= 0)).sum())
    return f"#{sample_id}{' F' if flip else ''} {angle:+.0f}d x{zoom:.2f} u{unlabelled} o{outside}"


def legend(width: int) -> np.ndarray:
    bar = np.full((18, width, 3), 255, np.uint8)
    x = 4
    for text, colour in (("right", RIGHT), ("left", LEFT), ("centre", CENTRE), ("cut off", OUTSIDE)):
        cv2.circle(bar, (x + 5, 9), 5, colour, -1, cv2.LINE_AA)
        cv2.putText(bar, text, (x + 14, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        x += 24 + 8 * len(text)
    return bar


def show_batch(cfg, out: str, shards_dir: str | None = None, train: bool = True, batch: int = 8, stride: int = 4
               ) -> Path:
    """The grid of one batch of `cfg`'s data pipeline (the training recipe, or with train=False the validation
    crop) over `shards_dir` (default: the config's shards), heatmaps at `stride`, written to `out`."""
    # imported when the command runs: `mshg` builds this command's parser for every command (pipeline/cli.py)
    import torch

    from pipeline.data import build_loader, unpack
    from pipeline.inputs import training_inputs
    from shards.format import ShardSet

    shards = ShardSet.open(shards_dir or (cfg.data.train_shards if train else cfg.data.val_shards))
    strides = sorted({s for s, _ in cfg.model.stages})
    if stride not in strides:
        raise ValueError(f"--stride {stride}: the model makes heatmaps at strides {strides}")
    loader = build_loader(shards, cfg.data, batch, train=train, device_id=None)
    b = unpack(next(iter(loader)), torch.device("cpu"))
    _, keypoints, heatmaps, weights = training_inputs(b, shards.flip_permutation(), cfg.data.input_size, strides,
                                                      cfg.data.sigma)
    style = TileStyle(joint_colours(shards.joints), shards.skeleton, max(1, round(256 / cfg.data.input_size)))
    tiles = []
    for i in range(len(b["image"])):
        caption = caption_for(int(b["sample_id"][i]), bool(b["flip"][i] > 0.5), b["matrix"][i].numpy(),
                              keypoints[i].numpy(), weights[i].numpy())
        tiles.append(draw_tile(b["image"][i].numpy(), keypoints[i].numpy(), weights[i].numpy(),
                               heatmaps[stride][i].numpy(), caption, style))
    columns = min(COLUMNS, len(tiles))
    blank = np.zeros_like(tiles[0])
    tiles += [blank] * (-len(tiles) % columns)
    rows = [np.concatenate(tiles[r:r + columns], 1) for r in range(0, len(tiles), columns)]
    grid = np.concatenate(rows, 0)
    grid = np.concatenate([grid, legend(grid.shape[1])], 0)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out_path), grid[..., ::-1]):
        raise ValueError(f"cannot write {out_path}")
    mode = "training recipe" if train else "validation crop"
    print(f"{out_path}: {len(b['image'])} {mode} crops from {shards.root}, heatmaps at stride {stride}")
    return out_path


def add_command(sub, formatter_class=argparse.HelpFormatter) -> None:
    """`mshg show-batch`, registered by pipeline/cli.py (with its help formatter)."""
    p = sub.add_parser("show-batch", help="a grid of augmented crops with skeletons and heatmaps (PNG)",
                       formatter_class=formatter_class)
    p.add_argument("--config", required=True, help="YAML under configs/")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--shards", default=None, help="shard directory (default: the config's train or val shards)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--train", dest="train", action="store_true", default=True, help="the training recipe (default)")
    mode.add_argument("--val", dest="train", action="store_false", help="the validation crop")
    p.add_argument("--batch-size", type=int, default=8, help="crops in the grid (one batch)")
    p.add_argument("--batch", dest="batch_size", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--stride", type=int, default=4, help="heatmap resolution to overlay (2, 4 or 8)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.seed=3")
    p.set_defaults(func=main)


def main(args) -> int:
    """The command line's arguments (`add_command` defines each) -> `show_batch`."""
    from pipeline.config import load_config

    show_batch(load_config(args.config, args.overrides), args.out, args.shards, args.train, args.batch_size, args.stride)
    return 0
