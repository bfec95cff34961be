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

import json
import math
from pathlib import Path

import numpy as np
import torch

# LSP/LSPET joint order: 2 = right hip, 9 = left shoulder
LSP_TORSO = (9, 2)
MPII_HEAD_BIAS = 0.6  # SC_BIAS of the official MPII script: head size = 0.6 x head-box diagonal
MPII_EXCLUDED = (6, 7)  # pelvis, thorax: not in the official mean
COCO_STATS = ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"]
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def to_model_input(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, H, W, 3) RGB -> normalised float (B, 3, H, W) on the images' device."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGE_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


def decode_heatmaps(heatmaps: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, J, H, W) -> (B, J, 3): x, y in continuous input-crop coordinates, and the peak score.

    Argmax, then a quarter-pixel shift towards the higher neighbour (Newell et al.)."""
    b, j, h, w = heatmaps.shape
    flat = heatmaps.float().reshape(b, j, -1)
    score, index = flat.max(-1)
    x = (index % w).float()
    y = torch.div(index, w, rounding_mode="floor").float()
    hm = heatmaps.float()
    xi, yi = x.long(), y.long()
    bi = torch.arange(b, device=hm.device)[:, None].expand(b, j)
    ji = torch.arange(j, device=hm.device)[None, :].expand(b, j)

    def at(yy, xx):
        return hm[bi, ji, yy.clamp(0, h - 1), xx.clamp(0, w - 1)]

    dx = torch.where((xi > 0) & (xi < w - 1), torch.sign(at(yi, xi + 1) - at(yi, xi - 1)), torch.zeros_like(x))
    dy = torch.where((yi > 0) & (yi < h - 1), torch.sign(at(yi + 1, xi) - at(yi - 1, xi)), torch.zeros_like(y))
    x = (x + 0.25 * dx + 0.5) * stride
    y = (y + 0.25 * dy + 0.5) * stride
    return torch.stack([x, y, score], -1)


def crop_to_original(points: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Continuous crop coordinates (B, J, 2) -> 0-based pixel coordinates of the original image,
    through the inverse of the 2x3 crop matrix (B, 2, 3) that made the crop."""
    full = torch.cat([matrix.double(), torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64,
                                                    device=matrix.device).expand(len(matrix), 1, 3)], 1)
    inv = torch.linalg.inv(full)[:, :2]
    xy = points.double() @ inv[:, :, :2].transpose(1, 2) + inv[:, None, :, 2]
    return (xy - 0.5).float()


def crop_matrix(box: np.ndarray, input_size: int, padding: float) -> np.ndarray:
    """The validation crop as a 2x3 matrix in continuous coordinates, the same one the DALI
    pipeline builds with fn.transforms (tests hold the two equal)."""
    x0, y0, w, h = [float(v) for v in box]
    zoom = input_size / (max(w, h) * padding)
    cx, cy = x0 + w / 2 + 0.5, y0 + h / 2 + 0.5
    return np.array([[zoom, 0, input_size / 2 - zoom * cx], [0, zoom, input_size / 2 - zoom * cy]], np.float32)


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


@torch.no_grad()
def crop_heatmaps(model: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype = torch.float32,
                  flip_perm: list[int] | None = None) -> torch.Tensor:
    """uint8 crops (B, S, S, 3) -> the last module's heatmaps (B, J, H, W), in float32.

    With `flip_perm` (the dataset's left/right permutation), the flip test: the mirrored crops go
    through the model too, their heatmaps are mirrored back, left and right joints swapped, and the
    two are averaged. Mirroring pixel i to S-1-i maps continuous x to S - x, and heatmap cell k
    (centre (k + 0.5) * stride) to cell W-1-k, so the two heatmaps line up without a shift."""
    x = to_model_input(images, dtype)
    heatmaps = model(x)[-1].float()
    if flip_perm is not None:
        flipped = model(torch.flip(x, dims=[3]))[-1].float()
        flipped = torch.flip(flipped, dims=[3])[:, list(flip_perm)]
        heatmaps = (heatmaps + flipped) * 0.5
    return heatmaps


@torch.no_grad()
def predict_crops(model: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype = torch.float32,
                  flip_perm: list[int] | None = None) -> torch.Tensor:
    """uint8 crops (B, S, S, 3) -> keypoints (B, J, 3) in crop coordinates, from the last module."""
    return decode_heatmaps(crop_heatmaps(model, images, dtype, flip_perm), model.strides[-1])


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


def coco_keypoint_eval(pred: np.ndarray, gt: np.ndarray, metas: list[dict], joints: list[str]) -> dict:
    """COCO keypoint AP/AR with pycocotools (not re-implemented). pred (N, J, 3): x, y in original
    pixels and a peak score; gt (N, J, 3) original pixels with v; metas: each sample's shard
    metadata (image_id, bbox, area). The ground truth is the shard set's persons; each prediction
    is scored by the mean of its peak values (the boxes are the ground-truth ones)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(joints) != 17:
        raise ValueError(f"COCO OKS needs the 17 COCO keypoints; this set has {len(joints)}")
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
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {name: float(v) for name, v in zip(COCO_STATS, ev.stats)}
    return {"ap": stats["AP"], "stats": stats, "persons": len(annotations), "left_out": 0}


@torch.no_grad()
def evaluate_loader(model: torch.nn.Module, loader, device: torch.device, dtype: torch.dtype = torch.float32,
                    flip_perm: list[int] | None = None, keep_images: int = 0) -> dict[int, tuple]:
    """This rank's validation results by sample id: (prediction, ground truth) in crop coordinates,
    the 2x3 crop matrix, and the uint8 crop for the `keep_images` smallest sample ids this rank saw
    (None for the others; the prediction grid of each evaluation shows these fixed images).

    A validation crop is a similarity transform of the image, so PCK (a ratio of distances) is the
    same in crop and in original coordinates; PCKh and COCO AP map back with the matrix."""
    from pipeline.data import unpack

    was_training = model.training
    model.eval()
    results, crops = {}, {}
    for batch in loader:
        b = unpack(batch, device)
        pred = predict_crops(model, b["image"], dtype, flip_perm).cpu().numpy()
        gt = b["keypoints"].cpu().numpy()
        matrix = b["matrix"].cpu().numpy()
        for i, sid in enumerate(b["sample_id"].view(-1).tolist()):
            results[sid] = (pred[i], gt[i], matrix[i], None)
            if keep_images:
                crops[sid] = b["image"][i].cpu().numpy()
                if len(crops) > keep_images:
                    crops.pop(max(crops))
    for sid, image in crops.items():
        results[sid] = results[sid][:3] + (image,)
    model.train(was_training)
    return results


def metric_kind(dataset: str) -> str:
    """The metric a dataset is reported with: pck (LSP/LSPET and unknown), pckh (MPII), coco."""
    return {"mpii": "pckh", "coco": "coco"}.get(str(dataset).lower(), "pck")


_METADATA_CACHE: dict[tuple, dict[int, dict]] = {}


def read_metadata(shards) -> dict[int, dict]:
    """Each sample's JSON metadata of a shard set, by sample id (what DALI does not carry: head
    box, COCO image id, area, ...), read straight from the tars (once per process and shard set)."""
    import os
    import tarfile

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
    pred = np.stack([results[i][0] for i in ids])
    gt = np.stack([results[i][1] for i in ids])
    kind = metric_kind(shards.dataset) if shards is not None else "pck"
    if kind == "pck":
        out = pck(pred, gt)
        out.update(metric="pck", value=out["pck"])
    else:
        metadata = metadata if metadata is not None else read_metadata(shards)
        matrices = np.stack([results[i][2] for i in ids])
        pred_o, gt_o = _to_original(pred, matrices), _to_original(gt, matrices)
        if kind == "pckh":
            heads = np.array([metadata[i].get("head_box") or [np.nan] * 4 for i in ids], np.float64)
            out = pckh(pred_o, gt_o, heads)
            out.update(metric="pckh", value=out["pckh"])
        else:
            out = coco_keypoint_eval(pred_o, gt_o, [metadata[i] for i in ids], shards.joints)
            out.update(metric="coco/AP", value=out["ap"], per_joint=[])
    out["kind"] = kind
    out["samples"] = len(ids)
    return out


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
        excluded = MPII_EXCLUDED if kind == "pckh" else ()
        lines += [f"  {name:>12s}: {100 * v:5.1f}" + ("  (not in the mean)" if j in excluded else "")
                  for j, (name, v) in enumerate(zip(joints, metrics["per_joint"]))]
    return "\n".join(lines)


def main(args) -> int:
    """`mshg evaluate`: one process, the validation crop over every sample of a shard set."""
    from pipeline.data import ShardSet, build_loader
    from pipeline.weights import load_trained

    model, cfg, meta = load_trained(args.checkpoint)
    shards = ShardSet.open(args.shards)
    if len(shards.joints) != len(meta["joints"]):
        raise SystemExit(f"{args.shards}: {len(shards.joints)} joints, but the model predicts {len(meta['joints'])}")
    loader = build_loader(shards, cfg.data, batch_size=args.batch_size, train=False)
    flip = None if getattr(args, "no_flip", False) else shards.flip_permutation()
    results = evaluate_loader(model, loader, torch.device("cpu"), flip_perm=flip)
    metrics = summarise(results, shards)
    if len(results) != shards.num_samples:
        raise SystemExit(f"evaluated {len(results)} samples but {args.shards} holds {shards.num_samples}")
    print(format_pck(metrics, shards.joints) + ("" if flip is None else "\n(flip test on)"))
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2))
    return 0 if math.isfinite(metrics["value"]) else 1
