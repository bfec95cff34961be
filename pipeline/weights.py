"""Trained weights as one safetensors file that carries what is needed to use them.

`runs/NAME/model.safetensors` holds the fp32 state dict and, as its metadata, the model record
(pipeline.model_record: the resolved config, the joints, flip pairs and skeleton of the dataset it was
trained on, the input size and stride). safetensors never unpickles, so a downloaded file cannot run code.

Shipped models lie in pipeline/pretrained/ (NAME.safetensors, its model card NAME.md beside it):
`mshg predict` uses DEFAULT_MODEL when given no checkpoint, and `train.init_from=NAME` fine-tunes one.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from pipeline.checkpoint import META, resolve_checkpoint
from pipeline.model import build_model
from pipeline.model_record import ModelRecord

WEIGHTS_FILE = "model.safetensors"
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
DEFAULT_MODEL = "mshg-lspet-112"


def shipped_models() -> dict[str, Path]:
    """{name: weights file} of the models that come with the package."""
    return {p.stem: p for p in sorted(PRETRAINED_DIR.glob("*.safetensors"))}


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path, record: ModelRecord,
                 dtype: torch.dtype = torch.float32, card: dict | None = None) -> Path:
    """The weights (floating tensors as `dtype`: fp16 halves a shipped model) and their model record as
    metadata; `card`: the headline figures `mshg models` prints."""
    path = Path(path)
    tensors = {k: v.detach().to(dtype).contiguous().cpu() if v.is_floating_point() else v.contiguous().cpu()
               for k, v in state_dict.items()}
    meta = record.metadata()
    if card:
        meta["card"] = json.dumps(card)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)  # a reader never sees half a file
    return path


def resolve(checkpoint: str | Path | None) -> Path:
    """A shipped model's name (None: DEFAULT_MODEL), a run directory or a .safetensors file -> the weights file."""
    shipped = shipped_models()
    if checkpoint is None or str(checkpoint) in shipped:
        name = str(checkpoint or DEFAULT_MODEL)
        if name not in shipped:
            raise FileNotFoundError(f"the shipped model {name} is not installed in {PRETRAINED_DIR}")
        return shipped[name]
    p = Path(checkpoint)
    if p.is_dir():
        p = p / WEIGHTS_FILE
    if not p.is_file():
        names = ", ".join(shipped) or "none installed"
        raise FileNotFoundError(f"{checkpoint}: neither a shipped model ({names}) nor a run folder with "
                                f"{WEIGHTS_FILE} nor a weights file (train a run, or export one with `mshg export`)")
    return p


def metadata_of(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors' own error type: a file that is not safetensors at all
        raise ValueError(f"{path}: not a safetensors weights file ({e}); give a run directory or the "
                         f"model.safetensors that `mshg train` or `mshg export` wrote") from None


def describe_shipped(path: Path) -> str:
    """One line from a shipped model's metadata: joints, input size, what it was trained on and how it scores."""
    meta = metadata_of(path)
    record = ModelRecord.read(meta, str(path))
    card = json.loads(meta.get("card") or "{}")
    return (f"{len(record.joints)} joints, input {record.input_size} px, {path.stat().st_size / 1e6:.1f} MB; "
            + "; ".join(f"{k}: {v}" for k, v in card.items()))


def read_weights(checkpoint: str | Path | None, device: str | torch.device = "cpu"
                 ) -> tuple[dict[str, torch.Tensor], ModelRecord]:
    """-> (state dict in fp32, model record) of a shipped name, run folder or weights file; checked."""
    path = resolve(checkpoint)
    record = ModelRecord.read(metadata_of(path), str(path))
    # shipped models are stored in fp16 (half the download); the model always runs on fp32 weights
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path), device=str(device)).items()}
    return state, record


def load_trained(checkpoint: str | Path | None, device: str | torch.device = "cpu"
                 ) -> tuple[torch.nn.Module, ModelRecord]:
    """-> (model in eval mode, its record) of a shipped name, run folder or weights file."""
    state, record = read_weights(checkpoint, device)
    model = build_model(record.config.model, len(record.joints), record.input_size)
    model.load_state_dict(state)
    return model.to(device).eval(), record


# the parameters whose size is the number of joints: each heatmap head's rows, each merge conv's input columns
JOINT_AXES = {"heatmaps.weight": 0, "heatmaps.bias": 0, "merge_heatmaps": 1}


def joint_axis(key: str) -> int | None:
    return next((axis for part, axis in JOINT_AXES.items() if part in key), None)


def init_from(model: torch.nn.Module, source: str, joints: list[str]) -> str:
    """Fine-tuning's start: copy trained weights (a shipped name, run folder or weights file) into `model`, whose
    heads predict `joints`. Joints are matched by name; a joint the weights do not know keeps its fresh head
    (and merge column). Every other tensor must have the same shape: a different architecture or input size is
    refused naming the first layer that differs. -> a line saying what was matched."""
    state, trained = read_weights(source)
    old_joints = trained.joints
    index = [old_joints.index(j) if j in old_joints else None for j in joints]
    own = model.state_dict()
    for key, mine in own.items():
        theirs = state.get(key)
        axis = joint_axis(key)
        if theirs is None:
            raise ValueError(f"train.init_from={source}: the weights lack layer {key} {tuple(mine.shape)}: another "
                             f"architecture or input size (model.*, data.input_size) than the weights were trained with")
        expected = list(mine.shape)
        if axis is not None:
            expected[axis] = len(old_joints)
        if list(theirs.shape) != expected:
            raise ValueError(f"train.init_from={source}: layer {key} is {tuple(theirs.shape)} in the weights but "
                             f"{tuple(mine.shape)} in this model (model.*, data.input_size must match the weights')")
    extra = [k for k in state if k not in own]
    if extra:
        raise ValueError(f"train.init_from={source}: the weights have layer {extra[0]} that this model lacks: another "
                         f"architecture or input size (model.*, data.input_size) than the weights were trained with")
    with torch.no_grad():
        for key, mine in own.items():
            theirs, axis = state[key], joint_axis(key)
            if axis is None:
                mine.copy_(theirs)
                continue
            for new, old in enumerate(index):
                if old is not None:
                    mine.select(axis, new).copy_(theirs.select(axis, old))
    matched = [j for j, k in zip(joints, index) if k is not None]
    fresh = [j for j, k in zip(joints, index) if k is None]
    if not matched:
        raise ValueError(f"train.init_from={source}: none of the dataset's joints ({', '.join(joints[:5])}, ...) is "
                         f"among the weights' ({', '.join(old_joints[:5])}, ...): nothing to fine-tune from")
    return (f"initialised from {source}: {len(matched)} of {len(joints)} joints matched by name"
            + (f"; fresh heads for {', '.join(fresh)}" if fresh else ""))


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
    record = ModelRecord.read(json.loads(meta_path.read_text()), str(meta_path))
    source = next((directory / tag / f for f in ("ema.safetensors", "weights.safetensors")
                   if (directory / tag / f).is_file()), None)
    if source is None:
        raise FileNotFoundError(f"{directory / tag}: no weights.safetensors (written by pipeline.train since "
                                f"checkpoints are signed); DeepSpeed's pickles are not loaded for an export")
    try:
        state = {k: v for k, v in load_file(str(source)).items() if k != "n_averaged"}
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"{source}: not a readable safetensors file ({e})") from None
    expected = build_model(record.config.model, len(record.joints), record.input_size).state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{directory / tag}: does not match the model of its config "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return save_weights(state, out, record)


def ship_model(run: str | Path, name: str, card: dict) -> Path:
    """A run's trained weights -> pipeline/pretrained/NAME.safetensors in fp16 with the card's headline figures
    (the model card NAME.md beside it is written by hand). How the shipped model was made: its card."""
    state, record = read_weights(run)
    return save_weights(state, PRETRAINED_DIR / f"{name}.safetensors", record, dtype=torch.float16, card=card)
