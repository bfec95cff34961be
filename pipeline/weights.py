"""Trained weights as one safetensors file that carries what is needed to use them.

`runs/NAME/model.safetensors` holds the fp32 state dict and, in its metadata, the resolved config
(YAML) and the joint names and flip pairs of the dataset it was trained on. safetensors never
unpickles, so a downloaded file cannot run code.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, safe_open, save_file

from pipeline.checkpoint import META, resolve_checkpoint
from pipeline.config import Config, config_from_yaml
from pipeline.model import build_model
from shards.datasets import skeleton_for

WEIGHTS_FILE = "model.safetensors"


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path, cfg: Config, joints: list[str],
                 flip_pairs: list[list[int]], skeleton: list[list[int]] | None = None) -> Path:
    path = Path(path)
    tensors = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.contiguous().cpu()
               for k, v in state_dict.items()}
    meta = {"config": OmegaConf.to_yaml(OmegaConf.structured(cfg)), "joints": json.dumps(joints),
            "flip_pairs": json.dumps(flip_pairs), "skeleton": json.dumps(skeleton or [])}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)  # a reader never sees half a file
    return path


def resolve(checkpoint: str | Path) -> Path:
    """A run directory or a .safetensors file -> the weights file."""
    p = Path(checkpoint)
    if p.is_dir():
        p = p / WEIGHTS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{checkpoint}: no {WEIGHTS_FILE} (train a run, or export one with `mshg export`)")
    return p


def load_trained(checkpoint: str | Path, device: str | torch.device = "cpu"):
    """-> (model in eval mode, config, {"joints": [...], "flip_pairs": [...]})"""
    path = resolve(checkpoint)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors' own error type: a file that is not safetensors at all
        raise ValueError(f"{path}: not a safetensors weights file ({e}); give a run directory or the "
                         f"model.safetensors that `mshg train` or `mshg export` wrote") from None
    if "config" not in meta or "joints" not in meta:
        raise ValueError(f"{path}: not an mshg weights file (metadata lacks config/joints)")
    cfg = config_from_yaml(meta["config"], source=str(path))
    joints = json.loads(meta["joints"])
    model = build_model(cfg.model, len(joints), cfg.data.input_size)
    model.load_state_dict(load_file(str(path), device=str(device)))
    model.to(device).eval()
    skeleton = json.loads(meta.get("skeleton") or "[]") or skeleton_for(len(joints))
    return model, cfg, {"joints": joints, "flip_pairs": json.loads(meta["flip_pairs"]), "skeleton": skeleton}


def export_zero_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """A checkpoint of pipeline.train (any ZeRO stage, any number of ranks) -> fp32 safetensors at `out`,
    with the run's config, joints and flip pairs (from the tag's meta.json) as metadata: the file that
    `mshg evaluate/predict` load. `checkpoint`: runs/NAME, runs/NAME/checkpoints (its `latest`), or
    runs/NAME/checkpoints/TAG. It reads the tag's `ema.safetensors` (a run with train.ema_decay: the
    weight average is what the run evaluated) or `weights.safetensors`, never DeepSpeed's pickles, so
    exporting a checkpoint from anywhere runs no code. Every key of the model must be there."""
    directory, tag = resolve_checkpoint(checkpoint)
    meta_path = directory / tag / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing (a checkpoint written by pipeline.train has it)")
    meta = json.loads(meta_path.read_text())
    cfg = config_from_yaml(meta["config"], source=str(meta_path))
    source = next((directory / tag / f for f in ("ema.safetensors", "weights.safetensors")
                   if (directory / tag / f).is_file()), None)
    if source is None:
        raise FileNotFoundError(f"{directory / tag}: no weights.safetensors (written by pipeline.train since "
                                f"checkpoints are signed); DeepSpeed's pickles are not loaded for an export")
    try:
        state = {k: v for k, v in load_file(str(source)).items() if k != "n_averaged"}
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"{source}: not a readable safetensors file ({e})") from None
    expected = build_model(cfg.model, len(meta["joints"]), cfg.data.input_size).state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{directory / tag}: does not match the model of its config "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return save_weights(state, out, cfg, meta["joints"], meta["flip_pairs"], meta.get("skeleton"))
