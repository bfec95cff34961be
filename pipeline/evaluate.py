"""Decoding heatmaps into keypoints, mapping them back to the original image, and PCK.

`mshg evaluate --checkpoint runs/NAME --shards DIR` runs the validation crop over a shard set and
prints PCK@0.2 (LSP/LSPET: torso = left shoulder to right hip of the ground truth; persons whose
torso joints are not both labelled are left out and counted).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

# LSP/LSPET joint order: 2 = right hip, 9 = left shoulder
LSP_TORSO = (9, 2)
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
def predict_crops(model: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 crops (B, S, S, 3) -> keypoints (B, J, 3) in crop coordinates, from the last module."""
    heatmaps = model(to_model_input(images, dtype))[-1]
    return decode_heatmaps(heatmaps, model.strides[-1])


@torch.no_grad()
def evaluate_loader(model: torch.nn.Module, loader, device: torch.device, dtype: torch.dtype = torch.float32
                    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """This rank's validation predictions and ground truth in crop coordinates, by sample id.

    A validation crop is a similarity transform of the image, so PCK (a ratio of distances) is the
    same in crop and in original coordinates."""
    from pipeline.data import unpack

    was_training = model.training
    model.eval()
    results = {}
    for batch in loader:
        b = unpack(batch, device)
        pred = predict_crops(model, b["image"], dtype).cpu().numpy()
        gt = b["keypoints"].cpu().numpy()
        for i, sid in enumerate(b["sample_id"].view(-1).tolist()):
            results[sid] = (pred[i], gt[i])
    model.train(was_training)
    return results


def summarise(results: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict:
    ids = sorted(results)
    pred = np.stack([results[i][0] for i in ids])
    gt = np.stack([results[i][1] for i in ids])
    out = pck(pred, gt)
    out["samples"] = len(ids)
    return out


def format_pck(metrics: dict, joints: list[str]) -> str:
    lines = [f"PCK@0.2 = {100 * metrics['pck']:.1f}  ({metrics['persons']} persons, "
             f"{metrics['left_out']} left out without both torso joints, {metrics['samples']} samples)"]
    lines += [f"  {name:>12s}: {100 * v:5.1f}" for name, v in zip(joints, metrics["per_joint"])]
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
    results = evaluate_loader(model, loader, torch.device("cpu"))
    metrics = summarise(results)
    if len(results) != shards.num_samples:
        raise SystemExit(f"evaluated {len(results)} samples but {args.shards} holds {shards.num_samples}")
    print(format_pck(metrics, shards.joints))
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2))
    return 0 if math.isfinite(metrics["pck"]) else 1
