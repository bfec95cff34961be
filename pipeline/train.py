"""Train MSC-HG with DeepSpeed on DALI batches, tracked in MLflow.

    python -m pipeline.train --config configs/msc_hg_cpu.yaml [key=value ...]
    deepspeed --num_gpus 2 --module pipeline.train --config configs/msc_hg_cpu.yaml   # DS_ACCELERATOR=cpu on CPUs
    srun python -m pipeline.train --config ...                                       # see launch/slurm

One loop turn is one optimizer step: `train_step` draws its `accum` micro-batches (DALI batch -> joints
relabelled after flips -> heatmap targets at every stride -> forward through the modules -> sum of
the per-module MSE losses -> DeepSpeed backward; DeepSpeed steps the optimizer after the last one).
After every step rank 0 decides whether to stop (convergence, step/epoch/time limit) and all ranks
learn the decision in the same collective, together with any preemption signal that reached any rank.

Everything a run makes goes under runs/<run_name>/ (pipeline.run_folder): checkpoints/, model.safetensors,
config.yaml, train.log, summary.txt.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import resource
import signal
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from pipeline import distributed
from pipeline.checkpoint import META, Checkpointer, find_resume_tag, first_line, written_by
from pipeline.config import (Config, ConfigError, batch_plan, config_from_yaml, flatten, load_config, mix_sizes,
                             read_deepspeed_file, to_dict)
from pipeline.ema import WeightAverage
from pipeline.data import BadSampleError, MixedBatches, TrainBatches
from pipeline.export import HeatmapModel, export_model_onnx, onnx_metadata
from pipeline.inputs import joint_map, training_inputs
from pipeline.metrics import headline, metric_for
from pipeline.model import build_model
from pipeline.model_record import ModelRecord
from pipeline.run_folder import RunEnd, RunFolder, default_run_name
from pipeline.schedule import deepspeed_scheduler, make_scheduler
from pipeline.stop import MAX_MINUTES, SIGNAL, ConvergenceStop, StopSignals, reason_code, reason_from_code
from pipeline.targets import LossEmphasis, cascade_loss
from pipeline.track import Tracker, warn, within
from pipeline.validate import Validation
from pipeline.weights import WEIGHTS_FILE, export_zero_checkpoint, init_from, load_trained
from shards.format import ShardSet

# deepspeed is imported inside the functions that use it, after distributed.init has set DS_ACCELERATOR:
# DeepSpeed picks its accelerator when it is first imported.

# DeepSpeed 0.19 calls torch.distributed's deprecated all_gather_into_tensor / reduce_scatter_tensor names;
# torch warns once per call site per rank, which fills every log. Not ours to fix: silenced at the source.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.c10d_logger")
EXIT_REQUEUE = 75  # EX_TEMPFAIL: "stopped by a signal after checkpointing; requeue me"
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: Config, world_size: int, load_universal: bool = False) -> dict:
    """DeepSpeed's JSON config, derived from ours (batch sizes from `batch_plan`, the one place of the
    batch rule), with the optional `train.deepspeed` file (e.g. configs/deepspeed/zero3.yaml) merged over.

    `load_universal`: the run resumes a ZeRO checkpoint written by another number of ranks, converted to
    DeepSpeed's universal checkpoint first (Checkpointer.load).

    Mixed precision is DeepSpeed's `torch_autocast`: convolutions run in bf16/fp16 while weights,
    gradients, optimizer state and BatchNorm statistics stay fp32 (DeepSpeed's `bf16` mode would cast
    the weights, and the BatchNorm statistics with them, to an 8-bit mantissa)."""
    from deepspeed.accelerator import get_accelerator

    t = cfg.train
    global_batch, micro, accum = batch_plan(t, world_size)
    gpu = get_accelerator().device_name() != "cpu"
    ds = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": t.grad_clip,
        # contiguous_gradients copies each gradient into one flat buffer as it arrives, against memory
        # fragmentation on GPUs; on a CPU it is only a copy per parameter tensor in DeepSpeed's Python
        # hook: ~5% of a demo step (bench/distributed_overhead.py, docs/cluster.md). overlap_comm runs the
        # gradient reduction beside the backward pass on a CUDA stream; a CPU has none to give it.
        "zero_optimization": {"stage": t.zero_stage, "contiguous_gradients": gpu, "overlap_comm": gpu},
        "zero_allow_untested_optimizer": True,  # our torch optimizer (RMSprop/Adam) under ZeRO
        "steps_per_print": 10**9,
    }
    scheduler = deepspeed_scheduler(cfg)
    if scheduler:  # otherwise make_scheduler's LambdaLR, or a constant rate
        ds["scheduler"] = scheduler
    if t.deepspeed:
        ds = _merge(ds, read_deepspeed_file(t.deepspeed))
        ds["zero_optimization"]["stage"] = t.zero_stage  # load_config took it from the file already
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    if t.precision in AUTOCAST:
        ds["torch_autocast"] = {**ds.get("torch_autocast", {}), "enabled": True,
                                "dtype": "bfloat16" if t.precision == "bf16" else "float16"}
    return ds


class RunShards(NamedTuple):
    """A run's shard sets: data.train_shards (its joints are the model's), data.val_shards, data.extra_sets."""
    train: ShardSet
    val: ShardSet | None
    extra: list[ShardSet]


def open_shards(cfg: Config) -> RunShards:
    """The training, validation and extra shard sets, checked before any training: all there, validation
    of the training set's joints, every extra set's joints mapping onto them."""
    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards is not set: name the shard directory to train on (written by "
                          "`mshg shard`, e.g. data.train_shards=runs/shards/lspet-train)")
    try:
        train = ShardSet.open(cfg.data.train_shards)
        val = ShardSet.open(cfg.data.val_shards) if cfg.data.val_shards else None
        extra = [ShardSet.open(x.shards) for x in cfg.data.extra_sets]
        for k, (s, x) in enumerate(zip(extra, cfg.data.extra_sets)):
            joint_map(train.joints, s.joints, x.joints, f"data.extra_sets[{k}] ({x.shards})")
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    if val:  # its metric finds the joints it needs by name (PCK's torso, PCKh's pelvis and thorax)
        try:
            metric_for(val)
        except ValueError as e:
            raise ConfigError(f"data.val_shards {cfg.data.val_shards}: {e}") from None
    if val and val.joints != train.joints:
        raise ConfigError(f"data.val_shards {cfg.data.val_shards} ({val.dataset}, {len(val.joints)} joints) has "
                          f"other joints than data.train_shards {cfg.data.train_shards} ({train.dataset}, "
                          f"{len(train.joints)} joints): validate on shards of the same joint set")
    return RunShards(train, val, extra)


def aligned_param_groups(params) -> list[dict]:
    """ZeRO flattens each parameter group into one buffer and gives every parameter back as a view into
    it. CUDA kernels fault on views that are not 16-byte aligned ("misaligned address" in the first step
    on an H200, docs/gpu.md), and one 14-float bias (a heatmap head's) shifts all that follow it: so the
    parameters whose size is a multiple of 16 bytes form one group, and each other one a group of its own.
    GPUs only: CPU kernels take unaligned views, and ZeRO's step costs per group (the stacked twin's
    75 channels make ~half its tensors odd: 3.5x slower steps on the CPU, docs/results/throughput.md)."""
    params = list(params)
    odd = [p for p in params if p.numel() * p.element_size() % 16]
    return [{"params": [p for p in params if p.numel() * p.element_size() % 16 == 0]}] + [{"params": [p]} for p in odd]


def make_optimizer(cfg: Config, params, align_views: bool = False):
    """Adam fused (one kernel over all tensors, CPU or GPU: 1.15x a step of the CPU recipe at batch 8 in
    bench/train_speed.py --levers), RMSprop foreach (torch has no fused RMSprop)."""
    t = cfg.train
    if align_views:
        params = aligned_param_groups(params)
    if t.optimizer == "rmsprop":  # the stacked-hourglass reference recipe
        return torch.optim.RMSprop(params, lr=t.lr, weight_decay=t.weight_decay, foreach=True)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_exact_resume(state: dict, **now) -> None:
    """A resume continues the checkpoint's data order, which its data seed fixes: another seed is refused.
    (Other ranks or micro-batch are an elastic resume: Trainer.elastic_resume.)"""
    changed = [f"{k} {state[k]} -> {v}" for k, v in now.items() if k in state and state[k] != v]
    if changed:
        raise ConfigError(f"cannot resume with another data order ({', '.join(changed)}): resume with the run's "
                          f"data.seed, or start a new run")


# settings a resume cannot change: the optimizer's state and the schedule's base rates come from the checkpoint
RESUME_FIXED = ("train.optimizer", "train.lr", "train.weight_decay", "train.lr_schedule", "train.warmup_steps",
                "train.cos_min_ratio", "train.lr_step_every", "train.lr_step_gamma")


def check_same_recipe(saved: Config, now: Config, saved_shards: str | None, now_shards: str) -> None:
    """A resume continues the checkpoint's optimizer, schedule and data: a changed lr (or any RESUME_FIXED
    setting) or other training shards would be recorded but not applied, so the resume is refused by name."""
    changed = [f"{key} {old} -> {new}" for key in RESUME_FIXED
               if (old := getattr(getattr(saved, key.split(".")[0]), key.split(".")[1]))
               != (new := getattr(getattr(now, key.split(".")[0]), key.split(".")[1]))]
    if saved_shards and saved_shards != now_shards:
        changed.append(f"data.train_shards: other shards than the run's (manifest.json {saved_shards} -> {now_shards})")
    if changed:
        raise ConfigError(f"cannot resume with changed settings ({'; '.join(changed)}): the optimizer, schedule and "
                          f"data position continue from the checkpoint. Resume with the run's own settings, or start a "
                          f"new run from its weights with train.init_from=runs/{now.train.run_name or 'NAME'}")


def manifest_digest(shards: ShardSet) -> str:
    return hashlib.sha256((Path(shards.root) / "manifest.json").read_bytes()).hexdigest()[:12]


def by_name(state: dict) -> dict:
    """A checkpoint's client_state with each state under its name (Checkpointer.save); checkpoints written
    before kept the trainer's and the data position's entries at the top level."""
    return state if "trainer" in state else {**state, "trainer": state, "data": state}


class RandomStates:
    """The random generators (Python, NumPy, torch, CUDA) of every rank, as a checkpoint keeps them: DeepSpeed
    saves rank 0's client_state only, so state_dict() gathers all ranks' (every rank calls it) and
    load_state_dict() takes this rank's back."""

    def __init__(self, world: distributed.World):
        self.world = world

    def state_dict(self) -> list[dict]:
        mine = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        return distributed.gather_objects(mine, self.world)

    def load_state_dict(self, states: list[dict]) -> None:
        state = states[self.world.rank]
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


def views_need_alignment(world: distributed.World) -> bool:
    """CUDA kernels fault on parameter views off 16 bytes; CPU kernels do not (aligned_param_groups)."""
    return world.device.type == "cuda"


def build_engine(cfg: Config, world: distributed.World, joints: list[str], minutes, log=print,
                 load_universal: bool = False):
    """The model (from train.init_from's weights when set), its optimizer and learning-rate schedule (over
    `minutes()` when the budget is in time), in DeepSpeed's engine; parameters 16-byte aligned where
    `views_need_alignment`. `load_universal`: the run resumes a checkpoint of another number of ranks."""
    import deepspeed

    model = build_model(cfg.model, len(joints), cfg.data.input_size)
    if cfg.train.init_from:  # fine-tuning: trained weights, but a new optimizer, schedule and run
        log(init_from(model, cfg.train.init_from, list(joints)))
    optimizer = make_optimizer(cfg, model.parameters(), views_need_alignment(world))
    # the GPU this rank uses (distributed.gpu_index), not DeepSpeed's default cuda:LOCAL_RANK, which
    # does not exist where a site binds one GPU to each task
    device_rank = argparse.Namespace(device_rank=world.device.index) if world.device.type == "cuda" else None
    engine, _, _, scheduler = deepspeed.initialize(args=device_rank, model=model, optimizer=optimizer,
                                                   lr_scheduler=make_scheduler(cfg, optimizer, minutes),
                                                   config=deepspeed_config(cfg, world.size, load_universal))
    if cfg.train.compile:
        compile_engine(engine, log)
    return engine, scheduler


def compile_engine(engine, log=print) -> None:
    """train.compile: torch.compile (inductor) of the model inside DeepSpeed's engine, in place.

    DeepSpeed's `engine.compile()` runs nn.Module.compile on `engine.module`: the module and its state-dict keys
    stay as they are, so checkpoints, exports and the weight average (a deepcopy drops the compiled call) are
    unchanged. torch.compile(model) before deepspeed.initialize also trains, but hands ZeRO a wrapper whose
    keys all start with `_orig_mod.`. Both checked on the CPU with ZeRO 1, 2 and 3: first losses as eager's.
    Inductor's cache defaults to /tmp/torchinductor_USER, lost with the node; a folder that survives runs
    turns the next run's minutes of compiling into seconds (TORCHINDUCTOR_CACHE_DIR, when set, wins)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # 2.4 s to import: only when compiling

    # torch writes its default into the variable the first time it reads it (by now the trainer's start-up
    # has): that value is not the user's choice
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == default_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path.home() / ".cache" / "mshg" / "inductor")
    cache = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    engine.compile()
    log(f"train.compile: the model is compiled at its first step (minutes on a CPU, seconds with a warm cache); "
        f"inductor cache {cache}")


def training_batches(cfg: Config, shards: RunShards, micro_batch: int, world: distributed.World, log) -> MixedBatches:
    """data.train_shards alone, or mixed with data.extra_sets by weight in every micro-batch; DALI on the
    rank's GPU when it has one."""
    d, train = cfg.data, shards.train
    sets = [(train, d.train_weight, None)] + [(s, x.weight, x) for s, x in zip(shards.extra, d.extra_sets)]
    sizes = mix_sizes(micro_batch, [w for _, w, _ in sets]) if len(sets) > 1 else [micro_batch]
    streams, maps, device_index = [], [], distributed.device_index(world)
    for k, ((shard_set, _, extra_set), size) in enumerate(zip(sets, sizes)):
        # each set its own seed: the same seed would draw the same augmentations for every set
        data = dataclasses.replace(d, seed=d.seed + 1000 * k) if k else d
        streams.append(TrainBatches(shard_set, data, size, (world.rank, world.size), device_index, log=log))
        maps.append(joint_map(train.joints, shard_set.joints, extra_set.joints, f"data.extra_sets[{k - 1}]")
                    if extra_set else None)
    if len(sets) > 1:
        log("mixing " + ", ".join(f"{n} of {s.dataset} ({s.root})" for (s, _, _), n in zip(sets, sizes))
            + " in every micro-batch")
    return MixedBatches(streams, maps, world.device)


class Meter:
    """Images, and where the seconds went, since the last log line. The phases of a step (PHASES) are
    timed on the host: exact on a CPU; on a GPU, kernels run asynchronously and the time of a phase lands
    where the host next waits for the GPU (data wait stays exact)."""
    PHASES = ("data", "targets", "forward", "backward", "step", "ema")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.images, self.since = 0, time.perf_counter()
        self.seconds = dict.fromkeys(self.PHASES, 0.0)

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] += time.perf_counter() - t0

    def rates(self) -> tuple[float, dict[str, float]]:
        """Images per second, and the fraction of the wall time spent in each phase; `other` is the
        rest: stop decisions, logging, evaluations and checkpoints."""
        wall = max(time.perf_counter() - self.since, 1e-9)
        shares = {k: v / wall for k, v in self.seconds.items()}
        shares["other"] = max(0.0, 1.0 - sum(shares.values()))
        return self.images / wall, shares

    def metrics(self, losses: list[float], device: torch.device) -> dict[str, float]:
        """A log line's metrics since the last one (and the meter reset): the losses ([total, per module]),
        images/s, the time breakdown, and this rank's peak memory (GPU memory allocated by torch, or the
        process's resident set on a CPU)."""
        images_per_s, shares = self.rates()
        self.reset()
        metrics = {"loss/total": losses[0], "images_per_s": images_per_s, "data_wait_fraction": shares["data"]}
        metrics.update({f"loss/stage_{i + 1}": v for i, v in enumerate(losses[1:])})
        metrics.update({f"time_fraction/{k}": v for k, v in shares.items()})
        metrics["peak_memory_gb"] = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
                                     else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        return metrics


class Trainer:
    def __init__(self, cfg: Config):
        self.world = distributed.init(cfg.train.device, cfg.train.cpu_threads)
        self.global_batch, self.micro_batch, self.accum = batch_plan(cfg.train, self.world.size)
        # what "auto" resolved to is what the run records (config.yaml, params) and DeepSpeed is given
        precision, precision_note = distributed.resolve_precision(cfg.train.precision, self.world.device)
        cfg = self.cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
        seed_everything(cfg.data.seed + self.world.rank)
        self.folder = RunFolder(cfg.train.out_dir, distributed.broadcast_object(default_run_name(cfg), self.world),
                                self.world.is_main)
        self.log = self.folder.log  # rank 0's line on stdout and in train.log
        self.signals = StopSignals(self.log)  # early: a signal during start-up is acted on after the first step
        checkpoints = self.folder.path / "checkpoints"
        resume_tag = find_resume_tag(checkpoints, cfg.train.resume, self.world)  # train.resume=never|require fail here

        self.shards = open_shards(cfg)
        if self.world.is_main:  # before anything is written: a second run of this name fails here, naming the holder
            self.folder.lock()
        self.flip_perm = self.shards.train.flip_permutation()
        self.emphasis = LossEmphasis(cfg.train.loss_fg_weight, cfg.train.loss_twin_weight, self.flip_perm)
        self.minutes = 0.0  # training minutes spent, as all ranks agreed at the last step (decide_stop)
        ranks_before = written_by(checkpoints, resume_tag) if resume_tag else None
        self.engine, self.scheduler = build_engine(cfg, self.world, self.shards.train.joints, lambda: self.minutes,
                                                   log=self.log, load_universal=ranks_before not in (None, self.world.size)
                                                   and cfg.train.zero_stage > 0)
        self.strides = self.engine.module.strides
        self.ema = WeightAverage(self.engine.module, cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.batches = training_batches(cfg, self.shards, self.micro_batch, self.world, self.log)
        self.stopper = ConvergenceStop(cfg.stop)
        self.random_states = RandomStates(self.world)
        self.step = 0  # optimizer steps done; always engine.global_steps
        self.seconds_before = 0.0  # training seconds of earlier attempts of this run (resumed)
        self.t_start: float | None = None  # when this attempt's loop started
        self.meter = Meter()
        self.elastic_resumes: list[str] = []  # one line per resume on other ranks or micro-batch: not bit-exact
        self.checkpointer = Checkpointer(checkpoints, self.world, cfg.train, self.engine,
                                         states={"trainer": self, "data": self.batches, "stopper": self.stopper,
                                                 "rng": self.random_states, "ema": self.ema},
                                         record=ModelRecord.of(cfg, self.shards.train))
        resumed = by_name(self.checkpointer.load(resume_tag)) if resume_tag else None
        if resumed:
            self.load_state_dict(resumed, resume_tag)  # a refused resume stops here, the run dir untouched
        self.tracker = open_tracking(cfg, self.folder, self.world, resumed, self.shards)
        self.folder.notes = [f"elastic resume at {line}" for line in self.elastic_resumes]
        if resumed and self.elastic_resumes and self.elastic_resumes[-1].startswith(f"step {self.step}:"):
            self.log(f"elastic resume at {self.elastic_resumes[-1]}")
            self.tracker.set_tags({f"elastic_resume/step_{self.step}": self.elastic_resumes[-1]})
        self.validation = Validation(self.shards.val, cfg, max(32, self.micro_batch), self.world, self.tracker,
                                     self.log) if self.shards.val else None
        for line in (self.world.device_note, precision_note):
            self.log(line)
        self.log(f"run {self.folder.path.name}: {self.world.describe()}, "
                 f"{self.shards.train.num_samples} training samples, batch {self.global_batch} = "
                 f"{self.micro_batch} x {self.accum} accumulation x {self.world.size} rank(s), "
                 f"{'resumed at step %d' % self.step if resumed else 'new run'}")

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The trainer's own part of a checkpoint (the Checkpointer holds the rest: the engine's, the data
        position, the stop rule, every rank's RNG, the weight average): the training time, the batch layout
        and what a resume must match."""
        return {"seconds": self.seconds(), "world_size": self.world.size, "micro_batch": self.micro_batch,
                "global_batch": self.global_batch, "elastic_resumes": self.elastic_resumes,
                "data_seed": self.cfg.data.seed, "train_manifest": manifest_digest(self.shards.train),
                "mlflow_run_id": self.tracker.run_id}

    def load_state_dict(self, state: dict, tag: str) -> None:
        """Continues the checkpoint's run (`state`: its client_state, by_name): exactly with the ranks and
        micro-batch it was written with; elastically with others (`elastic_resume`)."""
        mine = state["trainer"]
        check_exact_resume(mine, data_seed=self.cfg.data.seed)
        elastic = (mine["world_size"], mine["micro_batch"]) != (self.world.size, self.micro_batch)
        if elastic and "batch_size" not in state["data"]:
            raise ConfigError(f"checkpoint {tag} predates elastic resume: resume it with {mine['world_size']} "
                              f"rank(s) and train.micro_batch={mine['micro_batch']}")
        meta = json.loads((self.checkpointer.dir / tag / META).read_text())
        check_same_recipe(config_from_yaml(meta["config"], f"{tag}/{META}"), self.cfg, mine.get("train_manifest"),
                          manifest_digest(self.shards.train))
        if self.ema is not None:
            averaged = self.checkpointer.load_tensors(tag, "ema")
            if averaged is None:
                raise ConfigError(f"train.ema_decay={self.cfg.train.ema_decay}, but checkpoint {tag} has no weight "
                                  f"average: resume with the run's own train.ema_decay, or start a new run")
            self.ema.load_state_dict(averaged)
        self.step = state["step"]
        data_notes = self.batches.load_state_dict(state["data"])
        self.seconds_before = mine.get("seconds", 0.0)
        self.minutes = self.seconds_before / 60
        self.stopper.load_state_dict(state["stopper"])
        self.elastic_resumes = list(mine.get("elastic_resumes", []))
        if elastic:
            self.elastic_resume(mine, tag, data_notes)
        else:
            self.random_states.load_state_dict(state["rng"])

    def elastic_resume(self, state: dict, tag: str, data_notes: list[str]) -> None:
        """A resume on another number of ranks or micro-batch: the weights, optimizer state (resharded by
        Checkpointer.load), schedule (from the global step), weight average and stop rule continue; the data
        position is re-derived from the samples seen (data.TrainBatches.load_state_dict) and every rank's
        RNG is seeded afresh, from the data seed, its rank and the step. So the run continues, but not as
        the uninterrupted run would have: the line recorded says so (train.log, MLflow, summary.txt).
        `state`: the trainer's part of the checkpoint."""
        seed_everything(self.cfg.data.seed + self.world.rank + 7919 * self.step)
        old = f"{state['world_size']} rank(s) x micro-batch {state['micro_batch']}"
        self.elastic_resumes.append(
            f"step {self.step}: checkpoint {tag} written by {old} (global batch {state.get('global_batch', '?')}), "
            f"resumed on {self.world.size} rank(s) x micro-batch {self.micro_batch} (global batch {self.global_batch}); "
            f"optimizer state resharded, schedule from step {self.step}, data position re-derived "
            f"({'; '.join(data_notes) or 'unchanged'}): not bit-exact")

    def seconds(self) -> float:
        """Training seconds of this run so far, earlier attempts included."""
        return self.seconds_before + (time.perf_counter() - self.t_start if self.t_start is not None else 0.0)

    # -- the loop ----------------------------------------------------------------------------------
    def train(self) -> int:
        self.t_start = time.perf_counter()
        self.meter.reset()
        t, stop = self.cfg.train, self.cfg.stop
        reason = self.stopper.limit_reached(self.step, self.batches.epoch, self.minutes)  # a resumed run may be done
        pending = []  # the losses of the steps since the last decision, still on the device
        while reason is None:
            total, per_module = self.train_step()
            self.step += 1
            assert self.step == self.engine.global_steps, (self.step, self.engine.global_steps)
            if self.ema is not None:
                with self.meter.phase("ema"):
                    self.ema.update(self.engine.module)
            pending.append(torch.cat([total[None], per_module]))
            evaluate = bool(t.eval_every) and self.step % t.eval_every == 0
            checkpoint = self.checkpointer.due(self.step)
            if not (self.step % t.log_every == 0 or evaluate or checkpoint or self.step >= stop.max_steps
                    or (stop.max_epochs and self.batches.epoch >= stop.max_epochs)):
                continue  # no host sync between decisions: a GPU runs ahead (train.log_every)
            losses, pending = torch.stack(pending).tolist(), []
            reason = self.decide_stop(losses)
            self.log_step(losses[-1])
            if evaluate and not reason:
                self.evaluate()
            if checkpoint:
                self.save_checkpoint()
        return self.finish(reason)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step: `accum` micro-batches forward and backward; DeepSpeed scales each loss by
        1/accum and steps the optimizer after the last. Returns the total and per-module losses,
        averaged over the micro-batches and the ranks."""
        losses = []
        phase = self.meter.phase
        for _ in range(self.accum):
            with phase("data"):
                batch = self.batches.next()
            with phase("targets"):  # joints relabelled after flips, heatmaps at every stride, the normalised input
                x, _, heatmaps, weights = training_inputs(batch, self.flip_perm, self.cfg.data.input_size, self.strides,
                                                          self.cfg.data.sigma, self.cfg.train.channels_last)
            with phase("forward"):
                predictions = self.engine(x)
                loss, per_module = cascade_loss(predictions, heatmaps, weights, self.strides, self.emphasis)
            with phase("backward"):  # DeepSpeed's gradient reduction runs in its backward hooks
                self.engine.backward(loss)
            with phase("step"):  # gradient clipping, the optimizer, ZeRO's all-gather of the updated weights
                self.engine.step()
            losses.append(torch.stack([loss.detach()] + [m.detach() for m in per_module]).float())
            self.meter.images += len(batch["image"]) * self.world.size
        mean = torch.stack(losses).mean(0)
        if self.world.size > 1:
            torch.distributed.all_reduce(mean)
            mean /= self.world.size
        return mean[0], mean[1:]

    def decide_stop(self, losses: list[list[float]]) -> str | None:
        """`losses`: [total, per module...] of each step since the last decision (every step, or every
        train.log_every steps). Rank 0 applies the stop rules to each; one all-reduce (max) tells every
        rank the reason, any signal and the minutes spent (so that every rank's learning rate follows
        the same clock)."""
        first = self.step - len(losses) + 1
        for step, (total, *_) in enumerate(losses, first):
            if not math.isfinite(total):
                raise FloatingPointError(f"loss is {total} at step {step}")
        minutes = self.seconds() / 60
        code = 0
        if self.world.is_main:
            for step, (total, *_) in enumerate(losses, first):
                code = code or reason_code(self.stopper.update(total, step, self.batches.epoch, minutes))
        if self.signals.received:
            code = reason_code(SIGNAL)
        agreed = torch.tensor([code, minutes], dtype=torch.float64, device=self.world.device)
        if self.world.size > 1:
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        self.minutes = float(agreed[1])
        return reason_from_code(int(agreed[0]))

    # -- the rest, each small ------------------------------------------------------------------------
    def log_step(self, losses: list[float]) -> None:
        metrics = self.meter.metrics(losses, self.world.device)
        metrics.update({"lr": self.engine.get_lr()[0], "loss/smoothed": self.stopper.smoothed, "minutes": self.minutes,
                        "epoch": self.batches.epoch, "images_seen": self.step * self.global_batch})
        self.tracker.log_metrics(metrics, self.step)
        if self.step % (10 * self.cfg.train.log_every) == 0 or self.step == 1:
            self.log(step_line(self.step, losses, metrics))

    def evaluate(self, final: bool = False) -> dict | None:
        return self.validation.run(evaluated_model(self.engine.module, self.ema, self.world), self.step,
                                   self.minutes, final) if self.validation else None

    def save_checkpoint(self) -> Path:
        saved = self.checkpointer.save(self.step)
        self.tracker.flush()  # the store then holds at least every step up to the checkpoint
        return saved

    def finish(self, reason: str) -> int:
        seconds = self.seconds()
        self.log(f"stopping at step {self.step}: {reason}"
                 + (f" ({self.cfg.stop.max_minutes:g} min of training spent)" if reason == MAX_MINUTES else ""))
        self.tracker.set_tags({"stop_reason": reason, "stopped_at_step": self.step})
        checkpoint = self.save_checkpoint()
        if self.signals.received:
            self.log(f"checkpoint {checkpoint.name} written {self.signals.seconds_since():.2f} s after "
                     f"{signal.Signals(self.signals.received).name} reached this rank")
        self.tracker.flush()
        if reason == SIGNAL:  # preempted: the checkpoint is all that matters now
            self.tracker.finish("KILLED")
            distributed.barrier(self.world)
            return EXIT_REQUEUE
        # fp32 weights of the final checkpoint (the weight average when there is one) -> runs/NAME/model.safetensors
        weights = export_zero_checkpoint(checkpoint, self.folder.path / WEIGHTS_FILE) if self.world.is_main else None
        metrics = self.evaluate(final=True)
        if self.world.is_main:
            end = RunEnd(reason, self.step, seconds, checkpoint, weights)
            publish_run(self.cfg, self.folder, self.tracker, metrics, end, len(self.strides))
        self.tracker.finish()
        distributed.barrier(self.world)  # together: launchers end the others once one exits; rank 0 was publishing
        return 0


def step_line(step: int, losses: list[float], metrics: dict[str, float]) -> str:
    """The log line of a step: losses (total, smoothed, per module), speed, minutes and where the time went."""
    stages = " ".join(f"{v:.4f}" for v in losses[1:])
    times = " ".join(f"{k.split('/')[1]} {100 * v:.0f}%" for k, v in metrics.items() if k.startswith("time_"))
    return (f"step {step:5d} epoch {metrics['epoch']} loss {losses[0]:.5f} (smoothed {metrics['loss/smoothed']:.5f}) "
            f"stages [{stages}] {metrics['images_per_s']:.1f} img/s {metrics['minutes']:.1f} min; time: {times}")


def open_tracking(cfg: Config, folder: RunFolder, world: distributed.World, resumed: dict | None,
                  shards: RunShards) -> Tracker:
    """The run's MLflow run (rank 0; a tracker that does nothing elsewhere): a resumed run (`resumed`: its
    checkpoint's client_state) continues its own; a new one is tagged and gets its dataset inputs, params,
    config.yaml and DeepSpeed config."""
    config_file = folder.save_config(cfg) if world.is_main else None
    trained_on = [shards.train, *shards.extra]
    tags = {"dataset": "+".join(s.dataset for s in trained_on), "config": cfg.name,
            "zero_stage": cfg.train.zero_stage, "world_size": world.size, "allocator": distributed.allocator_in_use()}
    tracker = Tracker(world.is_main, cfg.train.experiment, folder.path.name,
                      run_id=resumed["trainer"].get("mlflow_run_id") if resumed else None, tags=tags)
    if not resumed:
        tracker.log_run_inputs([(s, "train") for s in trained_on] + ([(shards.val, "val")] if shards.val else []),
                               flatten(to_dict(cfg)), config_file, deepspeed_config(cfg, world.size))
    return tracker


def evaluated_model(model: torch.nn.Module, ema, world: distributed.World) -> torch.nn.Module:
    """What is evaluated and exported: the weight average when there is one, with rank 0's BatchNorm
    statistics on every rank (each rank's own drift apart; the checkpoint keeps rank 0's)."""
    model = ema.module if ema is not None else model
    if world.size > 1:
        for buf in model.buffers():
            torch.distributed.broadcast(buf, src=0)
    return model


def publish_run(cfg: Config, folder: RunFolder, tracker: Tracker, metrics: dict | None, end: RunEnd,
                stages: int) -> None:
    """Rank 0, at a finished run's end: the final metric, train.log and the stage-loss plot to MLflow,
    summary.txt and its lines on stdout, then the MLflow model (last: the results are out already)."""
    if metrics:
        tracker.log_metrics({f"final/{metrics['metric']}": metrics["value"]}, end.step)
    tracker.log_artifact(folder.log_file)
    tracker.log_loss_curves(stages)
    print(folder.write_summary(headline(metrics) if metrics else None, end, tracker.run_id, tracker.ui_command()),
          flush=True)
    if end.weights and cfg.train.log_model:  # bounded: the run's end must not hang in the export (docs/gpu.md)
        model, record = load_trained(end.weights)
        if not within(cfg.train.log_model_timeout, log_final_model, tracker, model, record):
            warn(log_model_timed_out(cfg.train.log_model_timeout))


def log_final_model(tracker: Tracker, model: torch.nn.Module, record: ModelRecord) -> None:
    """The final model to MLflow: exported to ONNX here (a model that cannot be exported is a warning, not a
    failed run), then the tracker logs the file and the model (last-module heatmaps) with its record."""
    if not tracker.recording:
        return
    model = model.float().cpu().eval()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            onnx_file = export_model_onnx(model, record.input_size, Path(tmp) / "model.onnx", onnx_metadata(record))
        except Exception as e:
            warn(f"ONNX export failed ({type(e).__name__}: {e}); the run has no onnx/model.onnx")
            onnx_file = None
        tracker.log_model(HeatmapModel(model).eval(), onnx_file, record)


def log_model_timed_out(seconds: float) -> str:
    return (f"the MLflow model export did not finish within train.log_model_timeout={seconds:g} s: the run ends "
            f"without its MLflow model (its weights, checkpoint and summary are written; `mshg export` makes the "
            f"ONNX model). Raise train.log_model_timeout, or set train.log_model=false to skip the export")


def record_failure(trainer: Trainer, error: BaseException) -> str:
    """The run raised: record it in MLflow as FAILED (KILLED for a second Ctrl-C) with the error's first
    line as a tag, and say in one line what happened and what to do."""
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    trainer.tracker.set_tags({"error": f"{type(error).__name__}: {first_line(error)}"[:5000],
                              "stop_reason": status.lower(), "stopped_at_step": trainer.step})
    trainer.tracker.finish(status)
    last = trainer.checkpointer.latest_tag()
    return failure_message(error, trainer.step, trainer.checkpointer.dir / last if last else None)


def failure_message(error: BaseException, step: int, last_checkpoint) -> str:
    where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "there is no checkpoint yet"
    if isinstance(error, FloatingPointError):
        return (f"{first_line(error)}: training diverged; {where} (a rerun with the same train.run_name resumes "
                f"from it). Try a lower train.lr, a longer train.warmup_steps, train.grad_clip, or train.precision=fp32")
    return f"{type(error).__name__}: {first_line(error)} (at step {step}; {where})"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a YAML file under configs/")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    p.add_argument("overrides", nargs="*", help="key=value, e.g. train.max_steps=10")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        trainer = Trainer(cfg)
    except ConfigError as e:  # every rank stops here, before training, with the same message
        print(f"python -m pipeline.train: error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        code = trainer.train()
    except (FloatingPointError, BadSampleError, OSError, KeyboardInterrupt) as e:  # a line, not a traceback
        print(f"python -m pipeline.train: error: {record_failure(trainer, e)}", file=sys.stderr, flush=True)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    except BaseException as e:  # a bug: the traceback is worth having, and the run is FAILED, not FINISHED
        record_failure(trainer, e)
        raise
    StopSignals.ignore()  # the work is saved: a late signal must not turn exit 75 into "killed"
    return code


if __name__ == "__main__":
    sys.exit(main())
