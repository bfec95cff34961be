"""`mshg predict --checkpoint runs/NAME --out preds.json [--boxes B] [--overlay DIR] IMAGE...`:
keypoints in original pixels.

Each image is cropped exactly as the validation pipeline crops a person (`crop_matrix`): around a
box given in `--boxes` (JSON {image path: [x0, y0, w, h]}), or, for a photo without a box, coarse
to fine: a first pass on the whole photo, then the box of the joints it found, cropped like a
validation box, for a second pass (`--passes`, default 2; 1: the whole photo only). Images go
through the model in batches (`--batch-size`), with the flip test unless `--no-flip`, decoded from
the modules the run's `eval.modules` names. Unreadable images are reported by name and skipped; the
rest go on.
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

from pipeline.evaluate import crop_to_original, predict_crops
from pipeline.inputs import crop_matrix
from pipeline.weights import load_trained
from shards.format import flip_permutation

BOX_SCORE = 0.1  # joints of the first pass whose peak is at least this share of the best one frame the second


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


def write_overlay(path: Path, image: np.ndarray, keypoints: list, skeleton=None) -> None:
    from pipeline.plots import draw_skeleton

    side = max(image.shape[:2])
    drawn = draw_skeleton(image, np.asarray(keypoints)[:, :2], thickness=max(2, round(side / 250)), skeleton=skeleton)
    if not cv2.imwrite(str(path), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: cannot write the overlay image")


def box_from_keypoints(keypoints: np.ndarray) -> list[float]:
    """The box (x0, y0, w, h, as the shards store it) of a first pass's confident joints (J, 3)."""
    confident = keypoints[keypoints[:, 2] >= BOX_SCORE * max(keypoints[:, 2].max(), 1e-6)]
    x0, y0 = confident[:, :2].min(0)
    x1, y1 = confident[:, :2].max(0)
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def predict_batch(model, cfg, images: list[np.ndarray], boxes: list, flip_perm: list[int] | None) -> np.ndarray:
    """RGB images and their boxes (None: the whole photo) -> keypoints (N, J, 3) in original pixels
    (x, y, peak score)."""
    size, padding = cfg.data.input_size, cfg.data.padding
    crops, matrices = zip(*(crop(image, box, size, padding) for image, box in zip(images, boxes)))
    device = next(model.parameters()).device
    keypoints = predict_crops(model, torch.from_numpy(np.stack(crops)).to(device), flip_perm, cfg.eval.modules).cpu()
    xy = crop_to_original(keypoints[..., :2], torch.from_numpy(np.stack(matrices)))
    return torch.cat([xy, keypoints[..., 2:]], -1).numpy()


def predict_images(model, cfg, images: list[np.ndarray], boxes: list, flip_perm: list[int] | None,
                   passes: int = 2) -> np.ndarray:
    """A box where one is given; the whole photo, then (passes - 1) times the box of the joints
    found, where none is."""
    whole = [b is None for b in boxes]
    boxes = [[0, 0, im.shape[1], im.shape[0]] if b is None else b for im, b in zip(images, boxes)]
    keypoints = predict_batch(model, cfg, images, boxes, flip_perm)
    for _ in range(passes - 1):
        refine = [i for i, w in enumerate(whole) if w]
        if not refine:
            break
        better = predict_batch(model, cfg, [images[i] for i in refine],
                               [box_from_keypoints(keypoints[i]) for i in refine], flip_perm)
        keypoints[refine] = better
    return keypoints


def inference_device(name: str = "auto") -> torch.device:
    """auto: the first GPU when torch has CUDA, else the CPU; cuda without CUDA is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda, but CUDA is not available (torch {torch.__version__})")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def main(args) -> int:
    model, cfg, meta = load_trained(args.checkpoint, inference_device(getattr(args, "device", "auto")))
    if args.passes < 1:
        raise ValueError(f"--passes must be >= 1; got {args.passes}")
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
