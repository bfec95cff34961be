"""What a trained model predicts and how it is fed, in one record: the resolved config, the joint names, the
left/right flip pairs, the skeleton, the input size and the stride of the heatmaps it is read from.

    record = ModelRecord.of(cfg, shards)          # a run: its config and its training shards' joints
    record.fields()                               # JSON values: a checkpoint's meta.json
    record.metadata()                             # strings: safetensors, ONNX metadata_props, MLflow's model
    ModelRecord.read(meta, source)                # back from either

Written once, read by every place that carries a model: the weights file (pipeline.weights), a checkpoint's
meta.json (pipeline.checkpoint), the ONNX export (pipeline.export) and the MLflow model (pipeline.track).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from pipeline.config import Config, config_from_yaml, config_yaml
from shards.datasets import skeleton_for
from shards.format import ShardSet, flip_permutation


@dataclass(frozen=True)
class ModelRecord:
    config: Config
    joints: list[str]
    flip_pairs: list[list[int]]
    skeleton: list[list[int]]  # the limbs drawn between joints (index pairs)

    @classmethod
    def of(cls, cfg: Config, shards: ShardSet) -> ModelRecord:
        """A run's record: its config, and the joints of the shards it trains on (the model's joints)."""
        return cls(cfg, list(shards.joints), [list(p) for p in shards.flip_pairs], [list(p) for p in shards.skeleton])

    @property
    def input_size(self) -> int:
        return self.config.data.input_size

    @property
    def stride(self) -> int:
        """Of the last module's heatmaps: the ones every prediction is decoded from."""
        return int(self.config.model.stages[-1][0])

    def flip_permutation(self) -> list[int]:
        return flip_permutation(len(self.joints), self.flip_pairs)

    def fields(self) -> dict:
        """JSON values: the config as YAML, the lists as lists."""
        return {"config": config_yaml(self.config), "joints": list(self.joints), "flip_pairs": self.flip_pairs,
                "skeleton": self.skeleton, "input_size": self.input_size, "stride": self.stride}

    def metadata(self) -> dict[str, str]:
        """The same as strings (JSON text), the form safetensors, ONNX and MLflow keep metadata in."""
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.fields().items()}

    @classmethod
    def read(cls, meta: dict, source: str) -> ModelRecord:
        """Back from `fields()` (meta.json) or `metadata()` (a weights file), other keys ignored. A file written
        without a skeleton gets the default one of its number of joints."""
        if "config" not in meta or "joints" not in meta:
            raise ValueError(f"{source}: not an mshg model (its metadata lacks config/joints)")

        def value(key: str, default):
            v = meta.get(key, default)
            return json.loads(v) if isinstance(v, str) else v

        joints = value("joints", [])
        skeleton = value("skeleton", []) or skeleton_for(len(joints))
        return cls(config_from_yaml(meta["config"], source=source), joints, value("flip_pairs", []),
                   [list(p) for p in skeleton])
