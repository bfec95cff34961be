"""Double counting of symmetric limbs, and whether decoding can undo it: each left/right pair's outcome, and
PCK when one joint of a pair whose two peaks coincide is re-decoded from its best peak elsewhere.

    python bench/analyses/pair_redecode.py runs/NAME [--shards runs/shards/lspet-val]

Scores the boxed photographs with the run's eval settings (flip test, its scales, its modules fused) once,
keeping the heatmaps, then decodes them again with `separate_pairs` over a grid of radius (heatmap cells) and
alpha (the second peak's least share of the first). Per labelled pair of a person with a torso it counts:
both joints hit (PCK@0.2), a double count (one hits, its twin sits on the same truth and misses its own), a
full swap (each on the other's truth), and the rest. If the heatmaps hold a second peak on the other limb,
re-decoding wins; if the model put its mass on one limb only, it loses.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from pipeline.evaluate import photo_samples
from pipeline.metrics import LSP_TORSO
from pipeline.inference import crop_to_original, decode_heatmaps, photo_heatmaps
from pipeline.weights import load_trained
from shards.format import ShardSet


def separate_pairs(maps: torch.Tensor, pairs, radius: int, alpha: float) -> torch.Tensor:
    """(N, J, H, W) -> a copy where, for each pair whose argmaxes lie within `radius` cells, the joint with the
    lower peak loses the disk of radius + 1 cells around its twin's peak, when its best value outside that
    disk is at least `alpha` times its own peak (else it keeps its map)."""
    maps = maps.clone()
    n, _, h, w = maps.shape
    val, idx = maps.reshape(n, maps.shape[1], -1).max(-1)
    ys, xs = torch.div(idx, w, rounding_mode="floor"), idx % w
    gy, gx = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    rows = torch.arange(n)
    for left, right in pairs:
        close = (xs[:, left] - xs[:, right]) ** 2 + (ys[:, left] - ys[:, right]) ** 2 <= radius ** 2
        left_lower = val[:, left] < val[:, right]
        lo, hi = torch.where(left_lower, left, right), torch.where(left_lower, right, left)
        disk = (gx - xs[rows, hi].view(n, 1, 1)) ** 2 + (gy - ys[rows, hi].view(n, 1, 1)) ** 2 <= (radius + 1) ** 2
        masked = maps[rows, lo].masked_fill(disk, 0)
        use = close & (masked.reshape(n, -1).max(-1).values >= alpha * val[rows, lo])
        maps[rows[use], lo[use]] = masked[use]
    return maps


def pair_outcomes(pred: np.ndarray, gt: np.ndarray, pairs, torso=LSP_TORSO) -> dict[str, int]:
    """Counts of each pair outcome over the persons with a torso and both joints of the pair labelled."""
    a, b = torso
    size = np.linalg.norm(gt[:, a, :2] - gt[:, b, :2], axis=-1)
    has_torso = (gt[:, a, 2] > 0) & (gt[:, b, 2] > 0) & (size > 0)
    near = lambda i, j: np.linalg.norm(pred[:, i, :2] - gt[:, j, :2], axis=-1) <= 0.2 * size  # noqa: E731
    out = dict.fromkeys(("both hit", "double count", "full swap", "other"), 0)
    for left, right in pairs:
        scored = has_torso & (gt[:, left, 2] > 0) & (gt[:, right, 2] > 0)
        hit_l, hit_r, on_r, on_l = near(left, left), near(right, right), near(left, right), near(right, left)
        both = hit_l & hit_r
        double = ~both & ((hit_l & on_l) | (hit_r & on_r))
        full = ~hit_l & ~hit_r & on_r & on_l
        out["both hit"] += int((scored & both).sum())
        out["double count"] += int((scored & double).sum())
        out["full swap"] += int((scored & full).sum())
        out["other"] += int((scored & ~both & ~double & ~full).sum())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--shards", default="runs/shards/lspet-val")
    args = p.parse_args()
    model, record = load_trained(args.checkpoint, "cpu")
    cfg = record.config
    shards = ShardSet.open(args.shards)
    perm = shards.flip_permutation()
    maps, matrices, truth, stride = [], [], [], 4
    samples = list(photo_samples(shards))
    if not samples:
        raise SystemExit(f"{args.shards}: no photographs to score")
    for start in range(0, len(samples), 16):
        chunk = samples[start:start + 16]
        hm, stride, ms = photo_heatmaps(model, cfg, [p.image for p in chunk], [p.box for p in chunk],
                                        perm if cfg.eval.flip else None)
        maps.append(hm)
        matrices.append(ms)
        truth.extend(p.keypoints for p in chunk)
    maps, matrices, truth = torch.cat(maps), torch.cat(matrices), np.stack(truth)
    a, b = LSP_TORSO
    size = np.linalg.norm(truth[:, a, :2] - truth[:, b, :2], axis=-1)
    scored = (truth[..., 2] > 0) & ((truth[:, a, 2] > 0) & (truth[:, b, 2] > 0) & (size > 0))[:, None]

    def decode(m):
        kp = decode_heatmaps(m, stride, cfg.eval.dark_kernel)
        return crop_to_original(kp[..., :2], matrices).numpy()

    def pck(pred):
        hit = np.linalg.norm(pred - truth[..., :2], axis=-1) <= 0.2 * size[:, None]
        return 100 * (hit & scored).sum() / scored.sum()

    def outcomes(pred):
        out = pair_outcomes(pred, truth, shards.flip_pairs)
        total = max(sum(out.values()), 1)
        return ", ".join(f"{k} {100 * v / total:.1f} %" for k, v in out.items()) + f" of {total} pairs"

    base = decode(maps)
    print(f"{args.checkpoint}: {len(truth)} photographs, heatmaps {tuple(maps.shape[-2:])} at stride {stride}")
    print(f"as decoded: PCK@0.2 {pck(base):.2f}; {outcomes(base)}")
    print("| radius (cells) | alpha | PCK@0.2 |\n|---|---|---|")
    for radius in (1, 2, 3, 4):
        for alpha in (0.0, 0.2, 0.4, 0.6):
            print(f"| {radius} | {alpha} | {pck(decode(separate_pairs(maps, shards.flip_pairs, radius, alpha))):.2f} |")
    print(f"re-decoded at radius 1, alpha 0: {outcomes(decode(separate_pairs(maps, shards.flip_pairs, 1, 0.0)))}")


if __name__ == "__main__":
    main()
