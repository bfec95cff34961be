"""Where a trained run's misses lie: each scored joint's distance to the truth in torso units, in bands, and how
many misses sit on the other side's joint (a left/right swap), per joint and overall.

    python bench/analyses/error_bands.py runs/NAME [--shards runs/shards/lspet-val] [--photos boxes|bare]

Scores the photographs as `mshg evaluate --photos` does (the run's eval settings: flip test, its scales) and
prints one table: PCK@0.2, the share of joints within 0.3 and 0.5 torso, and the share of joints whose
prediction misses its own truth but lies within 0.2 of its mirror joint's truth. Near misses (0.2-0.3) are
what finer heatmaps or sub-pixel decoding could win; swaps are what left/right label noise costs.
"""
from __future__ import annotations

import argparse

import numpy as np

from pipeline.evaluate import evaluate_photos
from pipeline.metrics import LSP_TORSO
from pipeline.weights import load_trained
from shards.format import ShardSet


def bands(pred: np.ndarray, gt: np.ndarray, perm: list[int], torso=LSP_TORSO) -> dict[str, np.ndarray]:
    """Per-joint shares (J,) of the scored joints: within 0.2 / 0.3 / 0.5 torso, and swapped misses."""
    a, b = torso
    keep = (gt[:, a, 2] > 0) & (gt[:, b, 2] > 0)
    pred, gt = pred[keep], gt[keep]
    size = np.linalg.norm(gt[:, a, :2] - gt[:, b, :2], axis=-1)[:, None]
    dist = np.linalg.norm(pred[..., :2] - gt[..., :2], axis=-1) / size
    mirror = np.linalg.norm(pred[..., :2] - gt[:, perm, :2], axis=-1) / size
    scored = gt[..., 2] > 0  # as PCK scores them: every labelled joint
    n = np.maximum(scored.sum(0), 1)
    share = lambda hit: (hit & scored).sum(0) / n  # noqa: E731
    # a swap: a miss that lies on its mirror joint's labelled truth (head and neck have no mirror)
    on_mirror = (mirror <= 0.2) & (gt[:, perm, 2] > 0) & (np.arange(len(perm)) != np.array(perm))
    return {"0.2": share(dist <= 0.2), "0.3": share(dist <= 0.3), "0.5": share(dist <= 0.5),
            "swapped": share((dist > 0.2) & on_mirror),
            "count": scored.sum(0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--shards", default="runs/shards/lspet-val")
    p.add_argument("--photos", choices=["boxes", "bare"], default="boxes")
    args = p.parse_args()
    model, record = load_trained(args.checkpoint, "cpu")
    cfg = record.config
    shards = ShardSet.open(args.shards)
    perm = shards.flip_permutation()
    results, _ = evaluate_photos(model, cfg, shards, args.photos == "boxes")
    ids = sorted(results)
    out = bands(np.stack([results[i].pred for i in ids]), np.stack([results[i].gt for i in ids]), perm)
    weights = out["count"] / out["count"].sum()
    print(f"{args.checkpoint}, {args.photos}: {len(ids)} photographs; shares of the scored joints")
    print("| joint | joints | <= 0.2 | <= 0.3 | <= 0.5 | swapped |\n|---|---|---|---|---|---|")
    for j, name in enumerate(shards.joints):
        print(f"| {name} | {out['count'][j]} | " + " | ".join(f"{100 * out[k][j]:.1f}"
                                                         for k in ("0.2", "0.3", "0.5", "swapped")) + " |")
    print(f"| all | {out['count'].sum()} | " + " | ".join(f"{100 * (out[k] * weights).sum():.1f}"
                                                        for k in ("0.2", "0.3", "0.5", "swapped")) + " |")


if __name__ == "__main__":
    main()
