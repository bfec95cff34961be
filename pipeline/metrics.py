"""The metrics, pure (numpy and pycocotools; no model, no data loading), and the one choice of the metric a
shard set is reported with (`metric_for`).

- PCK@0.2 (LSP/LSPET): torso = left shoulder to right hip of the ground truth; persons whose torso joints are
  not both labelled are left out and counted.
- PCKh@0.5 (MPII), as the official evaluation script: a joint is correct when its distance to the truth is
  <= 0.5 x 0.6 x the head-box diagonal; the mean leaves out pelvis and thorax and weights joints by how often
  they are labelled. Persons without a head box are left out and counted.
- COCO keypoint AP/AR (COCO and every COCO-format set, whose manifest carries OKS sigmas): pycocotools'
  COCOeval (OKS), one prediction per ground-truth box, scored by its mean peak heatmap value.

Each kind is one small class (`Metric`) that knows its name as tracked in MLflow, its label for text, its
per-joint parts and its text; `METRICS` lists them. A new metric is one class and one entry there.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from shards.datasets import LSP_JOINTS, MPII_JOINTS

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


def joint_indices(joints: list[str], names: tuple[str, ...], what: str) -> tuple[int, ...]:
    """The indices of joints named `names` in a dataset's joint list, or a clear error."""
    missing = [n for n in names if n not in joints]
    if missing:
        raise ValueError(f"{what} needs joints {list(names)}; the dataset's joints {joints} lack {missing}")
    return tuple(joints.index(n) for n in names)


class Metric:
    """One metric kind, bound to a shard set's joints. `score` gives the metric's own dict; `compute` adds
    `metric` (the name as tracked) and `value`. A result (what `compute` returns, plus `samples` from
    `pipeline.evaluate.summarise`) has `per_joint` (empty for COCO), `persons`, `left_out`."""
    name = ""  # as tracked in MLflow (the validation curve, `final/<name>`)
    label = ""  # for text: "PCK@0.2 = 71.3"
    datasets: tuple[str, ...] = ()  # the manifests' dataset names reported with it
    for_oks_sets = False  # the metric of any other set whose manifest carries OKS sigmas
    left_out_why = ""  # why a person is left out, for the text
    not_in_mean: tuple[str, ...] = ()  # joints shown per joint but left out of the mean
    needs_metadata = False  # scored in original pixels with each sample's JSON metadata (head box, image id)

    def __init__(self, joints: list[str], oks_sigmas: list[float] | None = None):
        self.joints = list(joints)
        self.oks_sigmas = list(oks_sigmas or [])

    def score(self, pred: np.ndarray, gt: np.ndarray, metas: list[dict] | None) -> tuple[dict, float]:
        """(the metric's dict, its headline value)."""
        raise NotImplementedError

    def compute(self, pred: np.ndarray, gt: np.ndarray, metas: list[dict] | None = None) -> dict:
        out, value = self.score(pred, gt, metas)
        out.setdefault("per_joint", [])
        out.update(metric=self.name, value=value)
        return out

    @classmethod
    def headline(cls, result: dict) -> str:
        """One line such as `PCK@0.2 = 71.3`."""
        return f"{cls.label} = {100 * result['value']:.1f}"

    def tracked(self, result: dict) -> dict[str, float]:
        """What MLflow gets per evaluation: the value and its per-joint parts."""
        out = {self.name: result["value"]}
        out.update({f"{self.name}/{j}": v for j, v in zip(self.joints, result["per_joint"])})
        return out

    def details(self, result: dict) -> list[str]:
        return [f"  {name:>12s}: {100 * v:5.1f}" + ("  (not in the mean)" if name in self.not_in_mean else "")
                for name, v in zip(self.joints, result["per_joint"])]

    def format(self, result: dict) -> str:
        """The evaluation as text: the headline, who counted, then the per-joint (or COCO) parts."""
        why = f" {self.left_out_why}" if self.left_out_why else ""
        return "\n".join([f"{self.headline(result)}  ({result['persons']} persons, {result['left_out']} left out"
                          f"{why}, {result['samples']} samples)"] + self.details(result))


class PCK(Metric):
    name, label, datasets, left_out_why = "pck", "PCK@0.2", ("lsp", "lspet"), "without both torso joints"

    def __init__(self, joints, oks_sigmas=None):
        super().__init__(joints, oks_sigmas)
        self.torso = joint_indices(self.joints, TORSO_JOINTS, "PCK's torso")

    def score(self, pred, gt, metas):
        out = pck(pred, gt, self.torso)
        return out, out["pck"]


class PCKh(Metric):
    name, label, datasets, left_out_why = "pckh", "PCKh@0.5", ("mpii",), "without a head box"
    not_in_mean, needs_metadata = MPII_NOT_IN_MEAN, True

    def __init__(self, joints, oks_sigmas=None):
        super().__init__(joints, oks_sigmas)
        self.excluded = joint_indices(self.joints, MPII_NOT_IN_MEAN, "PCKh's mean")

    def score(self, pred, gt, metas):
        heads = np.array([m.get("head_box") or [np.nan] * 4 for m in metas], np.float64)
        out = pckh(pred, gt, heads, excluded=self.excluded)
        return out, out["pckh"]


class CocoAP(Metric):
    name, label, datasets, for_oks_sets, needs_metadata = "coco/AP", "COCO AP", ("coco",), True, True

    def score(self, pred, gt, metas):
        out = coco_keypoint_eval(pred, gt, metas, self.joints, self.oks_sigmas or None)
        return out, out["ap"]

    def tracked(self, result):
        return {self.name: result["value"], **{f"coco/{k}": v for k, v in result["stats"].items()}}

    def details(self, result):
        return [f"  {k:>5s}: {100 * v:5.1f}" for k, v in result["stats"].items()]


METRICS: tuple[type[Metric], ...] = (PCK, PCKh, CocoAP)  # the first is the default
TRACKED_NAMES = tuple(kind.name for kind in METRICS)  # a run's validation metric is one of these


def metric_class(dataset: str, oks_sigmas=()) -> type[Metric]:
    """The metric a dataset is reported with: the one that names it, else the OKS metric when the manifest
    carries OKS sigmas (every COCO-format set), else the default (PCK)."""
    name = str(dataset).lower()
    named = next((kind for kind in METRICS if name in kind.datasets), None)
    if named is not None:
        return named
    return next((kind for kind in METRICS if kind.for_oks_sets), METRICS[0]) if oks_sigmas else METRICS[0]


def metric_for(shards) -> Metric:
    """The metric of a shard set (its manifest's dataset, joints and OKS sigmas); a ValueError when the set lacks
    joints the metric needs by name (PCK's torso, PCKh's pelvis and thorax)."""
    return metric_class(shards.dataset, shards.oks_sigmas)(shards.joints, shards.oks_sigmas)


def metric_named(name: str) -> type[Metric]:
    """The metric class of a result's `metric` (its tracked name)."""
    return next(kind for kind in METRICS if kind.name == name)


def headline(result: dict) -> str:
    """One line such as `PCK@0.2 = 71.3`, for any metric's result."""
    return metric_named(result["metric"]).headline(result)
