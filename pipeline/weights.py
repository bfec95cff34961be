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

from pipeline.config import Config, config_from_yaml

WEIGHTS_FILE = "model.safetensors"


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path, cfg: Config, joints: list[str],
                 flip_pairs: list[list[int]]) -> Path:
    path = Path(path)
    tensors = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.contiguous().cpu()
               for k, v in state_dict.items()}
    meta = {"config": OmegaConf.to_yaml(OmegaConf.structured(cfg)), "joints": json.dumps(joints),
            "flip_pairs": json.dumps(flip_pairs)}
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
    from pipeline.model import build_model

    path = resolve(checkpoint)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta or "joints" not in meta:
        raise ValueError(f"{path}: not an mshg weights file (metadata lacks config/joints)")
    cfg = config_from_yaml(meta["config"], source=str(path))
    joints = json.loads(meta["joints"])
    model = build_model(cfg.model, len(joints), cfg.data.input_size)
    model.load_state_dict(load_file(str(path), device=str(device)))
    model.to(device).eval()
    return model, cfg, {"joints": joints, "flip_pairs": json.loads(meta["flip_pairs"])}


def export_zero_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """A DeepSpeed checkpoint (any ZeRO stage, any number of ranks) -> fp32 safetensors at `out`, with
    the run's config, joints and flip pairs (from the tag's meta.json) as metadata: the file that
    `mshg evaluate/predict` load. `checkpoint`: runs/NAME, runs/NAME/checkpoints (its `latest`), or
    runs/NAME/checkpoints/TAG. Weights only, BatchNorm running statistics included (DeepSpeed saves
    the buffers with the module; zero_to_fp32 puts them back); every key of the model must be there.
    DeepSpeed's files are pickles: export only checkpoints you (or your cluster) wrote."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.checkpoint import META, resolve_checkpoint
    from pipeline.model import build_model

    directory, tag = resolve_checkpoint(checkpoint)
    meta_path = directory / tag / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing (a checkpoint written by pipeline.train has it)")
    meta = json.loads(meta_path.read_text())
    cfg = config_from_yaml(meta["config"], source=str(meta_path))
    state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    expected = build_model(cfg.model, len(meta["joints"]), cfg.data.input_size).state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{directory / tag}: does not match the model of its config "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return save_weights(state, out, cfg, meta["joints"], meta["flip_pairs"])
