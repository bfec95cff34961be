"""Left/right label check: persons whose annotation has left and right swapped, as a trained run sees them.

    python bench/analyses/side_check.py runs/NAME --shards runs/shards/lspet-train [--fix-root ../shared/data/lspet --out DIR]

LSPET's annotations were crowd-sourced, and a worker who names the limbs from the observer's side labels a
person mirrored (the left limbs named right). A run trained on them predicts, on the validation photographs, ~19 % of the scored
joints on the opposite joint's truth (`bench/analyses/error_bands.py`). This scores each person's photograph (with its
box, one scale, the flip test) and compares, for each left/right pair whose four points are labelled, the
prediction against the pair as labelled and as swapped: a pair votes "swapped" when the swapped reading is
closer by more than MARGIN torso units, "as labelled" when that one is closer by more than MARGIN. A person
with at least MIN_SWAPPED swapped votes and at most MAX_KEPT for the labels is flagged: the whole person
reads mirrored, which one joint's error does not explain. Prints the vote histogram and the share flagged.

With --fix-root (an LSPET folder: joints.mat and images/) and --out, writes OUT/joints.mat with the flagged
persons' left and right labels swapped and OUT/images linked to the original images, for `mshg shard lspet
--root OUT`: training on labels of one convention. Validation labels are never changed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import numpy as np
import scipy.io

from pipeline.evaluate import evaluate_photos
from pipeline.metrics import LSP_TORSO
from pipeline.weights import load_trained
from shards.datasets import _load_mat_joints
from shards.format import ShardSet

MARGIN = 0.2  # torso units: PCK's own threshold
MIN_SWAPPED = 4  # of the 6 pairs
MAX_KEPT = 1


def pair_votes(pred: np.ndarray, gt: np.ndarray, pairs, torso=LSP_TORSO) -> tuple[int, int] | None:
    """(pairs closer swapped, pairs closer as labelled) for one person; None without a torso."""
    a, b = torso
    if gt[a, 2] <= 0 or gt[b, 2] <= 0:
        return None
    size = max(float(np.linalg.norm(gt[a, :2] - gt[b, :2])), 1e-6)
    d = lambda i, j: float(np.linalg.norm(pred[i, :2] - gt[j, :2])) / size  # noqa: E731
    swapped = kept = 0
    for i, j in pairs:
        if gt[i, 2] <= 0 or gt[j, 2] <= 0:
            continue
        as_labelled, mirrored = d(i, i) + d(j, j), d(i, j) + d(j, i)
        swapped += mirrored + MARGIN < as_labelled
        kept += as_labelled + MARGIN < mirrored
    return swapped, kept


def flagged_ids(results: dict, pairs) -> tuple[list[int], np.ndarray]:
    """Ids of the persons that read mirrored, and the histogram of swapped votes (0..6) of the persons with a torso."""
    flagged, histogram = [], np.zeros(len(pairs) + 1, int)
    for idx in sorted(results):
        votes = pair_votes(results[idx].pred, results[idx].gt, pairs)
        if votes is None:
            continue
        swapped, kept = votes
        histogram[swapped] += 1
        if swapped >= MIN_SWAPPED and kept <= MAX_KEPT:
            flagged.append(idx)
    return flagged, histogram


def write_fixed(fix_root: str, out: str, flagged: list[int], pairs) -> None:
    """OUT/joints.mat: fix_root's LSPET joints (14, 3, N) with the flagged images' pairs swapped."""
    joints = _load_mat_joints(os.path.join(fix_root, "joints.mat"))  # a missing/damaged file: an error naming it
    if joints.ndim != 3 or joints.shape[:2] != (14, 3):
        raise SystemExit(f"{fix_root}/joints.mat: joints of shape {joints.shape}, expected LSPET's (14, 3, N)")
    for idx in flagged:
        for i, j in pairs:
            joints[[i, j], :, idx - 1] = joints[[j, i], :, idx - 1]
    os.makedirs(out, exist_ok=True)
    scipy.io.savemat(os.path.join(out, "joints.mat"), {"joints": joints})
    link = os.path.join(out, "images")
    if not os.path.exists(link):
        os.symlink(os.path.abspath(os.path.join(fix_root, "images")), link)
    with open(os.path.join(out, "swapped.json"), "w") as f:
        json.dump(flagged, f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--shards", required=True)
    p.add_argument("--fix-root", help="LSPET folder whose joints.mat to correct (with --out)")
    p.add_argument("--out", help="folder for the corrected joints.mat and a link to the images")
    args = p.parse_args()
    if bool(args.fix_root) != bool(args.out):
        p.error("--fix-root and --out go together")
    model, record = load_trained(args.checkpoint, "cpu")
    cfg = dataclasses.replace(record.config, eval=dataclasses.replace(record.config.eval, scales=[1.0]))  # one scale: 8,000 photos
    shards = ShardSet.open(args.shards)
    results, _ = evaluate_photos(model, cfg, shards, True)
    flagged, histogram = flagged_ids(results, shards.flip_pairs)
    scored = int(histogram.sum())
    print(f"{args.shards}: {len(results)} photographs, {scored} with a torso; swapped votes per person "
          f"(0..{len(histogram) - 1}): {histogram.tolist()}; flagged mirrored: {len(flagged)} "
          f"({100 * len(flagged) / max(scored, 1):.1f} % of those)")
    if args.out:
        write_fixed(args.fix_root, args.out, flagged, shards.flip_pairs)
        print(f"{args.out}/joints.mat: {len(flagged)} persons' left and right swapped")


if __name__ == "__main__":
    main()
