"""Train MSC-HG with DeepSpeed on DALI batches, tracked in MLflow.

    python -m pipeline.train --config configs/msc_hg_cpu.yaml [key=value ...]
    deepspeed --num_gpus 2 --module pipeline.train --config configs/msc_hg_cpu.yaml   # DS_ACCELERATOR=cpu on CPUs
    srun python -m pipeline.train --config ...                                       # see launch/slurm

One step: DALI batch -> joints relabelled after flips -> heatmap targets at every stride -> forward
through the 8 modules -> sum of the 8 MSE losses -> DeepSpeed backward/step. After every optimizer
step rank 0 decides whether to stop (convergence, step/epoch limit) and all ranks learn the decision
in the same collective, together with any preemption signal that reached any rank.

Everything a run makes goes under runs/<run_name>/: checkpoints/, model.safetensors, config.yaml,
train.log.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import random
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from pipeline import distributed
from pipeline.config import (Config, ConfigError, batch_plan, flatten, load_config, read_deepspeed_file,
                             save_config, to_dict)
from pipeline.data import ShardSet, build_loader, unpack
from pipeline.evaluate import evaluate_loader, format_pck, headline, summarise, to_model_input, tracked_metrics
from pipeline.stop import CONVERGED, MAX_EPOCHS, MAX_STEPS, SIGNAL, ConvergenceStop
from pipeline.targets import cascade_loss, make_targets, swap_flipped
from pipeline.track import Tracker

STOP_CODES = {0: None, 1: CONVERGED, 2: MAX_STEPS, 3: MAX_EPOCHS, 4: SIGNAL}  # larger wins
EXIT_REQUEUE = 75  # EX_TEMPFAIL: "stopped by a signal after checkpointing; requeue me"


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """DeepSpeed's JSON config, derived from ours (batch sizes from `batch_plan`, the one place of the
    batch rule), with the optional `train.deepspeed` file (e.g. configs/deepspeed/zero3.yaml) merged over."""
    from deepspeed.accelerator import get_accelerator

    t = cfg.train
    global_batch, micro, accum = batch_plan(t, world_size)
    ds = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": t.grad_clip,
        # contiguous_gradients copies each gradient into one flat buffer as it arrives, against memory
        # fragmentation on GPUs; on a CPU it is only a copy per parameter tensor in DeepSpeed's Python
        # hook: ~5% of a demo step (bench/distributed_overhead.py, docs/cluster.md)
        "zero_optimization": {"stage": t.zero_stage,
                              "contiguous_gradients": get_accelerator().device_name() != "cpu"},
        "zero_allow_untested_optimizer": True,  # our torch optimizer (RMSprop/Adam) under ZeRO
        "steps_per_print": 10**9,
    }
    if t.lr_schedule == "cosine":
        ds["scheduler"] = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": cfg.stop.max_steps, "warmup_num_steps": max(t.warmup_steps, 1),
            "warmup_min_ratio": 0.0, "cos_min_ratio": t.cos_min_ratio}}
    elif t.lr_schedule == "linear":
        ds["scheduler"] = {"type": "WarmupDecayLR", "params": {
            "total_num_steps": cfg.stop.max_steps, "warmup_min_lr": 0.0, "warmup_max_lr": t.lr,
            "warmup_num_steps": max(t.warmup_steps, 1), "warmup_type": "linear"}}
    elif t.lr_schedule == "constant" and t.warmup_steps > 1:
        ds["scheduler"] = {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": t.lr, "warmup_num_steps": t.warmup_steps,
            "warmup_type": "linear"}}
    # lr_schedule=step: a torch LambdaLR from `make_scheduler` (DeepSpeed has no step-decay schedule)
    if t.deepspeed:
        ds = _merge(ds, read_deepspeed_file(t.deepspeed))
        ds["zero_optimization"]["stage"] = t.zero_stage  # load_config took it from the file already
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": t.bf16}
    if t.fp16:  # dynamic loss scaling; DeepSpeed refuses fp16 on CPUs
        ds["fp16"] = {"initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                      **ds.get("fp16", {}), "enabled": True}
    return ds


def make_scheduler(cfg: Config, optimizer):
    """The step schedule: linear warm-up, then lr * gamma ** (steps after warm-up // every)."""
    t = cfg.train
    if t.lr_schedule != "step":
        return None

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        return t.lr_step_gamma ** ((step - t.warmup_steps) // t.lr_step_every)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(cfg: Config, params):
    t = cfg.train
    if t.optimizer == "rmsprop":  # the stacked-hourglass reference recipe
        return torch.optim.RMSprop(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def epoch_seed(seed: int, epoch: int) -> int:
    """The DALI seed of an epoch. Each epoch gets a freshly built pipeline with its own seed, so the
    data order of epoch e, batch b depends only on (seed, rank, e, b): a resumed run rebuilds the
    epoch's pipeline and skips the batches already trained on (DALI's shuffle buffer and random
    augmentations are a function of the seed and of the number of batches drawn)."""
    return seed + 7919 * epoch


class Trainer:
    def __init__(self, cfg: Config):
        import deepspeed

        from pipeline.checkpoint import Checkpointer
        from pipeline.model import build_model

        self.cfg = cfg
        self.world = distributed.init()
        batch_plan(cfg.train, self.world.size)  # a wrong batch combination stops every rank here
        if cfg.train.fp16 and self.world.device.type != "cuda":
            raise ConfigError("train.fp16 needs GPUs (DeepSpeed has no fp16 on CPUs): use train.bf16=true")
        self.signal_received, self.signal_time = 0, 0.0
        self.install_signal_handlers()  # early: a signal during start-up is acted on after the first step
        seed_everything(cfg.data.seed + self.world.rank)
        self.run_name = distributed.broadcast_object(
            cfg.train.run_name or f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}", self.world)
        self.run_dir = Path(cfg.train.out_dir) / self.run_name
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.train.keep_checkpoints, self.world)
        resume_tag = self.checkpointer.resume_tag(cfg.train.resume)  # train.resume=never|require fail here
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")

        self.train_shards = ShardSet.open(cfg.data.train_shards)
        self.val_shards = ShardSet.open(cfg.data.val_shards) if cfg.data.val_shards else None
        self.flip_perm = self.train_shards.flip_permutation()
        model = build_model(cfg.model, len(self.train_shards.joints), cfg.data.input_size)
        self.strides = model.strides
        optimizer = make_optimizer(cfg, model.parameters())
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=make_scheduler(cfg, optimizer),
            config=deepspeed_config(cfg, self.world.size))
        self.dtype = torch.bfloat16 if cfg.train.bf16 else torch.float16 if cfg.train.fp16 else torch.float32
        if self.dtype != torch.float32:
            # DeepSpeed casts the parameters to bf16/fp16 but not the buffers; BatchNorm then refuses
            # fp32 running statistics beside bf16 weights (on the CPU at least): cast them alike
            for buf in self.engine.module.buffers():
                if buf.is_floating_point():
                    buf.data = buf.data.to(self.dtype)
        self.dali_device = self.world.local_rank if self.world.device.type == "cuda" else None
        self.loader = None  # built per epoch, see epoch_batches
        self.stopper = ConvergenceStop(cfg.stop)
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.position = 0  # micro-batches of the current epoch consumed (by this rank; all ranks alike)
        resumed = self.checkpointer.load(self.engine, resume_tag) if resume_tag else None
        if resumed:
            self.load_state_dict(resumed)
        self.tracker = Tracker(self.world.is_main, cfg.train.experiment, self.run_name,
                               run_id=resumed.get("mlflow_run_id") if resumed else None,
                               tags=self.run_tags())
        if not resumed:
            self.tracker.log_params(flatten(to_dict(cfg)))
            self.tracker.log_artifact(self.run_dir / "config.yaml")
            self.tracker.log_dict(deepspeed_config(cfg, self.world.size), "deepspeed_config.json")
        self.log(f"run {self.run_name}: {self.world.size} rank(s) on {self.world.device}, "
                 f"{self.train_shards.num_samples} training samples, "
                 f"{'resumed at step %d' % self.step if resumed else 'new run'}")

    # -- state -------------------------------------------------------------------------------------
    def run_tags(self) -> dict:
        return {"dataset": self.train_shards.dataset, "config": self.cfg.name,
                "zero_stage": self.cfg.train.zero_stage, "world_size": self.world.size}

    def state_dict(self) -> dict:
        """The trainer's part of a checkpoint (DeepSpeed adds weights, optimizer and scheduler). Called
        by every rank: the RNG states of all ranks are gathered, as DeepSpeed keeps rank 0's copy."""
        return {"step": self.step, "epoch": self.epoch, "position": self.position,
                "world_size": self.world.size, "micro_batch": self.cfg.train.micro_batch,
                "data_seed": self.cfg.data.seed, "stopper": self.stopper.state_dict(),
                "mlflow_run_id": self.tracker.run_id, "rng": distributed.gather_objects(rng_state(), self.world)}

    def load_state_dict(self, state: dict) -> None:
        same = {"world_size": self.world.size, "micro_batch": self.cfg.train.micro_batch,
                "data_seed": self.cfg.data.seed}
        changed = [f"{k} {state[k]} -> {v}" for k, v in same.items() if k in state and state[k] != v]
        if changed:  # the data position would mean other samples: refuse rather than resume inexactly
            raise ConfigError(f"cannot resume exactly ({', '.join(changed)}): resume with the same ranks, "
                              f"train.micro_batch and data.seed, or start a new run")
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.stopper.load_state_dict(state["stopper"])
        set_rng_state(state["rng"][self.world.rank])

    # -- the loop ----------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch forward/backward (and optimizer step at the accumulation boundary).
        Returns the total loss and the per-module losses, averaged over ranks."""
        keypoints = swap_flipped(batch["keypoints"], batch["flip"], self.flip_perm)
        heatmaps, weights = make_targets(keypoints, self.cfg.data.input_size, self.strides, self.cfg.data.sigma)
        predictions = self.engine(to_model_input(batch["image"], self.dtype))
        loss, per_module = cascade_loss(predictions, heatmaps, weights, self.strides)
        self.engine.backward(loss)
        self.engine.step()
        losses = torch.stack([loss.detach()] + [m.detach() for m in per_module]).float()
        if self.world.size > 1:
            torch.distributed.all_reduce(losses)
            losses /= self.world.size
        return losses[0], losses[1:]

    def decide_stop(self, total_loss: float) -> str | None:
        """Rank 0 applies the stop rule; one all-reduce (max) tells every rank, with any signal."""
        code = 0
        if self.world.is_main:
            reason = self.stopper.update(total_loss, self.step, self.epoch)
            code = {v: k for k, v in STOP_CODES.items()}[reason]
        if self.signal_received:
            code = 4
        flag = torch.tensor([code], dtype=torch.int32, device=self.world.device)
        if self.world.size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return STOP_CODES[int(flag.item())]

    def epoch_batches(self):
        """This rank's batches of the current epoch, from `self.position` on: the epoch's pipeline is
        built with the epoch's seed (`epoch_seed`) and the batches already trained on are drawn and
        dropped, so a resumed run sees exactly the batches the uninterrupted run would have seen."""
        data = dataclasses.replace(self.cfg.data, seed=epoch_seed(self.cfg.data.seed, self.epoch))
        self.loader = build_loader(self.train_shards, data, self.cfg.train.micro_batch, train=True,
                                   rank=self.world.rank, world_size=self.world.size, device_id=self.dali_device)
        if self.position:
            t0 = time.perf_counter()
            self.loader.skip(self.position)
            self.log(f"epoch {self.epoch}: skipped the {self.position} batches already trained on "
                     f"in {time.perf_counter() - t0:.1f} s")
        while True:  # next(), not `for`: iter() on a DALI iterator that has been drawn from resets it
            try:
                batch = next(self.loader)
            except StopIteration:
                break
            yield batch
        self.loader = None

    def fit(self) -> int:
        reason, images, t_start, t_wait = None, 0, time.perf_counter(), 0.0
        t_log = t_start
        if self.step >= self.cfg.stop.max_steps:  # resumed a run that had already reached its limit
            reason = MAX_STEPS
        while reason is None:
            t0 = time.perf_counter()
            for batch in self.epoch_batches():
                b = unpack(batch, self.world.device)
                self.position += 1
                t_wait += time.perf_counter() - t0
                total, per_module = self.train_step(b)
                images += len(b["image"]) * self.world.size
                if not self.engine.is_gradient_accumulation_boundary() and self.cfg.train.grad_accum > 1:
                    t0 = time.perf_counter()
                    continue
                self.step += 1
                if not math.isfinite(total.item()):
                    raise FloatingPointError(f"loss is {total.item()} at step {self.step}")
                reason = self.decide_stop(total.item())
                if self.step % self.cfg.train.log_every == 0 or reason:
                    now = time.perf_counter()
                    self.log_step(total, per_module, images / (now - t_log), t_wait / (now - t_log))
                    images, t_wait, t_log = 0, 0.0, now
                if self.cfg.train.eval_every and self.step % self.cfg.train.eval_every == 0 and not reason:
                    self.evaluate()
                if self.cfg.train.checkpoint_every and self.step % self.cfg.train.checkpoint_every == 0:
                    self.save_checkpoint()
                if reason:
                    break
                t0 = time.perf_counter()
            else:  # the epoch ended without a stop
                self.epoch += 1
                self.position = 0
                if self.cfg.stop.max_epochs and self.epoch >= self.cfg.stop.max_epochs:
                    reason = MAX_EPOCHS
        return self.finish(reason, time.perf_counter() - t_start)

    # -- the rest, each small ------------------------------------------------------------------------
    def log_step(self, total: torch.Tensor, per_module: torch.Tensor, images_per_s: float, wait: float) -> None:
        metrics = {"loss/total": total.item(), "lr": self.engine.get_lr()[0],
                   "images_per_s": images_per_s, "data_wait_fraction": wait,
                   "loss/smoothed": self.stopper.smoothed}
        metrics.update({f"loss/stage_{i + 1}": v for i, v in enumerate(per_module.tolist())})
        self.tracker.log_metrics(metrics, self.step)
        if self.world.is_main and (self.step % (10 * self.cfg.train.log_every) == 0 or self.step == 1):
            stages = " ".join(f"{v:.4f}" for v in per_module.tolist())
            self.log(f"step {self.step:5d} epoch {self.epoch} loss {total.item():.5f} "
                     f"(smoothed {self.stopper.smoothed:.5f}) stages [{stages}] {images_per_s:.1f} img/s")

    def evaluate(self) -> dict | None:
        """Every rank predicts its part of the validation shards; rank 0 computes PCK."""
        if self.val_shards is None:
            return None
        loader = build_loader(self.val_shards, self.cfg.data, self.cfg.train.micro_batch, train=False,
                              rank=self.world.rank, world_size=self.world.size, device_id=self.dali_device)
        results = evaluate_loader(self.engine.module, loader, self.world.device, self.dtype,
                                  keep_images=8 if self.world.is_main else 0)  # the fixed preview images
        merged = {}
        for part in distributed.gather_objects(results, self.world):
            merged.update(part)
        metrics = summarise(merged, self.val_shards) if self.world.is_main else None
        if self.world.is_main:
            if len(merged) != self.val_shards.num_samples:
                self.log(f"warning: evaluated {len(merged)} of {self.val_shards.num_samples} validation samples")
            self.log(format_pck(metrics, self.val_shards.joints))
            self.tracker.log_metrics(tracked_metrics(metrics, self.val_shards.joints), self.step)
            from pipeline.plots import prediction_grid

            self.tracker.log_image(prediction_grid(merged), f"predictions/step_{self.step:06d}.png")
        return metrics

    def save_checkpoint(self) -> Path:
        if self.checkpointer.saved_step == self.step:  # e.g. checkpoint_every fell on the last step
            return self.checkpointer.last_saved
        meta = {"step": self.step, "epoch": self.epoch, "world_size": self.world.size,
                "zero_stage": self.cfg.train.zero_stage, "config": (self.run_dir / "config.yaml").read_text(),
                "joints": self.train_shards.joints, "flip_pairs": self.train_shards.flip_pairs}
        saved = self.checkpointer.save(self.engine, self.step, self.state_dict(), meta if self.world.is_main else None)
        self.tracker.flush()  # the store then holds at least every step up to the checkpoint
        return saved

    def export_weights(self, checkpoint: Path) -> Path | None:
        """fp32 weights of the final checkpoint (any ZeRO stage) -> runs/NAME/model.safetensors."""
        from pipeline.weights import WEIGHTS_FILE, export_zero_checkpoint

        if not self.world.is_main:
            return None
        return export_zero_checkpoint(checkpoint, self.run_dir / WEIGHTS_FILE)

    def finish(self, reason: str, seconds: float) -> int:
        self.log(f"stopping at step {self.step}: {reason}")
        self.tracker.set_tags({"stop_reason": reason, "stopped_at_step": self.step})
        checkpoint = self.save_checkpoint()
        if self.signal_received:
            self.log(f"checkpoint {checkpoint.name} written {time.monotonic() - self.signal_time:.2f} s after "
                     f"{signal.Signals(self.signal_received).name} reached this rank")
        self.tracker.flush()
        if reason == SIGNAL:  # preempted: the checkpoint is all that matters now
            self.tracker.finish("KILLED")
            self.barrier()
            return EXIT_REQUEUE
        weights = self.export_weights(checkpoint)
        metrics = self.evaluate()
        if self.world.is_main:
            if metrics:
                self.tracker.log_metrics({f"final/{metrics['metric']}": metrics["value"]}, self.step)
            self.tracker.log_artifact(self.run_dir / "train.log")
            self.tracker.log_loss_curves()
            if weights:
                from pipeline.weights import load_trained

                model, _, meta = load_trained(weights)
                self.tracker.log_model(model, self.cfg.data.input_size, meta["joints"], meta["flip_pairs"])
            summary = summarise_run(self.run_dir, metrics, checkpoint, weights, reason, self.step,
                                    self.tracker.run_id, self.tracker.ui_command(), seconds)
            print(summary, flush=True)
        self.tracker.finish()
        self.barrier()
        return 0

    def barrier(self) -> None:
        """All ranks end together: srun (--wait) and the deepspeed launcher end the others soon after
        the first rank exits, and rank 0 may still be exporting, evaluating or logging the model."""
        if self.world.size > 1:
            torch.distributed.barrier()

    def install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            # acted on at the end of the current step, by every rank (decide_stop); a second signal,
            # also one during the checkpoint, changes nothing
            if not self.signal_received:
                self.signal_received, self.signal_time = signum, time.monotonic()

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, request_stop)

    def log(self, message: str) -> None:
        if self.world.is_main:
            line = f"[{datetime.now():%H:%M:%S}] {message}"
            print(line, flush=True)
            with open(self.run_dir / "train.log", "a") as f:
                f.write(line + "\n")


def summarise_run(run_dir: Path, metrics: dict | None, checkpoint: Path, weights: Path | None, reason: str,
                  step: int, run_id: str | None, ui_command: str, seconds: float) -> str:
    """The lines a run ends with; also kept in runs/NAME/summary.txt so launchers can repeat them."""
    lines = [headline(metrics)] if metrics else []
    lines += [f"stopped at step {step} ({reason}) after {seconds:.0f} s of training",
              f"checkpoint: {checkpoint}", f"weights:    {weights}", f"run dir:    {run_dir}",
              f"MLflow run {run_id}; look at it with:", f"  {ui_command}"]
    text = "\n".join(lines)
    (run_dir / "summary.txt").write_text(text + "\n")
    return text


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
    code = trainer.fit()
    # Python puts the default handlers back while it shuts down, so a late SIGTERM (a launcher or srun
    # passing on another signal) would turn exit 75 into "killed": the work is saved, ignore them now
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(main())
