"""`mshg predict --checkpoint runs/NAME --out preds.json [--boxes B] [--overlay DIR] IMAGE...`:
keypoints in original pixels.

Each image is cropped exactly as the validation pipeline crops a person (`crop_matrix`): around a
box given in `--boxes` (JSON {image path: [x0, y0, w, h]}) or, with no box, the whole image, which
is taken to be the person. Images go through the model in batches (`--batch-size`), with the flip
test unless `--no-flip`. Unreadable images are reported by name and skipped; the rest go on.
`--overlay DIR` also writes each image with its predicted skeleton drawn (DIR/<name>.jpg).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from pipeline.evaluate import crop_matrix, crop_to_original, predict_crops
from pipeline.weights import load_trained


def read_image(path: str) -> np.ndarray:
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: cannot read or decode this image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def crop(image: np.ndarray, box, input_size: int, padding: float) -> tuple[np.ndarray, np.ndarray]:
    """-> (uint8 crop SxSx3, the 2x3 continuous-coordinate matrix that made it)."""
    m = crop_matrix(np.asarray(box, np.float64), input_size, padding)
    # OpenCV samples at integer pixel centres; shift the continuous-coordinate matrix by half a pixel
    m_index = m.astype(np.float64).copy()
    m_index[:, 2] += m_index[:, :2].sum(1) * 0.5 - 0.5
    out = cv2.warpAffine(image, m_index, (input_size, input_size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out, m


def overlay_path(directory: Path, image_path: str, taken: set[str]) -> Path:
    """DIR/<stem>.jpg, made unique when two inputs share a name."""
    stem, k = Path(image_path).stem, 1
    name = f"{stem}.jpg"
    while name in taken:
        k += 1
        name = f"{stem}-{k}.jpg"
    taken.add(name)
    return directory / name


def write_overlay(path: Path, image: np.ndarray, keypoints: list) -> None:
    from pipeline.plots import draw_skeleton

    side = max(image.shape[:2])
    drawn = draw_skeleton(image, np.asarray(keypoints)[:, :2], thickness=max(2, round(side / 250)))
    if not cv2.imwrite(str(path), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: cannot write the overlay image")


def main(args) -> int:
    model, cfg, meta = load_trained(args.checkpoint)
    boxes = json.loads(Path(args.boxes).read_text()) if args.boxes else {}
    flip_perm = None
    if not getattr(args, "no_flip", False):
        flip_perm = list(range(len(meta["joints"])))
        for a, b in meta["flip_pairs"]:
            flip_perm[a], flip_perm[b] = b, a
    overlay_dir = Path(args.overlay) if getattr(args, "overlay", None) else None
    if overlay_dir:
        overlay_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    size, padding = cfg.data.input_size, cfg.data.padding
    predictions, failed = [], []
    paths = list(args.images)
    for start in tqdm(range(0, len(paths), args.batch_size), desc="predict", unit="batch",
                      disable=len(paths) <= args.batch_size):
        crops, matrices, names, originals = [], [], [], []
        for path in paths[start:start + args.batch_size]:
            try:
                image = read_image(path)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                failed.append(path)
                continue
            h, w = image.shape[:2]
            c, m = crop(image, boxes.get(path, [0, 0, w, h]), size, padding)
            crops.append(c)
            matrices.append(m)
            names.append(path)
            originals.append(image if overlay_dir else None)
        if not crops:
            continue
        keypoints = predict_crops(model, torch.from_numpy(np.stack(crops)), flip_perm=flip_perm)
        xy = crop_to_original(keypoints[..., :2], torch.from_numpy(np.stack(matrices)))
        for name, pts, scores, image in zip(names, xy.tolist(), keypoints[..., 2].tolist(), originals):
            kps = [[x, y, s] for (x, y), s in zip(pts, scores)]
            predictions.append({"image": name, "keypoints": kps})
            if overlay_dir:
                write_overlay(overlay_path(overlay_dir, name, taken), image, kps)
    Path(args.out).write_text(json.dumps({"joints": meta["joints"], "predictions": predictions}, indent=1))
    print(f"wrote {len(predictions)} predictions to {args.out}"
          + (f"; {len(failed)} image(s) could not be read: {', '.join(failed)}" if failed else ""))
    return 0 if predictions or not paths else 1
