"""One typed config: dataclasses, filled from a YAML file, then `key=value` overrides.

    cfg = load_config("configs/msc_hg_cpu.yaml", ["train.max_steps=50", "model.channels=32"])

Unknown keys and wrong types are errors that name the key (OmegaConf structured configs);
cross-field rules (batch math, stage layout) are checked in `validate` before any rank starts work.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    # (stride, number of hourglass modules) per scale, in cascade order. MSC-HG: 2 modules at
    # input/2, 4 at input/4, 2 at input/8. Newell's stacked baseline: [[4, 8]].
    stages: list[list[int]] = field(default_factory=lambda: [[2, 2], [4, 4], [8, 2]])
    channels: int = 256
    hg_min_size: int = 4  # every hourglass halves its input until this side length


@dataclass
class DataConfig:
    train_shards: str = "runs/shards/lspet-train"  # a directory written by `mshg shard`
    val_shards: str = "runs/shards/lspet-val"
    input_size: int = 256
    padding: float = 1.25  # crop side = padding * max(box w, box h)
    # augmentation (train only; validation is the deterministic crop)
    scale_range: list[float] = field(default_factory=lambda: [0.75, 1.25])
    rotation_deg: float = 30.0
    rotation_prob: float = 0.6
    flip_prob: float = 0.5
    color_jitter: float = 0.2  # per-channel gains (R, G, B each) in [1 - j, 1 + j]
    # warp interpolation: linear | nn | auto (linear; nearest for training crops on a CPU, where DALI's
    # linear warp costs ~10x more, see docs/data.md)
    interp: str = "auto"
    region_decode: bool = True  # decode only the part of the image the crop can see (JPEG ROI decode)
    sigma: float = 2.0  # Gaussian sigma in heatmap pixels at stride 4, scaled with the stride
    num_threads: int = 2  # DALI CPU threads per rank
    shuffle_buffer: int = 256  # DALI `initial_fill`
    seed: int = 42


@dataclass
class StopConfig:
    """Convergence stop (the patent): smoothed loss reached `expected_loss` and stayed within
    `tolerance` (relative) over `window` steps. `max_steps`/`max_epochs` are hard limits."""
    expected_loss: float = 0.0  # 0 disables the convergence rule
    tolerance: float = 0.05
    window: int = 50
    smoothing: float = 0.9  # EMA factor for the smoothed loss
    max_steps: int = 1000
    max_epochs: int = 0  # 0: no epoch limit


@dataclass
class TrainConfig:
    run_name: str = ""  # default: <config name>-<timestamp>
    out_dir: str = "runs"
    micro_batch: int = 16  # per rank
    grad_accum: int = 1
    optimizer: str = "adam"  # adam | rmsprop (the stacked-hourglass reference recipe)
    lr: float = 2.5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine
    grad_clip: float = 1.0
    zero_stage: int = 2
    bf16: bool = False
    log_every: int = 1
    eval_every: int = 0  # steps; 0: evaluate at the end only
    checkpoint_every: int = 0  # steps; 0: checkpoint at the end only
    keep_checkpoints: int = 2
    experiment: str = "mshg"


@dataclass
class Config:
    name: str = "msc_hg"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stop: StopConfig = field(default_factory=StopConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    base = OmegaConf.structured(Config)
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            base = OmegaConf.merge(base, OmegaConf.load(path))
        if overrides:
            base = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg: Config = OmegaConf.to_object(base)
    validate(cfg)
    return cfg


def config_from_yaml(text: str, source: str = "<yaml>") -> Config:
    """A config saved with a run (e.g. in the weights file's metadata) back into the dataclasses."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e}") from None
    cfg: Config = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    m, d, t, s = cfg.model, cfg.data, cfg.train, cfg.stop
    if not m.stages or any(len(st) != 2 or st[0] not in (2, 4, 8) or st[1] < 1 for st in m.stages):
        raise ConfigError(f"model.stages must be [[stride, modules], ...] with stride 2, 4 or 8; got {m.stages}")
    strides = [st[0] for st in m.stages]
    if strides != sorted(strides):
        raise ConfigError(f"model.stages must go from fine to coarse strides; got {strides}")
    if d.input_size % 8 or d.input_size // max(strides) < m.hg_min_size:
        raise ConfigError(f"data.input_size={d.input_size} must be a multiple of 8 and leave at least "
                          f"model.hg_min_size={m.hg_min_size} pixels at stride {max(strides)}")
    if t.micro_batch < 1 or t.grad_accum < 1:
        raise ConfigError("train.micro_batch and train.grad_accum must be >= 1")
    if t.optimizer not in ("adam", "rmsprop"):
        raise ConfigError(f"train.optimizer must be adam or rmsprop; got {t.optimizer!r}")
    if t.lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"train.lr_schedule must be constant or cosine; got {t.lr_schedule!r}")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage must be 0-3; got {t.zero_stage}")
    if s.max_steps < 1:
        raise ConfigError("stop.max_steps must be >= 1")
    if s.window < 1 or not 0 <= s.smoothing < 1:
        raise ConfigError("stop.window must be >= 1 and stop.smoothing in [0, 1)")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    OmegaConf.save(OmegaConf.structured(cfg), Path(path))


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}: the form MLflow params take."""
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
