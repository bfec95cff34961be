"""`mshg predict [SOURCE ...]`: keypoints for photos, folders, globs and videos, in original pixels.

    mshg predict photo.jpg                          # the shipped model (`mshg models`), predictions.json
    mshg predict photos/ 'more/**/*.png' clip.mp4 --overlay drawn/ --out preds.jsonl
    mshg predict val2017/ --checkpoint runs/NAME --format coco --coco-ids person_keypoints_val2017.json

A SOURCE is an image file, a folder (its images and videos, sorted), a glob, or a video (a prediction per
frame). Images are read as a viewer shows them (pipeline.inference.read_image). A photo with a box in
`--boxes` (JSON {path: [x0, y0, w, h]}) is cropped like a validation box; one without is searched coarse to
fine (pipeline.inference.PhotoSearch: fast by default, `--accurate` for every pass at the run's full test).
Results are written as they come (`--format json|jsonl|coco`), so a file that cannot be read or predicted
costs that file alone: it is reported with its reason and counted, and the command fails only when nothing
could be predicted. `--overlay DIR` draws each skeleton (DIR/<name>.jpg, a video as DIR/<name>.mp4).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.config import validate
from pipeline.inference import (ACCURATE, FAST, MIN_BOX_SIDE, inference_device, predict_images, read_image,
                                usable_box)
from pipeline.plots import draw_skeleton
from pipeline.weights import load_trained, resolve
from shards.datasets import COCO_JOINTS

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}


@dataclasses.dataclass
class Skips:
    """Inputs that gave no prediction, each reported once on stderr as it happens, counted by reason."""
    reasons: Counter = dataclasses.field(default_factory=Counter)

    def add(self, name: str, reason: str) -> None:
        self.reasons[reason.split(" (")[0]] += 1
        tqdm.write(f"skipped {name}: {reason}", file=sys.stderr)

    def summary(self) -> str:
        total = sum(self.reasons.values())
        return f"; {total} skipped ({', '.join(f'{n} {r}' for r, n in self.reasons.items())})" if total else ""


def expand_sources(sources: list[str], skips: Skips) -> list[str]:
    """Files, folders (their images and videos, sorted) and globs -> the input files, in order, once each."""
    files: list[str] = []
    for source in sources:
        if any(c in source for c in "*?[") and not os.path.exists(source):
            found = sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
            if not found:
                skips.add(source, "no file matches this pattern")
            files += found
        elif os.path.isdir(source):
            found = sorted(str(p) for p in Path(source).iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
            if not found:
                skips.add(source, "no images or videos in this folder")
            files += found
        elif os.path.isfile(source):
            files.append(source)
        else:
            skips.add(source, "no such file or folder")
    return list(dict.fromkeys(files))


def is_video(path: str) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def read_boxes(path: str | None, files: list[str]) -> dict[str, list[float] | None]:
    """--boxes: {path: box}, keys matched to the inputs as paths (./a.jpg is a.jpg). A box with no area is
    reported and the image searched without one; keys that match no input are reported by name."""
    if not path:
        return {}
    try:
        given = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--boxes {path}: cannot read it as JSON ({e})") from None
    if not isinstance(given, dict):
        raise ValueError(f"--boxes {path}: expected a JSON object {{image path: [x0, y0, w, h]}}")
    inputs = {os.path.normpath(f): f for f in files}
    boxes, unmatched = {}, []
    for key, box in given.items():
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise ValueError(f"--boxes {path}: the box of {key} must be [x0, y0, w, h]; got {box!r}")
        name = inputs.get(os.path.normpath(key))
        if name is None:
            unmatched.append(key)
        elif usable_box(box):
            boxes[name] = [float(v) for v in box]
        else:
            print(f"warning: --boxes {path}: the box of {key} {box} has no area; that image is searched without one",
                  file=sys.stderr)
    if unmatched:
        print(f"warning: --boxes {path}: {len(unmatched)} box(es) match no input and are unused: "
              f"{', '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''}", file=sys.stderr)
    return boxes


def coco_image_ids(path: str | None) -> dict[str, int]:
    """--coco-ids: a COCO annotation file's images -> {file name: image id} (matched by base name)."""
    if not path:
        return {}
    try:
        images = json.loads(Path(path).read_text())["images"]
        return {os.path.basename(im["file_name"]): int(im["id"]) for im in images}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"--coco-ids {path}: not a COCO annotation file with images[].file_name/id ({e})") from None


class PredictionWriter:
    """Writes each prediction as it comes and flushes it: json ({"joints", "skeleton", "predictions": [...]}),
    jsonl (a first line with the joints, then one prediction a line) or coco (COCO keypoint results:
    [{image_id, category_id 1, keypoints: 17 x (x, y, score), score}], joints matched by name, a COCO joint the
    model lacks written as 0, 0, 0)."""

    def __init__(self, path: str, fmt: str, joints: list[str], skeleton, coco_ids: dict[str, int]):
        self.fmt, self.joints, self.coco_ids, self.count = fmt, joints, coco_ids, 0
        self.file = open(path, "w")
        self.coco_index = [joints.index(j) if j in joints else None for j in COCO_JOINTS]
        if fmt == "coco" and not any(k is not None for k in self.coco_index):
            raise ValueError(f"--format coco: none of the model's joints ({', '.join(joints[:4])}, ...) is a COCO joint")
        head = {"joints": joints, "skeleton": skeleton}
        self.file.write({"json": json.dumps(head)[:-1] + ', "predictions": [', "jsonl": json.dumps(head) + "\n",
                         "coco": "["}[fmt])

    def coco_record(self, record: dict) -> dict:
        name = os.path.basename(record["image"])
        image_id = self.coco_ids.get(name)
        if image_id is None and not self.coco_ids and Path(name).stem.isdigit():
            image_id = int(Path(name).stem)  # COCO's own file names are the image ids
        if image_id is None or "frame" in record:
            raise LookupError(f"no COCO image id for it (give --coco-ids ANNOTATIONS.json listing {name})")
        kp = np.asarray(record["keypoints"])
        flat = [v for k in self.coco_index for v in ([0.0, 0.0, 0.0] if k is None else kp[k].tolist())]
        return {"image_id": image_id, "category_id": 1, "keypoints": [round(v, 2) for v in flat],
                "score": round(float(kp[:, 2].mean()), 4)}

    def write(self, record: dict) -> None:
        """Raises LookupError (the file is skipped) when the record cannot be written in this format."""
        item = self.coco_record(record) if self.fmt == "coco" else record
        sep = "\n" if self.fmt == "jsonl" else ("\n" if self.count == 0 else ",\n")
        self.file.write((json.dumps(item) + "\n") if self.fmt == "jsonl" else sep + json.dumps(item))
        self.file.flush()
        self.count += 1

    def close(self) -> None:
        self.file.write({"json": "\n]}\n", "jsonl": "", "coco": "\n]\n"}[self.fmt])
        self.file.close()


def overlay_path(directory: Path, source: str, suffix: str, taken: set[str]) -> Path:
    """DIR/<stem><suffix>, made unique when two inputs share a name."""
    stem, k = Path(source).stem, 1
    name = f"{stem}{suffix}"
    while name in taken:
        k += 1
        name = f"{stem}-{k}{suffix}"
    taken.add(name)
    return directory / name


def draw(image: np.ndarray, keypoints, skeleton) -> np.ndarray:
    """RGB image -> BGR image with the skeleton drawn, line width by the image's size."""
    side = max(image.shape[:2])
    drawn = draw_skeleton(image, np.asarray(keypoints)[:, :2], thickness=max(2, round(side / 250)), skeleton=skeleton)
    return cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)


def video_frames(path: str):
    """(frame index, RGB frame) of a video file; ValueError when OpenCV cannot open it."""
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise ValueError(f"{path}: cannot open this video")
    try:
        k = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            yield k, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            k += 1
        if k == 0:
            raise ValueError(f"{path}: no frame could be decoded")
    finally:
        capture.release()


class Predictor:
    """The model and how it is asked; turns batches of images into records and hands them on."""

    def __init__(self, args):
        self.model, self.record = load_trained(args.checkpoint, inference_device(args.device))
        cfg = self.record.config
        if args.scales:
            cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, scales=args.scales))
            validate(cfg)
        self.cfg = cfg
        self.search = (ACCURATE if args.accurate else FAST).with_passes(args.passes)
        self.flip_perm = None if args.no_flip else self.record.flip_permutation()

    def __call__(self, images: list[np.ndarray], boxes: list) -> np.ndarray:
        return predict_images(self.model, self.cfg, images, boxes, self.flip_perm, self.search)


def predict_each(predictor: Predictor, items: list[tuple[dict, np.ndarray, list | None]], skips: Skips):
    """(record, image, box) items -> (record with keypoints, image) pairs; the batch at once, and when it fails,
    each image alone, so that an image the model cannot take costs only itself."""
    try:
        keypoints = predictor([im for _, im, _ in items], [b for _, _, b in items])
        return [(dict(rec, keypoints=kp.tolist()), im) for (rec, im, _), kp in zip(items, keypoints)]
    except (ValueError, RuntimeError, cv2.error) as e:
        if len(items) == 1:
            skips.add(items[0][0]["image"], f"prediction failed ({type(e).__name__}: {e})")
            return []
        return [done for item in items for done in predict_each(predictor, [item], skips)]


def main(args) -> int:
    skips = Skips()
    files = expand_sources(args.sources, skips)
    if not files:
        raise ValueError("no input: " + (", ".join(args.sources)) + " named no image or video")
    boxes = read_boxes(args.boxes, files)
    coco_ids = coco_image_ids(args.coco_ids)
    predictor = Predictor(args)
    joints, skeleton = predictor.record.joints, predictor.record.skeleton
    print(f"model: {resolve(args.checkpoint)} ({len(joints)} joints); {len(files)} input file(s) -> {args.out}",
          file=sys.stderr)
    overlay_dir = Path(args.overlay) if args.overlay else None
    if overlay_dir:
        overlay_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    writer = PredictionWriter(args.out, args.format, joints, skeleton, coco_ids)
    frames = 0
    bar = tqdm(total=len(files), desc="predict", unit="file", disable=None)

    def flush(items: list, video=None) -> None:
        for record, image in predict_each(predictor, items, skips):
            try:
                writer.write(record)
            except LookupError as e:
                skips.add(record["image"], str(e))
                continue
            if video is not None:
                video.write(draw(image, record["keypoints"], skeleton))
            elif overlay_dir:
                path = overlay_path(overlay_dir, record["image"], ".jpg", taken)
                if not cv2.imwrite(str(path), draw(image, record["keypoints"], skeleton)):
                    raise OSError(f"{path}: cannot write the overlay image")
        items.clear()

    try:
        batch: list = []
        for path in files:
            if is_video(path) and args.format == "coco":
                skips.add(path, "a video's frames have no COCO image ids (use --format json or jsonl)")
            elif is_video(path):
                flush(batch)
                before = writer.count
                predict_video(path, flush, overlay_dir, taken, args.batch_size, skips)
                frames += writer.count - before
            else:
                try:
                    image = read_image(path)
                    if max(image.shape[:2]) < MIN_BOX_SIDE:
                        raise ValueError(f"{path}: {image.shape[1]}x{image.shape[0]} pixels, too small to find a person in")
                    batch.append(({"image": path}, image, boxes.get(path)))
                except ValueError as e:
                    skips.add(path, str(e).removeprefix(f"{path}: "))
                if len(batch) >= args.batch_size:
                    flush(batch)
            bar.update()
        flush(batch)
    finally:
        bar.close()
        writer.close()
    print(f"wrote {writer.count} predictions ({frames} of them video frames) to {args.out}"
          + (f"; overlays in {overlay_dir}" if overlay_dir and writer.count else "") + skips.summary())
    return 0 if writer.count else 1


def predict_video(path: str, flush, overlay_dir: Path | None, taken: set[str], batch_size: int, skips: Skips) -> None:
    """Every frame of a video, in batches (no box: each frame searched); with --overlay, DIR/<name>.mp4 of the
    frames drawn."""
    video, batch = None, []
    try:
        for k, frame in video_frames(path):
            if overlay_dir and video is None:
                capture = cv2.VideoCapture(path)
                fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
                capture.release()
                out = overlay_path(overlay_dir, path, ".mp4", taken)
                video = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, frame.shape[1::-1])
                if not video.isOpened():
                    raise OSError(f"{out}: cannot write the overlay video")
            batch.append(({"image": path, "frame": k}, frame, None))
            if len(batch) >= batch_size:
                flush(batch, video)
        flush(batch, video)
    except ValueError as e:
        skips.add(path, str(e).removeprefix(f"{path}: "))
    finally:
        if video is not None:
            video.release()
