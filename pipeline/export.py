"""Trained weights -> ONNX: `mshg export --checkpoint runs/NAME --onnx model.onnx`.

The ONNX graph takes the normalised image `image` (B, 3, S, S) float32 (RGB, ImageNet mean/std, as
`data.to_model_input` makes it) and returns the last module's heatmaps `heatmaps` (B, J, S/s,
S/s), the ones every prediction is decoded from. The batch dimension is dynamic. The model's
metadata (`metadata_props`) carries the model record (config, joints, flip pairs, skeleton, input size,
stride), mean and std, so the file is usable without this code.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import onnx
from torch import nn

from pipeline.inputs import IMAGE_MEAN, IMAGE_STD
from pipeline.model_record import ModelRecord
from pipeline.weights import load_trained

OPSET = 17


class HeatmapModel(nn.Module):
    """PoseNet -> only its last module's heatmaps (what inference uses): one tensor out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.stride = int(model.strides[-1])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)[-1]


def onnx_metadata(record: ModelRecord) -> dict[str, str]:
    """The model record, and how the graph's input is made and its output read."""
    return {**record.metadata(), "mean": json.dumps(IMAGE_MEAN), "std": json.dumps(IMAGE_STD),
            "input": "RGB float32 (B, 3, S, S), (x / 255 - mean) / std", "output": "last-module heatmaps"}


def export_model_onnx(model: nn.Module, input_size: int, out_path: str | Path, metadata: dict[str, str] | None = None
                      ) -> Path:
    """An in-memory PoseNet (eval mode, CPU) -> ONNX file, checked by onnx.checker."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = HeatmapModel(model).eval()
    example = torch.zeros(1, 3, input_size, input_size)
    tmp = out_path.with_name(out_path.name + ".partial")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # dynamo=False: onnxscript is not a dependency
        torch.onnx.export(wrapped, (example,), str(tmp), input_names=["image"], output_names=["heatmaps"],
                          dynamic_axes={"image": {0: "batch"}, "heatmaps": {0: "batch"}}, opset_version=OPSET,
                          do_constant_folding=True, dynamo=False)
    proto = onnx.load(str(tmp))
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    tmp.replace(out_path)
    return out_path


def export_onnx(weights_path: str | Path, out_path: str | Path) -> Path:
    """A run directory or model.safetensors -> ONNX file of its last-module heatmaps."""
    model, record = load_trained(weights_path)
    return export_model_onnx(model, record.input_size, out_path, onnx_metadata(record))
