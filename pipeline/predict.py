"""`mshg predict --checkpoint runs/NAME --out preds.json [--boxes B] [--overlay DIR] IMAGE...`:
keypoints in original pixels.

Each image is cropped exactly as the validation pipeline crops a person (`crop_matrix`): around a
box given in `--boxes` (JSON {image path: [x0, y0, w, h]}), or, for a photo without a box, coarse
to fine: a first pass on the whole photo and a grid of windows; the 3 crops the model is surest of are
each refined twice on the box of the joints found, cropped like a validation box, and the surest refined
crop is the answer (`--passes`, default 3; 1: the first pass only; pipeline.inference's FIRST_PASS_KEEP
and PASS_GROWS). Images go through the model in batches (`--batch-size`), with the flip test unless
`--no-flip` and the run's multi-scale test (`eval.scales`, or `--scales`), decoded from the modules the
run's `eval.modules` names. Unreadable images are reported by name and skipped; the rest go on.
`--overlay DIR` also writes each image with its predicted skeleton drawn (DIR/<name>.jpg).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.config import validate
from pipeline.inference import inference_device, predict_images, read_image
from pipeline.plots import draw_skeleton
from pipeline.weights import load_trained
from shards.format import flip_permutation

def overlay_path(directory: Path, image_path: str, taken: set[str]) -> Path:
    """DIR/<stem>.jpg, made unique when two inputs share a name."""
    stem, k = Path(image_path).stem, 1
    name = f"{stem}.jpg"
    while name in taken:
        k += 1
        name = f"{stem}-{k}.jpg"
    taken.add(name)
    return directory / name


def write_overlay(path: Path, image: np.ndarray, keypoints: list, skeleton=None) -> None:
    side = max(image.shape[:2])
    drawn = draw_skeleton(image, np.asarray(keypoints)[:, :2], thickness=max(2, round(side / 250)), skeleton=skeleton)
    if not cv2.imwrite(str(path), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: cannot write the overlay image")


def main(args) -> int:
    model, cfg, meta = load_trained(args.checkpoint, inference_device(getattr(args, "device", "auto")))
    if getattr(args, "scales", None):
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, scales=args.scales))
        validate(cfg)
    boxes = json.loads(Path(args.boxes).read_text()) if args.boxes else {}
    flip_perm = None if getattr(args, "no_flip", False) else flip_permutation(len(meta["joints"]), meta["flip_pairs"])
    overlay_dir = Path(args.overlay) if getattr(args, "overlay", None) else None
    if overlay_dir:
        overlay_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    predictions, failed = [], []
    paths = list(args.images)
    for start in tqdm(range(0, len(paths), args.batch_size), desc="predict", unit="batch",
                      disable=len(paths) <= args.batch_size or None):
        images, names = [], []
        for path in paths[start:start + args.batch_size]:
            try:
                images.append(read_image(path))
                names.append(path)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                failed.append(path)
        if not images:
            continue
        keypoints = predict_images(model, cfg, images, [boxes.get(n) for n in names], flip_perm, args.passes)
        for name, kps, image in zip(names, keypoints.tolist(), images):
            predictions.append({"image": name, "keypoints": kps})
            if overlay_dir:
                write_overlay(overlay_path(overlay_dir, name, taken), image, kps, meta["skeleton"])
    Path(args.out).write_text(json.dumps({"joints": meta["joints"], "predictions": predictions}, indent=1))
    print(f"wrote {len(predictions)} predictions to {args.out}"
          + (f"; {len(failed)} image(s) could not be read: {', '.join(failed)}" if failed else ""))
    return 0 if predictions or not paths else 1
