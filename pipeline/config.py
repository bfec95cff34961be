"""One typed config: dataclasses, filled from a YAML file, then `key=value` overrides.

    cfg = load_config("configs/msc_hg_cpu.yaml", ["train.max_steps=50", "model.channels=32"])

Unknown keys and wrong types are errors that name the key (OmegaConf structured configs);
cross-field rules (batch math, stage layout) are checked in `validate` before any rank starts work.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml
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
    # one width per stage (e.g. [32, 64, 64]: narrower at stride 2); empty: `channels` everywhere.
    # `channels` also sizes the stem's shared trunk.
    stage_channels: list[int] = field(default_factory=list)
    hg_min_size: int = 4  # every hourglass halves its input until this side length


@dataclass
class ExtraSet:
    """Another shard set trained on in the same batches as data.train_shards (e.g. MPII beside LSP)."""
    shards: str = ""
    weight: float = 1.0  # its share of every micro-batch, against data.train_weight
    # the model's joints (those of data.train_shards) -> this set's joint names. Joints of the same name
    # map by themselves; a model joint this set does not label stays unlabelled (weight 0, never background)
    joints: dict[str, str] = field(default_factory=dict)


@dataclass
class DataConfig:
    train_shards: str = ""  # a directory written by `mshg shard`: every config names its dataset
    val_shards: str = ""  # optional: evaluated during and after training (the joints of train_shards)
    # more datasets mixed into every micro-batch by weight (train_shards has data.train_weight); their
    # joints are mapped onto train_shards' joint set, which is the model's
    extra_sets: list[ExtraSet] = field(default_factory=list)
    train_weight: float = 1.0
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
    # share of training crops that frame the whole photo (centred, its longer side fills the crop) instead
    # of the person box: what `mshg predict` sees on a photo without a box
    whole_image_prob: float = 0.0
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
    # wall-time budget of the training loop in minutes (evaluations and checkpoints included, start-up
    # and the final evaluation not); 0: none. Kept in checkpoints: a resumed run spends what is left.
    max_minutes: float = 0.0


@dataclass
class TrainConfig:
    run_name: str = ""  # default: <config name>-<timestamp>
    out_dir: str = "runs"
    # Batch math (one place: `batch_plan`): global batch = micro_batch * grad_accum * ranks.
    micro_batch: int = 16  # per rank
    grad_accum: int = 1
    global_batch: int = 0  # 0: derived; else grad_accum is derived from it (it must divide exactly)
    optimizer: str = "adam"  # adam | rmsprop (the stacked-hourglass reference recipe: lr 2.5e-4)
    lr: float = 2.5e-4
    weight_decay: float = 0.0
    # DeepSpeed's schedulers: constant (WarmupLR), linear (WarmupDecayLR to 0 at stop.max_steps),
    # cosine (WarmupCosineLR to cos_min_ratio * lr at stop.max_steps); step: warm-up, then the lr
    # times lr_step_gamma every lr_step_every optimizer steps. With stop.max_minutes, linear and
    # cosine run over the budget instead: to its end in steps or in minutes, whichever comes first
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | linear | cosine | step
    lr_step_every: int = 0
    lr_step_gamma: float = 0.1
    cos_min_ratio: float = 0.0
    grad_clip: float = 1.0  # 0: no clipping
    zero_stage: int = 2  # overridden by zero_optimization.stage of the `deepspeed` file, if it has one
    deepspeed: str = ""  # optional DeepSpeed config file (YAML/JSON) merged over the derived one
    # auto | bf16 | fp16 | fp32: mixed precision by torch.autocast (DeepSpeed's `torch_autocast`): convolutions
    # in the low precision, fp32 weights, optimizer state and BatchNorm statistics. fp16: GPUs only. auto: bf16
    # where the hardware computes it (GPUs with bf16, CPUs with AVX-512 BF16 or AMX), else fp32: a CPU without
    # them emulates bf16 ~10x slower than fp32 (docs/results/throughput.md)
    precision: str = "auto"
    channels_last: bool = True  # NHWC activations: what oneDNN (CPU) and cuDNN tensor cores run fastest
    # torch.compile (inductor) of the model in the engine (train.compile_engine): fused kernels for the many small
    # BatchNorm/ReLU/add ops. The first step compiles: minutes on a CPU (C++ builds), seconds with the cache
    # warm (TORCHINDUCTOR_CACHE_DIR, default ~/.cache/mshg/inductor). Needs a C++ compiler on the machine
    compile: bool = False
    # heatmap pixels near a joint weigh 1 + loss_fg_weight times the background in the loss (targets.py); 0: plain MSE
    loss_fg_weight: float = 0.0
    # the pixels near a joint's left/right twin weigh 1 + loss_twin_weight in that joint's heatmap loss: a left knee
    # predicted on the right knee costs more than on the background (against double counts; targets.py); 0: off
    loss_twin_weight: float = 0.0
    ema_decay: float = 0.0  # exponential moving average of the weights, evaluated and exported; 0: off
    device: str = "auto"  # auto (CUDA if torch has it, said loudly) | cuda (an error without CUDA) | cpu
    # torch threads per rank on a CPU; 0: the machine's cores shared out among the ranks on this node.
    # Set it where others share the machine (or several small runs share it: the tests run 1)
    cpu_threads: int = 0
    # the memory allocator of CPU ranks that `mshg train --ranks N` starts: tcmalloc (LD_PRELOAD; Debian's
    # libtcmalloc-minimal4) made the CPU recipe's real path 1.3x faster than glibc's malloc on the AVX2 machine
    # (docs/results/throughput.md); auto: tcmalloc where it is installed, on CPU ranks | tcmalloc | system
    allocator: str = "auto"
    log_every: int = 1
    eval_every: int = 0  # steps; 0: evaluate at the end only
    checkpoint_every: int = 0  # steps; 0: checkpoint at the end (and on a signal) only
    keep_checkpoints: int = 2
    # auto: continue from runs/<run_name>/checkpoints/latest when it exists; never: refuse to start
    # if the run already has checkpoints; require: refuse to start without one
    resume: str = "auto"
    # fine-tuning: start from trained weights (a shipped model's name, see `mshg models`, a run folder or a
    # .safetensors file) with a new optimizer, schedule and run; joints matched by name. "": random weights
    init_from: str = ""
    experiment: str = "mshg"
    # the final model as an MLflow model (mlflow.pytorch, pt2) and its ONNX export, for the model registry:
    # 10-20 s of CPU after the run's summary is written
    log_model: bool = True
    # seconds the run's end waits for that export (an H200 node's torch 2.11 took over 5 minutes, docs/gpu.md);
    # past it the run ends without the MLflow model, with a warning. 0: no limit
    log_model_timeout: float = 120.0


@dataclass
class EvalConfig:
    """How predictions are made, the same in training, `mshg evaluate` and `mshg predict`."""
    flip: bool = True  # flip test: average the heatmaps of the crop and of its mirror image
    # 1-based modules whose heatmaps are averaged (resized to the finest of them) before decoding;
    # empty: the last module only
    modules: list[int] = field(default_factory=list)
    # sub-pixel decoding: 0, a quarter-pixel shift towards the higher neighbour; an odd size >= 3, DARK
    # (Zhang et al. 2020) with a Gaussian blur of that kernel size in heatmap pixels (mmpose: 11 at sigma 2)
    dark_kernel: int = 0
    # multi-scale test: the heatmaps of the crop zoomed by each of these factors (< 1 tighter, > 1 wider),
    # mapped back onto the crop and averaged; [1.0]: one scale. Training's periodic evaluations (the learning
    # curve, on the training clock) use one scale; its final evaluation, `mshg evaluate` and `predict` these
    scales: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class Config:
    name: str = "msc_hg"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    base = OmegaConf.structured(Config)
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            base = OmegaConf.merge(base, OmegaConf.load(path))
        if overrides:
            # `key=` means the empty value (e.g. data.val_shards= : no validation), not null
            overrides = [f"{o}''" if o.endswith("=") else o for o in overrides]
            base = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg: Config = OmegaConf.to_object(base)
    if cfg.train.deepspeed:  # a ZeRO config file names the stage: keep config, params and tags in line
        stage = (read_deepspeed_file(cfg.train.deepspeed).get("zero_optimization") or {}).get("stage")
        if stage is not None:
            cfg.train.zero_stage = stage
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
    m, d, t, s, e = cfg.model, cfg.data, cfg.train, cfg.stop, cfg.eval
    if not m.stages or any(len(st) != 2 or st[0] not in (2, 4, 8) or st[1] < 1 for st in m.stages):
        raise ConfigError(f"model.stages must be [[stride, modules], ...] with stride 2, 4 or 8; got {m.stages}")
    strides = [st[0] for st in m.stages]
    if strides != sorted(strides) or len(set(strides)) != len(strides):
        raise ConfigError(f"model.stages must go from fine to coarse strides, one stage each; got {strides}")
    if m.stage_channels and (len(m.stage_channels) != len(m.stages) or min(m.stage_channels) < 1):
        raise ConfigError(f"model.stage_channels must give one width >= 1 per stage of model.stages {m.stages}; "
                          f"got {m.stage_channels}")
    if m.channels < 1:
        raise ConfigError(f"model.channels must be >= 1; got {m.channels}")
    if d.input_size % 8 or d.input_size // max(strides) < m.hg_min_size:
        raise ConfigError(f"data.input_size={d.input_size} must be a multiple of 8 and leave at least "
                          f"model.hg_min_size={m.hg_min_size} pixels at stride {max(strides)}")
    if t.micro_batch < 1 or t.grad_accum < 1 or t.global_batch < 0:
        raise ConfigError("train.micro_batch and train.grad_accum must be >= 1, train.global_batch >= 0")
    batch_plan(t, 1, check_world=False)
    if t.optimizer not in ("adam", "rmsprop"):
        raise ConfigError(f"train.optimizer must be adam or rmsprop; got {t.optimizer!r}")
    if t.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"train.lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {t.lr_schedule!r}")
    if t.lr_schedule == "step" and t.lr_step_every < 1:
        raise ConfigError("train.lr_schedule=step needs train.lr_step_every >= 1 (optimizer steps)")
    if t.warmup_steps < 0 or t.lr <= 0:
        raise ConfigError("train.warmup_steps must be >= 0 and train.lr > 0")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage must be 0-3; got {t.zero_stage}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}; got {t.precision!r}")
    if t.device not in DEVICES:
        raise ConfigError(f"train.device must be one of {', '.join(DEVICES)}; got {t.device!r}")
    if t.allocator not in ALLOCATORS:
        raise ConfigError(f"train.allocator must be one of {', '.join(ALLOCATORS)}; got {t.allocator!r}")
    if t.cpu_threads < 0:
        raise ConfigError(f"train.cpu_threads must be >= 0 (0: the cores / ranks on the node); got {t.cpu_threads}")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay must be in [0, 1); got {t.ema_decay}")
    if t.ema_decay and t.zero_stage == 3:
        raise ConfigError("train.ema_decay needs whole weights on every rank: use train.zero_stage 0-2, not 3")
    if not all(math.isfinite(v) for v in (t.lr, t.weight_decay, t.grad_clip, t.loss_fg_weight, t.loss_twin_weight,
                                          s.expected_loss, s.max_minutes)):
        raise ConfigError("train.lr, train.weight_decay, train.grad_clip, train.loss_fg_weight, train.loss_twin_weight, "
                          "stop.expected_loss and stop.max_minutes must be finite numbers")
    if t.loss_fg_weight < 0:
        raise ConfigError(f"train.loss_fg_weight must be >= 0 (0: plain MSE); got {t.loss_fg_weight}")
    if t.loss_twin_weight < 0:
        raise ConfigError(f"train.loss_twin_weight must be >= 0 (0: off); got {t.loss_twin_weight}")
    if s.max_minutes < 0:
        raise ConfigError(f"stop.max_minutes must be >= 0 (0: no time limit); got {s.max_minutes}")
    if d.train_weight <= 0 or any(x.weight <= 0 or not x.shards for x in d.extra_sets):
        raise ConfigError("data.train_weight and every data.extra_sets weight must be > 0, and every extra set "
                          "needs its shards")
    if d.extra_sets:
        mix_sizes(t.micro_batch, [d.train_weight] + [x.weight for x in d.extra_sets])
    # every data setting checked here, before DeepSpeed and the MLflow run start (not at the first batch)
    if d.interp not in INTERPOLATIONS:
        raise ConfigError(f"data.interp must be one of {', '.join(INTERPOLATIONS)}; got {d.interp!r}")
    for key in ("whole_image_prob", "rotation_prob", "flip_prob"):
        if not 0 <= getattr(d, key) <= 1:
            raise ConfigError(f"data.{key} must be in [0, 1]; got {getattr(d, key)}")
    if len(d.scale_range) != 2 or not 0 < d.scale_range[0] <= d.scale_range[1]:
        raise ConfigError(f"data.scale_range must be [low, high] with 0 < low <= high; got {d.scale_range}")
    if not (d.padding > 0 and d.sigma > 0 and d.rotation_deg >= 0 and 0 <= d.color_jitter < 1):
        raise ConfigError(f"data.padding and data.sigma must be > 0, data.rotation_deg >= 0, data.color_jitter in "
                          f"[0, 1); got {d.padding}, {d.sigma}, {d.rotation_deg}, {d.color_jitter}")
    if d.num_threads < 1 or d.shuffle_buffer < 1:
        raise ConfigError(f"data.num_threads and data.shuffle_buffer must be >= 1; got {d.num_threads}, {d.shuffle_buffer}")
    modules = sum(n for _, n in m.stages)
    if any(not 1 <= k <= modules for k in e.modules) or len(set(e.modules)) != len(e.modules):
        raise ConfigError(f"eval.modules must list distinct modules 1..{modules}; got {e.modules}")
    if e.dark_kernel != 0 and (e.dark_kernel < 3 or e.dark_kernel % 2 == 0):
        raise ConfigError(f"eval.dark_kernel must be 0 (quarter-pixel offset) or an odd size >= 3; got {e.dark_kernel}")
    if not e.scales or not all(0.25 <= s <= 4 for s in e.scales):
        raise ConfigError(f"eval.scales must list one or more zoom factors in [0.25, 4], e.g. [0.9, 1.0, 1.15]; "
                          f"got {e.scales}")
    if t.resume not in RESUME_MODES:
        raise ConfigError(f"train.resume must be one of {', '.join(RESUME_MODES)}; got {t.resume!r}")
    if t.keep_checkpoints < 1 or t.checkpoint_every < 0:
        raise ConfigError("train.keep_checkpoints must be >= 1 and train.checkpoint_every >= 0")
    if s.max_steps < 1:
        raise ConfigError("stop.max_steps must be >= 1")
    if s.window < 1 or not 0 <= s.smoothing < 1:
        raise ConfigError("stop.window must be >= 1 and stop.smoothing in [0, 1)")
    # every other number in its range, by name, here: out of range they failed late or wrongly (issue 48:
    # train.log_every=0 after DeepSpeed and MLflow started, data.seed=-1 on rank 0 only, stop.max_epochs=-1
    # stopped at step 0 with exit 0). A NaN or an infinity is out of every range.
    ranges = [
        ("model.hg_min_size", m.hg_min_size, ">= 1", lambda v: v >= 1),
        ("data.train_weight", d.train_weight, "> 0", lambda v: v > 0),
        ("data.padding", d.padding, "> 0", lambda v: v > 0),
        ("data.sigma", d.sigma, "> 0", lambda v: v > 0),
        ("data.rotation_deg", d.rotation_deg, ">= 0", lambda v: v >= 0),
        ("data.seed", d.seed, f"in [0, {2**31 - 1}]", lambda v: 0 <= v <= 2**31 - 1),
        ("stop.expected_loss", s.expected_loss, ">= 0 (0: no convergence rule)", lambda v: v >= 0),
        ("stop.tolerance", s.tolerance, "> 0", lambda v: v > 0),
        ("stop.max_epochs", s.max_epochs, ">= 0 (0: no epoch limit)", lambda v: v >= 0),
        ("train.weight_decay", t.weight_decay, ">= 0", lambda v: v >= 0),
        ("train.grad_clip", t.grad_clip, ">= 0 (0: no clipping)", lambda v: v >= 0),
        ("train.lr_step_every", t.lr_step_every, ">= 0", lambda v: v >= 0),
        ("train.lr_step_gamma", t.lr_step_gamma, "in (0, 1]", lambda v: 0 < v <= 1),
        ("train.cos_min_ratio", t.cos_min_ratio, "in [0, 1]", lambda v: 0 <= v <= 1),
        ("train.log_every", t.log_every, ">= 1", lambda v: v >= 1),
        ("train.eval_every", t.eval_every, ">= 0 (0: at the end only)", lambda v: v >= 0),
        ("train.log_model_timeout", t.log_model_timeout, ">= 0 seconds (0: no limit)", lambda v: v >= 0),
    ]
    ranges += [("data.scale_range", v, "finite", lambda v: True) for v in d.scale_range]
    ranges += [(f"data.extra_sets[{k}].weight", x.weight, "> 0", lambda v: v > 0) for k, x in enumerate(d.extra_sets)]
    for key, value, rule, ok in ranges:
        if not (math.isfinite(value) and ok(value)):
            raise ConfigError(f"{key} must be {rule}; got {value}")


LR_SCHEDULES = ("constant", "linear", "cosine", "step")
INTERPOLATIONS = ("auto", "linear", "nn")
ALLOCATORS = ("auto", "tcmalloc", "system")
PRECISIONS = ("auto", "bf16", "fp32", "fp16")
DEVICES = ("auto", "cuda", "cpu")
RESUME_MODES = ("auto", "never", "require")
# DeepSpeed keys that are derived from train.* and may not come from a `train.deepspeed` file
DERIVED_DEEPSPEED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                          "optimizer", "scheduler", "gradient_clipping")


def batch_plan(t: TrainConfig, world_size: int, check_world: bool = True) -> tuple[int, int, int]:
    """(global batch, micro batch per rank, accumulation steps): the one place the batch rule
    `global = micro_batch * grad_accum * world_size` is applied. A combination that does not add up
    is a ConfigError that names the numbers (raised before any rank starts work)."""
    if not check_world:  # what can be checked without knowing the number of ranks
        if t.global_batch and t.global_batch % t.micro_batch:
            raise ConfigError(f"train.global_batch={t.global_batch} is not a multiple of "
                              f"train.micro_batch={t.micro_batch}")
        return t.global_batch, t.micro_batch, t.grad_accum
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1; got {world_size}")
    per_pass = t.micro_batch * world_size
    if not t.global_batch:
        return per_pass * t.grad_accum, t.micro_batch, t.grad_accum
    if t.global_batch % per_pass:
        raise ConfigError(
            f"train.global_batch={t.global_batch} cannot be split into train.micro_batch={t.micro_batch} x "
            f"{world_size} rank(s) x whole accumulation steps ({t.global_batch} is not a multiple of {per_pass}); "
            f"change train.global_batch, train.micro_batch or the number of ranks")
    accum = t.global_batch // per_pass
    if t.grad_accum not in (1, accum):
        raise ConfigError(f"train.global_batch={t.global_batch} = train.micro_batch={t.micro_batch} x {world_size} "
                          f"rank(s) x {accum} accumulation steps, but train.grad_accum={t.grad_accum}: "
                          f"set only one of train.global_batch and train.grad_accum")
    return t.global_batch, t.micro_batch, accum


def mix_sizes(micro_batch: int, weights: list[float]) -> list[int]:
    """How many samples of each dataset a micro-batch holds: proportional to the weights (largest
    remainder), every set at least one. The same in every batch, so the mix is exact and resumable."""
    total = sum(weights)
    raw = [micro_batch * w / total for w in weights]
    sizes = [int(r) for r in raw]
    for k in sorted(range(len(raw)), key=lambda k: raw[k] - sizes[k], reverse=True)[:micro_batch - sum(sizes)]:
        sizes[k] += 1
    if min(sizes) < 1:
        raise ConfigError(f"train.micro_batch={micro_batch} cannot give every dataset of the mix (weights "
                          f"{weights}) a sample per batch: raise train.micro_batch or the smallest weight")
    return sizes


def read_deepspeed_file(path: str | Path) -> dict:
    """A DeepSpeed config fragment (YAML or JSON, e.g. configs/deepspeed/zero3.yaml), checked."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"train.deepspeed: file not found: {p}")
    try:
        ds = yaml.safe_load(p.read_text()) or {}  # YAML is a superset of JSON
    except yaml.YAMLError as e:
        raise ConfigError(f"train.deepspeed: {p}: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"train.deepspeed: {p} must hold a mapping of DeepSpeed settings")
    bad = [k for k in DERIVED_DEEPSPEED_KEYS if k in ds]
    if bad:
        raise ConfigError(f"train.deepspeed: {p} sets {', '.join(bad)}: these come from train.* "
                          f"(micro_batch, grad_accum, global_batch, optimizer, lr_schedule, grad_clip)")
    stage = (ds.get("zero_optimization") or {}).get("stage")
    if stage is not None and stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.deepspeed: {p}: zero_optimization.stage must be 0-3; got {stage}")
    return ds


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_yaml(cfg: Config) -> str:
    """The config as YAML: config.yaml, and the model record's (`config_from_yaml` reads it back)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(config_yaml(cfg), encoding="utf-8")


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
