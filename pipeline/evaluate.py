"""Evaluation: trained weights scored on a shard set with its metric (pipeline.metrics), as functions with
explicit arguments: `evaluate_loader` (a loader's validation crops), `evaluate_shards` (training's: every rank
its part, gathered on rank 0), `evaluate_photos` (the photographs through `mshg predict`'s path), `summarise`
(results -> the shard set's metric), and `evaluate` / `main` (`mshg evaluate`).

`mshg evaluate --checkpoint runs/NAME --shards DIR` runs the validation crop (with the flip test unless
`--no-flip`) over a shard set and prints the metric of the dataset named in its manifest (PCK@0.2 for
LSP/LSPET, PCKh@0.5 for MPII, COCO keypoint AP for COCO-format sets: see pipeline/metrics.py).
Training's in-run evaluations are pipeline/validate.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import EvalConfig, validate
from pipeline.distributed import device_index, gather_objects
from pipeline.inference import (ACCURATE, FAST, PhotoSearch, crop_to_original, image_from_bytes, inference_device,
                                predict_crops, predict_images)
from pipeline.metrics import metric_for
from pipeline.plots import prediction_grid
from pipeline.weights import load_trained
from shards.format import ShardSet, read_metadata, read_photos

# pipeline.data (the DALI graph) is imported only where a loader is built, so that evaluation imports without
# DALI (tests/test_structure.py).


@dataclass
class SampleResult:
    """One validation sample: prediction (J, 3: x, y, score) and ground truth (J, 3: x, y, labelled)
    in crop coordinates, the 2x3 crop matrix, and the uint8 crop when kept for the prediction grid."""
    pred: np.ndarray
    gt: np.ndarray
    matrix: np.ndarray
    image: np.ndarray | None = None


@torch.no_grad()
def evaluate_loader(model: torch.nn.Module, loader, cfg: EvalConfig, flip_perm: list[int], keep_images: int = 0,
                    progress: bool = True) -> dict[int, SampleResult]:
    """This rank's validation results by sample id; the crop is kept for the `keep_images` smallest
    sample ids this rank saw (the prediction grid of each evaluation shows these fixed images).
    The one evaluation of the project: training's evaluations and `mshg evaluate` both call it, in
    fp32, with the flip test unless `eval.flip=false`, decoded from `eval.modules`.

    A validation crop is a similarity transform of the image, so PCK (a ratio of distances) is the
    same in crop and in original coordinates; PCKh and COCO AP map back with the matrix. The batches go
    to the model's device.
    progress: a bar over the batches on stderr when it is a terminal (training's evaluations go without)."""
    from pipeline.data import unpack

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: dict[int, SampleResult] = {}
    kept: list[int] = []
    for batch in tqdm(loader, desc="evaluate", unit="batch", disable=None if progress else True):
        b = unpack(batch, device)
        pred = predict_crops(model, b["image"], flip_perm if cfg.flip else None, cfg.modules, cfg.dark_kernel,
                             cfg.scales).cpu().numpy()
        gt = b["keypoints"].cpu().numpy()
        matrix = b["matrix"].cpu().numpy()
        for i, sid in enumerate(b["sample_id"].view(-1).tolist()):
            results[sid] = SampleResult(pred[i], gt[i], matrix[i])
            if keep_images:
                results[sid].image = b["image"][i].cpu().numpy()
                kept.append(sid)
                if len(kept) > keep_images:
                    dropped = max(kept)
                    kept.remove(dropped)
                    results[dropped].image = None
    model.train(was_training)
    return results


def evaluate_shards(model: torch.nn.Module, shards, cfg, batch_size: int, world, keep_images: int = 8
                    ) -> dict[int, SampleResult] | None:
    """Training's evaluation: every rank predicts its part of `shards` (DALI's validation crops, on the rank's
    GPU when it has one); rank 0 gets everyone's results (the crops of the `keep_images` smallest ids kept
    for the prediction grid), the other ranks None."""
    from pipeline.data import build_loader
    loader = build_loader(shards, cfg.data, batch_size, train=False, part=(world.rank, world.size),
                          device_id=device_index(world))
    results = evaluate_loader(model, loader, cfg.eval, shards.flip_permutation(),
                              keep_images=keep_images if world.is_main else 0, progress=False)
    merged = {}
    for part in gather_objects(results, world):
        merged.update(part)
    return merged if world.is_main else None


def _to_original(points: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    xy = crop_to_original(torch.from_numpy(np.ascontiguousarray(points[..., :2])).double(),
                          torch.from_numpy(np.ascontiguousarray(matrices))).double().numpy()
    return np.concatenate([xy, points[..., 2:]], -1)


def summarise(results: dict[int, SampleResult], shards, metadata: dict[int, dict] | None = None) -> dict:
    """Results of `evaluate_loader` (all ranks merged) or `evaluate_photos` -> the shard set's metric
    (`pipeline.metrics.metric_for`): `metric` (its name as tracked), `value`, `per_joint` (empty for COCO),
    `persons`, `left_out`, `samples`, and the metric's own keys (`pck`, `pckh`, COCO's `stats`).
    metadata: each sample's JSON by sample id, for the metrics that need it (PCKh's head box, COCO's image
    ids); pass what the caller has read, else it is read from the tars here."""
    metric = metric_for(shards)
    ids = sorted(results)
    pred = np.stack([results[i].pred for i in ids])
    gt = np.stack([results[i].gt for i in ids])
    metas = None
    if metric.needs_metadata:  # scored in original pixels: a crop's zoom must not scale the head box or OKS area
        metadata = metadata if metadata is not None else read_metadata(shards)
        matrices = np.stack([results[i].matrix for i in ids])
        pred, gt = _to_original(pred, matrices), _to_original(gt, matrices)
        metas = [metadata[i] for i in ids]
    out = metric.compute(pred, gt, metas)
    out["samples"] = len(ids)
    return out


class Photo(NamedTuple):
    idx: int  # the sample id
    image: np.ndarray  # RGB, as shipped
    keypoints: np.ndarray  # (J, 3) in original pixels
    box: list  # the person box (x0, y0, w, h)
    meta: dict  # the sample's JSON metadata (head box, COCO image id, ...)


def photo_samples(shards):
    """Every photograph of a shard set, decoded; an undecodable one is an error naming its tar and key."""
    for tar in shards.tars:
        for where, idx, data, keypoints, box, meta in read_photos(tar):
            yield Photo(idx, image_from_bytes(data, where), keypoints, box, meta)


def evaluate_photos(model, cfg, shards, boxes: bool, batch_size: int = 16, search: PhotoSearch = FAST
                    ) -> tuple[dict[int, SampleResult], dict[int, dict]]:
    """`mshg predict` on the shard set's photographs, scored against their annotation: with each person's box
    (the validation box rule, `--boxes`), or bare (no box: pipeline.inference's coarse-to-fine rule,
    `predict_images`); with the flip test when cfg.eval.flip. Results in original pixels (an identity matrix),
    and each sample's metadata (read with the photographs), both for `summarise`."""
    flip_perm = shards.flip_permutation() if cfg.eval.flip else None
    results: dict[int, SampleResult] = {}
    metadata: dict[int, dict] = {}
    chunk: list = []
    bar = tqdm(total=shards.num_samples, desc="evaluate", unit="photo", disable=None)  # None: off when not a terminal

    def flush():
        keypoints = predict_images(model, cfg, [p.image for p in chunk], [p.box if boxes else None for p in chunk],
                                   flip_perm, search)
        for photo, pred in zip(chunk, keypoints):
            results[photo.idx] = SampleResult(pred, photo.keypoints, np.array([[1, 0, 0], [0, 1, 0]], np.float32))
        bar.update(len(chunk))
        chunk.clear()

    for sample in photo_samples(shards):
        metadata[sample.idx] = sample.meta
        chunk.append(sample)
        if len(chunk) == batch_size:
            flush()
    if chunk:
        flush()
    bar.close()
    return results, metadata


def joint_difference(shard_joints: list[str], model_joints: list[str]) -> str:
    """Where two joint lists first differ, e.g. "joint 0 is 'left_ankle' in the shards but 'right_ankle' in the
    model", after their counts when those differ."""
    k = next(i for i in range(max(len(shard_joints), len(model_joints)))
             if i >= len(shard_joints) or i >= len(model_joints) or shard_joints[i] != model_joints[i])

    def name(joints: list[str]) -> str:
        return repr(joints[k]) if k < len(joints) else "(none)"

    counts = f"{len(shard_joints)} joints, the model {len(model_joints)}: " if len(shard_joints) != len(model_joints) else ""
    return f"{counts}joint {k} is {name(shard_joints)} in the shards but {name(model_joints)} in the model"


def describe_eval(cfg: EvalConfig, modules: int) -> str:
    chosen = ", ".join(str(m) for m in cfg.modules) if cfg.modules else str(modules)
    decoding = f"DARK decoding (kernel {cfg.dark_kernel})" if cfg.dark_kernel else "quarter-pixel decoding"
    scales = "one scale" if list(cfg.scales) == [1.0] else "zooms " + ", ".join(f"{s:g}" for s in cfg.scales)
    return f"flip test {'on' if cfg.flip else 'off'}, {scales}, heatmaps of module {chosen}, {decoding}"


def parse_modules(text: str | None, count: int) -> list[int] | None:
    """--modules "6,7,8" -> [6, 7, 8], checked against the model's `count` modules; None: the run's eval.modules."""
    if not text:
        return None
    try:
        modules = [int(m) for m in text.split(",")]
    except ValueError:
        raise ValueError(f"--modules {text}: expected module numbers, e.g. 6,7,8") from None
    if not all(1 <= m <= count for m in modules):
        raise ValueError(f"--modules {text}: the model has modules 1..{count}")
    return modules


@dataclass(frozen=True)
class EvalOptions:
    """How `mshg evaluate` evaluates: the run's eval settings with its flags over them (None: the run's)."""
    batch_size: int = 16  # validation crops (or photographs) a batch
    device: str = "auto"
    flip: bool = True  # False: without the flip test, whatever eval.flip says
    modules: str | None = None  # "6,7,8": decode from the mean of these modules' heatmaps
    dark_kernel: int | None = None
    scales: list[float] | None = None
    photos: str | None = None  # "boxes" | "bare": `mshg predict`'s path on the photographs, not the validation crops
    passes: int | None = None  # with photos="bare": the passes of the coarse-to-fine search
    accurate: bool = False  # with photos="bare": `mshg predict --accurate`'s search

    def applied(self, cfg: EvalConfig, modules: int) -> EvalConfig:
        """The run's eval settings with these flags over them; `modules`: how many the model has."""
        chosen = parse_modules(self.modules, modules)
        return dataclasses.replace(cfg, flip=cfg.flip and self.flip, modules=chosen or cfg.modules,
                                   dark_kernel=cfg.dark_kernel if self.dark_kernel is None else self.dark_kernel,
                                   scales=self.scales or cfg.scales)


def evaluate(checkpoint: str, shards_dir: str, options: EvalOptions = EvalOptions(), out: str | None = None,
             sheet: str | None = None) -> int:
    """`mshg evaluate`: one process, the validation crop (or, with options.photos, `mshg predict`'s path on the
    photographs) over every sample of a shard set; the metric printed, and written to `out` as JSON; `sheet`: a
    contact sheet of the first crops. Exit status 0, or 1 when the metric is not a number."""
    from pipeline.data import build_loader
    if options.photos and sheet:
        raise ValueError("--sheet draws the validation crops: leave out --photos")
    torch_device = inference_device(options.device)
    model, record = load_trained(checkpoint, torch_device)
    shards = ShardSet.open(shards_dir)
    if shards.joints != record.joints:  # by name: the same count in another order would score silently wrong
        raise ValueError(f"{shards_dir}: its joints are not the model's ({joint_difference(shards.joints, record.joints)}); "
                         f"evaluate on shards of the joint set the model was trained on")
    metric = metric_for(shards)
    eval_cfg = options.applied(record.config.eval, len(model.strides))
    cfg = dataclasses.replace(record.config, eval=eval_cfg)
    validate(cfg)  # the overrides too
    if options.photos:  # the photographs through `mshg predict`'s path, with the validation box or bare
        search = (ACCURATE if options.accurate else FAST).with_passes(options.passes)
        results, metadata = evaluate_photos(model, cfg, shards, options.photos == "boxes", options.batch_size, search)
        how = "mshg predict on the photographs, " + ("with each person box" if options.photos == "boxes" else
                                                     f"bare: no box, {search}")
    else:
        loader = build_loader(shards, cfg.data, batch_size=options.batch_size, train=False,
                              device_id=torch_device.index or 0 if torch_device.type == "cuda" else None)
        results = evaluate_loader(model, loader, eval_cfg, shards.flip_permutation(), keep_images=16 if sheet else 0)
        metadata = read_metadata(shards) if metric.needs_metadata else None
        how = "the validation crops"
        if sheet:
            grid = prediction_grid(results, tile=224, skeleton=shards.skeleton)
            if not cv2.imwrite(str(sheet), grid[..., ::-1]):
                raise SystemExit(f"--sheet {sheet}: could not write the image")
            print(f"contact sheet of {sum(r.image is not None for r in results.values())} crops -> {sheet}")
    if len(results) != shards.num_samples:
        raise SystemExit(f"evaluated {len(results)} samples but {shards_dir} holds {shards.num_samples}")
    metrics = summarise(results, shards, metadata)
    print(metric.format(metrics) + f"\n({how}; {describe_eval(eval_cfg, len(model.strides))})")
    if out:
        Path(out).write_text(json.dumps(metrics, indent=2))
    return 0 if math.isfinite(metrics["value"]) else 1


def main(args) -> int:
    """The command line's arguments (pipeline/cli.py's `evaluate` parser defines each) -> `evaluate`."""
    options = EvalOptions(batch_size=args.batch_size, device=args.device, flip=not args.no_flip, modules=args.modules,
                          dark_kernel=args.dark_kernel, scales=args.scales, photos=args.photos, passes=args.passes,
                          accurate=args.accurate)
    return evaluate(args.checkpoint, args.shards, options, out=args.out, sheet=args.sheet)
