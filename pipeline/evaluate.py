"""Decoding heatmaps into keypoints, mapping them back to the original image, and the metrics.

`mshg evaluate --checkpoint runs/NAME --shards DIR` runs the validation crop (with the flip test
unless `--no-flip`) over a shard set and prints the metric of the dataset named in its manifest:

- LSP/LSPET: PCK@0.2, torso = left shoulder to right hip of the ground truth; persons whose torso
  joints are not both labelled are left out and counted.
- MPII: PCKh@0.5 as in the official evaluation script: a joint is correct when its distance to the
  truth is <= 0.5 x 0.6 x the head-box diagonal; the mean leaves out pelvis and thorax and weights
  joints by how often they are labelled. Persons without a head box are left out and counted.
- COCO: keypoint AP/AR from pycocotools' COCOeval (OKS), one prediction per ground-truth box,
  scored by its mean peak heatmap value.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from pipeline.config import EvalConfig, validate
from pipeline.distributed import gather_objects
from pipeline.inference import (ACCURATE, FAST, PhotoSearch, crop_to_original, image_from_bytes, inference_device,
                                predict_crops, predict_images)
from pipeline.plots import prediction_grid
from pipeline.weights import load_trained
from shards.datasets import LSP_JOINTS, MPII_JOINTS
from shards.format import ShardSet, read_photos

# pipeline.data (the DALI graph) is imported only where a loader is built, so that the metrics and decoding
# here import without DALI (tests/test_structure.py).

# LSP/LSPET joint order: 2 = right hip, 9 = left shoulder
TORSO_JOINTS = ("left_shoulder", "right_hip")  # PCK's torso size: from one to the other, by joint name
LSP_TORSO = tuple(LSP_JOINTS.index(name) for name in TORSO_JOINTS)  # (9, 2) in LSP order
MPII_HEAD_BIAS = 0.6  # SC_BIAS of the official MPII script: head size = 0.6 x head-box diagonal
MPII_NOT_IN_MEAN = ("pelvis", "thorax")  # as the official MPII script
MPII_EXCLUDED = tuple(MPII_JOINTS.index(name) for name in MPII_NOT_IN_MEAN)  # (6, 7) in MPII order
COCO_STATS = ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"]


def pck(pred: np.ndarray, gt: np.ndarray, torso: tuple[int, int] = LSP_TORSO, threshold: float = 0.2) -> dict:
    """PCK@threshold with torso normalisation. pred (N, J, >=2), gt (N, J, 3) with labelled flag.

    Returns mean PCK over labelled joints, per-joint PCK, and how many persons were left out
    because a torso joint is not labelled."""
    a, b = torso
    has_torso = (gt[:, a, 2] > 0) & (gt[:, b, 2] > 0)
    p, g = pred[has_torso], gt[has_torso]
    size = np.linalg.norm(g[:, a, :2] - g[:, b, :2], axis=-1)  # (N,)
    dist = np.linalg.norm(p[..., :2] - g[..., :2], axis=-1) / np.maximum(size, 1e-6)[:, None]
    labelled = g[..., 2] > 0
    correct = (dist <= threshold) & labelled
    per_joint = correct.sum(0) / np.maximum(labelled.sum(0), 1)
    mean = float(correct.sum() / max(labelled.sum(), 1))
    return {"pck": mean, "per_joint": per_joint.tolist(), "persons": int(has_torso.sum()),
            "left_out": int((~has_torso).sum())}


def pckh(pred: np.ndarray, gt: np.ndarray, head_boxes: np.ndarray, threshold: float = 0.5,
         excluded: tuple[int, ...] = MPII_EXCLUDED) -> dict:
    """PCKh@threshold as the official MPII script computes it. pred (N, J, >=2), gt (N, J, 3) with
    labelled flag, head_boxes (N, 4) x0, y0, w, h in the same pixels (NaN row: no head box).

    head size = 0.6 x ||(x2, y2) - (x1, y1)||; correct when distance / head size <= threshold;
    per joint over the persons where it is labelled; the mean over every labelled joint except
    `excluded` (pelvis, thorax), i.e. per-joint values weighted by their counts."""
    head_boxes = np.asarray(head_boxes, np.float64).reshape(len(gt), 4)
    has_head = np.isfinite(head_boxes).all(1) & (np.hypot(head_boxes[:, 2], head_boxes[:, 3]) > 0)
    p, g = pred[has_head], gt[has_head]
    size = MPII_HEAD_BIAS * np.hypot(head_boxes[has_head, 2], head_boxes[has_head, 3])
    dist = np.linalg.norm(p[..., :2] - g[..., :2], axis=-1) / size[:, None]
    labelled = g[..., 2] > 0
    correct = (dist <= threshold) & labelled
    per_joint = correct.sum(0) / np.maximum(labelled.sum(0), 1)
    keep = np.ones(g.shape[1], bool)
    keep[list(excluded)] = False
    mean = float(correct[:, keep].sum() / max(labelled[:, keep].sum(), 1))
    return {"pckh": mean, "per_joint": per_joint.tolist(), "persons": int(has_head.sum()),
            "left_out": int((~has_head).sum())}


def coco_keypoint_eval(pred: np.ndarray, gt: np.ndarray, metas: list[dict], joints: list[str],
                       oks_sigmas: list[float] | None = None) -> dict:
    """COCO keypoint AP/AR with pycocotools (not re-implemented). pred (N, J, 3): x, y in original
    pixels and a peak score; gt (N, J, 3) original pixels with v; metas: each sample's shard
    metadata (image_id, bbox, area). The ground truth is the shard set's persons; each prediction
    is scored by the mean of its peak values (the boxes are the ground-truth ones)."""
    if oks_sigmas is None and len(joints) != 17:
        raise ValueError(f"COCO OKS needs per-joint sigmas for {len(joints)} joints (the manifest's oks_sigmas)")
    images, annotations, detections = {}, [], []
    for k, (p, g, m) in enumerate(zip(pred, gt, metas)):
        image_id = int(m.get("image_id", m.get("idx", k)))
        images[image_id] = {"id": image_id}
        box = [float(v) for v in m["bbox"]]
        area = m.get("area") or box[2] * box[3]
        labelled = g[:, 2] > 0
        kps = np.concatenate([g[:, :2], np.where(labelled, 2.0, 0.0)[:, None]], 1)
        kps[~labelled, :2] = 0.0
        annotations.append({"id": k + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                            "bbox": box, "area": float(area), "num_keypoints": int(labelled.sum()),
                            "keypoints": kps.ravel().tolist()})
        detections.append({"image_id": image_id, "category_id": 1, "keypoints": np.asarray(p[:, :3], np.float64).ravel().tolist(),
                           "score": float(np.mean(p[:, 2]))})
    coco = COCO()
    coco.dataset = {"images": list(images.values()), "annotations": annotations,
                    "categories": [{"id": 1, "name": "person", "keypoints": list(joints), "skeleton": []}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        dt = coco.loadRes(detections)
        ev = COCOeval(coco, dt, "keypoints")
        if oks_sigmas is not None:
            ev.params.kpt_oks_sigmas = np.asarray(oks_sigmas, np.float64)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {name: float(v) for name, v in zip(COCO_STATS, ev.stats)}
    return {"ap": stats["AP"], "stats": stats, "persons": len(annotations), "left_out": 0}


@dataclass
class SampleResult:
    """One validation sample: prediction (J, 3: x, y, score) and ground truth (J, 3: x, y, labelled)
    in crop coordinates, the 2x3 crop matrix, and the uint8 crop when kept for the prediction grid."""
    pred: np.ndarray
    gt: np.ndarray
    matrix: np.ndarray
    image: np.ndarray | None = None


@torch.no_grad()
def evaluate_loader(model: torch.nn.Module, loader, device: torch.device, cfg: EvalConfig,
                    flip_perm: list[int], keep_images: int = 0, progress: bool = True) -> dict[int, SampleResult]:
    """This rank's validation results by sample id; the crop is kept for the `keep_images` smallest
    sample ids this rank saw (the prediction grid of each evaluation shows these fixed images).
    The one evaluation of the project: training's evaluations and `mshg evaluate` both call it, in
    fp32, with the flip test unless `eval.flip=false`, decoded from `eval.modules`.

    A validation crop is a similarity transform of the image, so PCK (a ratio of distances) is the
    same in crop and in original coordinates; PCKh and COCO AP map back with the matrix.
    progress: a bar over the batches on stderr when it is a terminal (training's evaluations go without)."""
    from pipeline.data import unpack

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


def evaluate_shards(model: torch.nn.Module, shards, cfg, batch_size: int, world, device_id: int | None,
                    keep_images: int = 8) -> dict[int, SampleResult] | None:
    """Training's evaluation: every rank predicts its part of `shards` (DALI's validation crops); rank 0
    gets everyone's results (the crops of the `keep_images` smallest ids kept for the prediction grid),
    the other ranks None."""
    from pipeline.data import build_loader
    loader = build_loader(shards, cfg.data, batch_size, train=False, rank=world.rank, world_size=world.size,
                          device_id=device_id)
    results = evaluate_loader(model, loader, world.device, cfg.eval, shards.flip_permutation(),
                              keep_images=keep_images if world.is_main else 0, progress=False)
    merged = {}
    for part in gather_objects(results, world):
        merged.update(part)
    return merged if world.is_main else None


class Validation:
    """Training's evaluations of data.val_shards: `evaluate_shards` on every rank, then rank 0 computes the
    dataset's metric and logs it, with the prediction grid of the fixed preview images, to MLflow.
    The learning curve is measured at one scale: each of eval.scales is another pass over the validation
    set, on the training clock. The final evaluation adds one with eval.scales, as `mshg evaluate` makes it."""

    def __init__(self, shards, cfg, batch_size: int, world, device_id: int | None, tracker, log):
        self.shards, self.cfg, self.batch_size, self.world, self.device_id = shards, cfg, batch_size, world, device_id
        self.curve_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, scales=[1.0]))
        self.tracker, self.log = tracker, log

    def run(self, model: torch.nn.Module, step: int, minutes: float, final: bool = False) -> dict | None:
        """The metrics on rank 0 (the final run's: with eval.scales), None on the other ranks."""
        merged = evaluate_shards(model, self.shards, self.curve_cfg, self.batch_size, self.world, self.device_id)
        metrics = self.report(merged, "")
        if merged is not None:
            self.tracker.log_metrics({**tracked_metrics(metrics, self.shards.joints), "minutes": minutes}, step)
            self.tracker.log_image(prediction_grid(merged, skeleton=self.shards.skeleton),
                                   f"predictions/step_{step:06d}.png")
        if final and self.cfg.eval.scales != [1.0]:
            merged = evaluate_shards(model, self.shards, self.cfg, self.batch_size, self.world, self.device_id)
            metrics = self.report(merged, f"with the multi-scale test (eval.scales {self.cfg.eval.scales}): ")
        return metrics

    def report(self, merged: dict | None, label: str) -> dict | None:
        if merged is None:
            return None
        metrics = summarise(merged, self.shards)
        if len(merged) != self.shards.num_samples:
            self.log(f"warning: evaluated {len(merged)} of {self.shards.num_samples} validation samples")
        self.log(label + format_pck(metrics, self.shards.joints))
        return metrics


def metric_kind(dataset: str, oks_sigmas=()) -> str:
    """The metric a dataset is reported with: pckh (MPII), pck (LSP/LSPET), coco (COCO and every
    COCO-format set, whose manifest carries OKS sigmas); pck otherwise."""
    name = str(dataset).lower()
    if name in ("mpii", "coco", "lsp", "lspet"):
        return {"mpii": "pckh", "coco": "coco"}.get(name, "pck")
    return "coco" if oks_sigmas else "pck"


_METADATA_CACHE: dict[tuple, dict[int, dict]] = {}


def read_metadata(shards) -> dict[int, dict]:
    """Each sample's JSON metadata of a shard set, by sample id (what DALI does not carry: head
    box, COCO image id, area, ...), read straight from the tars (once per process and shard set)."""
    key = tuple((t, os.path.getmtime(t)) for t in shards.tars)
    if key in _METADATA_CACHE:
        return _METADATA_CACHE[key]
    metas = {}
    for tar in shards.tars:
        with tarfile.open(tar) as t:
            for member in t:
                if member.name.endswith(".json"):
                    meta = json.loads(t.extractfile(member).read())
                    metas[int(meta["idx"])] = meta
    _METADATA_CACHE[key] = metas
    return metas


def _to_original(points: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    xy = crop_to_original(torch.from_numpy(np.ascontiguousarray(points[..., :2])).double(),
                          torch.from_numpy(np.ascontiguousarray(matrices))).double().numpy()
    return np.concatenate([xy, points[..., 2:]], -1)


def summarise(results: dict[int, tuple], shards=None, metadata: dict[int, dict] | None = None) -> dict:
    """Results of `evaluate_loader` (all ranks merged) -> the dataset's metric. Every kind returns
    `metric` (its name as tracked), `value`, `per_joint` (empty for COCO), `persons`, `left_out`,
    `samples`; PCK also keeps its old key `pck`."""
    ids = sorted(results)
    pred = np.stack([results[i].pred for i in ids])
    gt = np.stack([results[i].gt for i in ids])
    kind = metric_kind(shards.dataset, getattr(shards, "oks_sigmas", ())) if shards is not None else "pck"
    joints = list(getattr(shards, "joints", LSP_JOINTS))
    if kind == "pck":
        out = pck(pred, gt, joint_indices(joints, TORSO_JOINTS, "PCK's torso"))
        out.update(metric="pck", value=out["pck"])
    else:
        metadata = metadata if metadata is not None else read_metadata(shards)
        matrices = np.stack([results[i].matrix for i in ids])
        pred_o, gt_o = _to_original(pred, matrices), _to_original(gt, matrices)
        if kind == "pckh":
            heads = np.array([metadata[i].get("head_box") or [np.nan] * 4 for i in ids], np.float64)
            out = pckh(pred_o, gt_o, heads, excluded=joint_indices(joints, MPII_NOT_IN_MEAN, "PCKh's mean"))
            out.update(metric="pckh", value=out["pckh"])
        else:
            out = coco_keypoint_eval(pred_o, gt_o, [metadata[i] for i in ids], shards.joints,
                                     getattr(shards, "oks_sigmas", ()) or None)
            out.update(metric="coco/AP", value=out["ap"], per_joint=[])
    out["kind"] = kind
    out["samples"] = len(ids)
    return out


def joint_indices(joints: list[str], names: tuple[str, ...], what: str) -> tuple[int, ...]:
    """The indices of joints named `names` in a dataset's joint list, or a clear error."""
    missing = [n for n in names if n not in joints]
    if missing:
        raise ValueError(f"{what} needs joints {list(names)}; the dataset's joints {joints} lack {missing}")
    return tuple(joints.index(n) for n in names)


def headline(metrics: dict) -> str:
    """One line such as `PCK@0.2 = 71.3`."""
    label = {"pck": "PCK@0.2", "pckh": "PCKh@0.5", "coco": "COCO AP"}[metrics.get("kind", "pck")]
    return f"{label} = {100 * metrics.get('value', metrics.get('pck')):.1f}"


def tracked_metrics(metrics: dict, joints: list[str]) -> dict[str, float]:
    """What MLflow gets per evaluation: the headline metric and its per-joint (or COCO) parts."""
    name = metrics.get("metric", "pck")
    out = {name: metrics.get("value", metrics.get("pck"))}
    out.update({f"{name}/{j}": v for j, v in zip(joints, metrics.get("per_joint", []))})
    out.update({f"coco/{k}": v for k, v in metrics.get("stats", {}).items()})
    return out


def format_pck(metrics: dict, joints: list[str]) -> str:
    """The evaluation as text (any metric kind; the name is historical)."""
    kind = metrics.get("kind", "pck")
    why = {"pck": " without both torso joints", "pckh": " without a head box", "coco": ""}[kind]
    lines = [f"{headline(metrics)}  ({metrics['persons']} persons, "
             f"{metrics['left_out']} left out{why}, {metrics['samples']} samples)"]
    if kind == "coco":
        lines += [f"  {k:>5s}: {100 * v:5.1f}" for k, v in metrics["stats"].items()]
    else:
        excluded = MPII_NOT_IN_MEAN if kind == "pckh" else ()
        lines += [f"  {name:>12s}: {100 * v:5.1f}" + ("  (not in the mean)" if name in excluded else "")
                  for name, v in zip(joints, metrics["per_joint"])]
    return "\n".join(lines)


class Photo(NamedTuple):
    idx: int  # the sample id
    image: np.ndarray  # RGB, as shipped
    keypoints: np.ndarray  # (J, 3) in original pixels
    box: list  # the person box (x0, y0, w, h)


def photo_samples(shards):
    """Every photograph of a shard set, decoded; an undecodable one is an error naming its tar and key."""
    for tar in shards.tars:
        for where, idx, data, keypoints, box in read_photos(tar):
            yield Photo(idx, image_from_bytes(data, where), keypoints, box)


def evaluate_photos(model, cfg, shards, boxes: bool, flip_perm: list[int] | None, batch_size: int = 16,
                    search: PhotoSearch = FAST) -> dict[int, SampleResult]:
    """`mshg predict` on the shard set's photographs, scored against their annotation: with each person's box
    (the validation box rule, `--boxes`), or bare (no box: pipeline.inference's coarse-to-fine rule,
    `predict_images`). Results in original pixels (an identity matrix), for `summarise`."""
    results: dict[int, SampleResult] = {}
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
        chunk.append(sample)
        if len(chunk) == batch_size:
            flush()
    if chunk:
        flush()
    bar.close()
    return results


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


def main(args) -> int:
    """`mshg evaluate`: one process, the validation crop over every sample of a shard set."""
    from pipeline.data import build_loader
    device = inference_device(getattr(args, "device", "auto"))
    model, cfg, meta = load_trained(args.checkpoint, device)
    shards = ShardSet.open(args.shards)
    if shards.joints != meta["joints"]:  # by name: the same count in another order would score silently wrong
        raise ValueError(f"{args.shards}: its joints are not the model's ({joint_difference(shards.joints, meta['joints'])}); "
                         f"evaluate on shards of the joint set the model was trained on")
    eval_cfg = dataclasses.replace(cfg.eval, flip=cfg.eval.flip and not getattr(args, "no_flip", False))
    if getattr(args, "modules", None):
        try:
            modules = [int(m) for m in args.modules.split(",")]
        except ValueError:
            raise ValueError(f"--modules {args.modules}: expected module numbers, e.g. 6,7,8") from None
        if not all(1 <= m <= len(model.strides) for m in modules):
            raise ValueError(f"--modules {args.modules}: the model has modules 1..{len(model.strides)}")
        eval_cfg = dataclasses.replace(eval_cfg, modules=modules)
    if getattr(args, "dark_kernel", None) is not None:
        eval_cfg = dataclasses.replace(eval_cfg, dark_kernel=args.dark_kernel)
    if getattr(args, "scales", None):
        eval_cfg = dataclasses.replace(eval_cfg, scales=args.scales)
    cfg = dataclasses.replace(cfg, eval=eval_cfg)
    validate(cfg)  # the overrides too
    photos = getattr(args, "photos", None)
    if photos and getattr(args, "sheet", None):
        raise ValueError("--sheet draws the validation crops: leave out --photos")
    if photos:  # the photographs through `mshg predict`'s path, with the validation box or bare
        flip = shards.flip_permutation() if eval_cfg.flip else None
        search = (ACCURATE if getattr(args, "accurate", False) else FAST).with_passes(getattr(args, "passes", None))
        results = evaluate_photos(model, cfg, shards, photos == "boxes", flip, args.batch_size, search)
        how = "mshg predict on the photographs, " + ("with each person box" if photos == "boxes" else
                                                     f"bare: no box, {search}")
    else:
        loader = build_loader(shards, cfg.data, batch_size=args.batch_size, train=False,
                              device_id=device.index or 0 if device.type == "cuda" else None)
        sheet = getattr(args, "sheet", None)
        results = evaluate_loader(model, loader, device, eval_cfg, shards.flip_permutation(),
                                  keep_images=16 if sheet else 0)
        how = "the validation crops"
        if sheet:
            grid = prediction_grid(results, tile=224, skeleton=shards.skeleton)
            if not cv2.imwrite(str(sheet), grid[..., ::-1]):
                raise SystemExit(f"--sheet {sheet}: could not write the image")
            print(f"contact sheet of {sum(r.image is not None for r in results.values())} crops -> {sheet}")
    metrics = summarise(results, shards)
    if len(results) != shards.num_samples:
        raise SystemExit(f"evaluated {len(results)} samples but {args.shards} holds {shards.num_samples}")
    print(format_pck(metrics, shards.joints) + f"\n({how}; {describe_eval(eval_cfg, len(model.strides))})")
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2))
    return 0 if math.isfinite(metrics["value"]) else 1
