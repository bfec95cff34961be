"""What each part of `mshg predict`'s search for a person costs and gives, on photographs without a box.

    python bench/predict_speed.py --checkpoint mshg-lspet-112 --shards runs/shards/lspet-val [--photos 100]

Runs the validation photographs through `predict_images` (the path `mshg predict` takes) under each variant of
pipeline.inference.PhotoSearch, and prints photos/s and PCK@0.2 against the annotation, with the ratio of each
variant's speed to the accurate setting (`--accurate`) measured in the same run. The boxed row is the same
photos with each person's box (the run's full test). One process, the machine's torch threads; run it alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from pipeline.evaluate import SampleResult, photo_samples, summarise  # noqa: E402
from pipeline.inference import ACCURATE, FAST, predict_images  # noqa: E402
from pipeline.weights import load_trained, resolve  # noqa: E402
from shards.format import ShardSet  # noqa: E402

IDENTITY = [[1, 0, 0], [0, 1, 0]]

VARIANTS = {  # name -> PhotoSearch (None: the photos' own boxes)
    "accurate (--accurate)": ACCURATE,
    "default (fast)": FAST,
    "default, 2 passes": dataclasses.replace(FAST, passes=2),
    "default, 1 pass": dataclasses.replace(FAST, passes=1),
    "whole photo only (no windows)": dataclasses.replace(FAST, windows=()),
    "default, keep 3": dataclasses.replace(FAST, keep=3),
    "default, refined at eval.scales": dataclasses.replace(FAST, scales=None),
    "default, first pass flipped": dataclasses.replace(FAST, first_flip=True),
    "default, refined without flip": dataclasses.replace(FAST, flip=False),
    "whole photo only, refined without flip": dataclasses.replace(FAST, windows=(), flip=False),
    "whole photo only, 2 passes": dataclasses.replace(FAST, windows=(), passes=2),
    "with each person's box": None,
}


def run(model, cfg, photos, shards, flip, search, batch: int) -> tuple[float, float]:
    """-> (photos per second, PCK@0.2) of one variant."""
    results = {}
    t0 = time.perf_counter()
    for lo in range(0, len(photos), batch):
        chunk = photos[lo:lo + batch]
        boxes = [p.box if search is None else None for p in chunk]
        keypoints = predict_images(model, cfg, [p.image for p in chunk], boxes, flip, search or FAST)
        for photo, pred in zip(chunk, keypoints):
            results[photo.idx] = SampleResult(pred, photo.keypoints, IDENTITY)
    seconds = time.perf_counter() - t0
    return len(photos) / seconds, summarise(results, shards)["value"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="a shipped model's name, run folder or weights file (default: "
                                                      "the shipped model)")
    p.add_argument("--shards", default="runs/shards/lspet-val")
    p.add_argument("--photos", type=int, default=100, help="the first N photographs of the shard set")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--only", nargs="*", default=None, help="run only variants whose name contains one of these")
    args = p.parse_args()
    model, record = load_trained(args.checkpoint, "cpu")
    cfg = record.config
    shards = ShardSet.open(args.shards)
    photos = list(itertools.islice(photo_samples(shards), args.photos))
    flip = shards.flip_permutation()
    print(f"{resolve(args.checkpoint)}: {len(photos)} photographs of {args.shards}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} torch thread(s); eval.scales {cfg.eval.scales}")
    rows, base = [], None
    for name, search in VARIANTS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        rate, value = run(model, cfg, photos, shards, flip, search, args.batch_size)
        base = base or rate
        rows.append((name, rate, value))
        print(f"| {name} | {rate:.2f} | {rate / base:.1f}x | {100 * value:.1f} |", flush=True)
    print("\n| variant | photos/s | vs the first row | PCK@0.2 % |\n|---|---|---|---|")
    for name, rate, value in rows:
        print(f"| {name} | {rate:.2f} | {rate / base:.1f}x | {100 * value:.1f} |")


if __name__ == "__main__":
    main()
