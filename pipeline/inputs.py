"""What the model is given, without DALI: normalised images, crop geometry, joints after a flip, and one
training batch's (input, heatmaps, weights). Used by the trainer, `show-batch`, the benchmarks, evaluation,
`mshg predict` and the ONNX export (which then run where DALI is not installed).

Coordinates: crops use *continuous* coordinates, where pixel i covers [i, i+1) (DALI's convention);
shards and predictions use 0-based pixel-index coordinates (hence the +0.5 / -0.5 at the boundary).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from pipeline.targets import make_targets, swap_flipped
from shards.format import MIN_BOX_SIDE

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def to_model_input(images: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """uint8 (B, H, W, 3) RGB -> normalised float32 (B, 3, H, W) on the images' device. The permuted
    view keeps the HWC memory order, i.e. channels_last: every convolution then runs NHWC, which
    oneDNN and cuDNN run fastest (the weights may stay NCHW, as DeepSpeed keeps them).
    channels_last=False makes it NCHW-contiguous."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGE_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x if channels_last else x.contiguous()


class TrainingInputs(NamedTuple):
    x: torch.Tensor  # the normalised images (B, 3, S, S)
    keypoints: torch.Tensor  # (B, J, 3) in crop coordinates, joints relabelled after flips
    heatmaps: dict[int, torch.Tensor]  # stride -> (B, J, S/stride, S/stride)
    weights: torch.Tensor  # (B, J): 1 for a labelled joint inside the crop


def training_inputs(batch: dict[str, torch.Tensor], flip_perm: list[int], input_size: int, strides: list[int],
                    sigma: float, channels_last: bool = True) -> TrainingInputs:
    """One loader batch (image uint8 HWC, keypoints in crop coordinates, flip flags) -> the model's input,
    the relabelled joints, the heatmap targets at every stride and the joint weights."""
    keypoints = swap_flipped(batch["keypoints"], batch["flip"], flip_perm)
    heatmaps, weights = make_targets(keypoints, input_size, strides, sigma)
    return TrainingInputs(to_model_input(batch["image"], channels_last), keypoints, heatmaps, weights)


def crop_matrix(box, input_size: int, padding: float) -> np.ndarray:
    """The validation crop as a 2x3 matrix in continuous coordinates: the box's centre to the crop's,
    its longer side times `padding` to the crop's side. The DALI pipeline builds the same one with
    fn.transforms (tests hold the two equal); `mshg predict` crops photos with it."""
    return augment_matrix(box, input_size, padding)


def augment_matrix(box, input_size: int, padding: float, scale: float = 1.0, angle: float = 0.0,
                   flip: bool = False) -> np.ndarray:
    """The pipeline's 2x3 matrix in numpy (continuous coordinates, source -> crop): translate the box
    centre to the origin, zoom (divided by `scale`; x negated for a flip), rotate by `angle` degrees
    ([[cos, -sin], [sin, cos]], clockwise on screen since y points down), move to the crop centre.
    With scale 1, angle 0 and no flip it is `crop_matrix`."""
    x0, y0, w, h = [float(v) for v in box]
    # a box of one point (a person with one labelled joint) would divide by 0: its side clamped, as DALI's is
    zoom = input_size / (max(w, h, MIN_BOX_SIDE) * padding) / scale
    cx, cy = x0 + w / 2 + 0.5, y0 + h / 2 + 0.5
    a = math.radians(angle)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    lin = rot @ np.diag([-zoom if flip else zoom, zoom])
    return np.concatenate([lin, (np.array([input_size / 2] * 2) - lin @ [cx, cy])[:, None]], 1).astype(np.float32)


def joint_map(model_joints: list[str], set_joints: list[str], names: dict[str, str], where: str) -> list[int]:
    """For each model joint, the index of the set's joint it is (by `names`, else by the same name), or
    -1 when the set does not label it."""
    bad = sorted(set(names) - set(model_joints)) + sorted(set(names.values()) - set(set_joints))
    if bad:
        raise ValueError(f"{where}: joints {bad} are not among the model's {model_joints} / the set's {set_joints}")
    index = {n: i for i, n in enumerate(set_joints)}
    out = [index.get(names.get(j, j), -1) for j in model_joints]
    if max(out) < 0:
        raise ValueError(f"{where}: none of the set's joints {set_joints} maps onto the model's {model_joints}; "
                         f"map them with data.extra_sets[].joints (model joint: set joint)")
    return out
