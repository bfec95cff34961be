"""Test-time variants a trained run was scored with before `eval.scales` existed: crops re-cut from each
validation photograph (with its box) at other paddings and input sizes, one crop or several averaged.

    python bench/analyses/test_time_variants.py runs/NAME [--shards runs/shards/lspet-val] [--size 96] 1.25 1.15 1.1,1.25,1.45

Each positional argument is one variant: a comma-separated list of paddings (crop side = padding x the box's
longer side); a list of several re-cuts the photo at each, and their heatmaps (flip test, the run's modules) are
resampled onto the first padding's crop and averaged before decoding, as the multi-scale test of the
literature does. `mshg evaluate --photos boxes --scales` scores the product's cheaper version: zooms of the one
crop (docs/results/recipe.md, "Recipe r8"). Prints PCK@0.2 per variant.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pipeline.evaluate import SampleResult, photo_samples, summarise
from pipeline.inference import crop, crop_heatmaps, crop_to_original, decode_heatmaps, zoom
from pipeline.weights import load_trained
from shards.format import ShardSet

IDENTITY = np.array([[1, 0, 0], [0, 1, 0]], np.float32)  # results in original pixels


def score(model, cfg, shards, samples, size: int, paddings: list[float], batch: int = 16) -> float:
    flip, base = shards.flip_permutation(), paddings[0]
    results = {}
    for lo in range(0, len(samples), batch):
        chunk = range(lo, min(lo + batch, len(samples)))
        total = 0.0
        for padding in paddings:
            crops = np.stack([crop(samples[i].image, samples[i].box, size, padding)[0] for i in chunk])
            heatmaps, stride = crop_heatmaps(model, torch.from_numpy(crops), flip, cfg.eval.modules)
            # a point of the base crop lies at base / padding times its distance from this crop's centre
            total = total + zoom(heatmaps, base / padding)
        keypoints = decode_heatmaps(total / len(paddings), stride, cfg.eval.dark_kernel)
        matrices = torch.from_numpy(np.stack([crop(samples[i].image, samples[i].box, size, base)[1] for i in chunk]))
        xy = crop_to_original(keypoints[..., :2], matrices)
        for k, i in enumerate(chunk):
            pred = torch.cat([xy[k], keypoints[k, :, 2:]], -1).numpy()
            results[samples[i].idx] = SampleResult(pred, samples[i].keypoints, IDENTITY)
    return summarise(results, shards)["value"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("variants", nargs="+", help="paddings, e.g. 1.25 or 1.1,1.25,1.45")
    p.add_argument("--shards", default="runs/shards/lspet-val")
    p.add_argument("--size", type=int, default=None, help="input size (a multiple of 32); default the run's")
    args = p.parse_args()
    model, record = load_trained(args.checkpoint, "cpu")
    cfg = record.config
    shards = ShardSet.open(args.shards)
    samples = list(photo_samples(shards))
    size = args.size or cfg.data.input_size
    for variant in args.variants:
        paddings = [float(x) for x in variant.split(",")]
        t0 = time.time()
        pck = score(model, cfg, shards, samples, size, paddings)
        print(f"{args.checkpoint}: input {size}, paddings {variant}: PCK@0.2 = {100 * pck:.2f} "
              f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
