"""DeepSpeed checkpoints of a run: `runs/NAME/checkpoints/<tag>/` plus a `latest` file.

The Checkpointer is handed what a checkpoint holds and decides when to write one (every
train.checkpoint_every steps, and at the end):

    checkpointer = Checkpointer(directory, world, cfg.train, engine, states={"trainer": trainer,
                                "data": batches, "stopper": stopper, "rng": rngs, "ema": ema}, record=record)
    if checkpointer.due(step): checkpointer.save(step)
    client_state = checkpointer.load(tag)

DeepSpeed's engine saves and loads the model, optimizer, scheduler and ZeRO partitions; each state's
state_dict() travels under its name in DeepSpeed's `client_state` (the trainer's counters, the data
position, the stop detector, the RNG of every rank), beside the step.

Atomicity: every rank writes into `.partial-<tag>/`; after a barrier (all ranks' files are on disk)
rank 0 fsyncs them, renames the folder to `<tag>` and only then replaces `latest` (written to a
temporary file, fsynced, renamed). So a `step*` folder is always complete, `latest` only ever names a
complete one, and a crash or kill at any moment leaves the previous checkpoint usable; a leftover
`.partial-*` folder is removed by the next save. The last `keep` tags are kept.

Beside DeepSpeed's files every tag holds `weights.safetensors` (the fp32 weights, gathered under
ZeRO-3), a safetensors file for each state whose state_dict() holds tensors only (the weight average:
`ema.safetensors`) and `meta.json` (where training stood, and the model record: config, joints, flip
pairs, skeleton): what `mshg export` reads, never unpickling.
DeepSpeed's own files are pickles, which run code when loaded; so every tag is signed: rank 0
writes `signature.json`, the sha256 of each file and an HMAC of them under this user's checkpoint
key (`MSHG_CHECKPOINT_KEY`, default ~/.config/mshg/checkpoint.key, made on first use, mode 600;
share it across a cluster's nodes through the home directory; a key under 32 bytes or readable by
others is refused). A resume checks the signature before DeepSpeed unpickles anything, on every rank
for the files that rank loads: a checkpoint that this key did not sign, or that changed since, is
refused (docs/cluster.md).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import hmac
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from pipeline.config import ConfigError, TrainConfig
from pipeline.distributed import broadcast_object, gather_objects
from pipeline.model_record import ModelRecord

LATEST = "latest"
PARTIAL = ".partial-"
UNIVERSAL = ".universal-"  # a checkpoint converted for another number of ranks, while it loads
META = "meta.json"
SIGNATURE = "signature.json"


KEY_BYTES = 32  # an HMAC-SHA256 key; an empty key file would sign with an empty key, which anyone can forge


def checkpoint_key() -> bytes:
    """This user's key for signing checkpoints, created on first use (32 random bytes, mode 600). A key file
    shorter than that, or one that group or others may read or write, is refused naming the file: its
    signatures would not prove that this user wrote a checkpoint, and resuming one unpickles it."""
    path = Path(os.environ.get("MSHG_CHECKPOINT_KEY") or Path.home() / ".config" / "mshg" / "checkpoint.key")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(KEY_BYTES))
        try:
            os.link(tmp, path)  # whole or not at all: the ranks of a node may all make it at once
        except FileExistsError:
            pass  # another rank's is there: that one is the key
        finally:
            os.unlink(tmp)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"checkpoint key {path} is readable or writable by others (mode {mode:o}): whoever reads "
                          f"it can sign checkpoints that your runs unpickle; make it yours alone: chmod 600 {path}")
    key = path.read_bytes()
    if len(key) < KEY_BYTES:
        raise ConfigError(f"checkpoint key {path} holds {len(key)} bytes, fewer than {KEY_BYTES}: its signatures "
                          f"can be forged; remove it (the next run makes a new one; checkpoints signed with the old "
                          f"one are then refused) or point MSHG_CHECKPOINT_KEY at the key that signed them")
    return key


def others_partition(name: str, rank: int) -> bool:
    """A file of another rank's ZeRO partition (DeepSpeed's zero_pp_rank_N_...): not one `rank` unpickles."""
    found = re.search(r"zero_pp_rank_(\d+)_", name)
    return bool(found) and int(found.group(1)) != rank


def _digests(folder: Path, rank: int | None = None) -> dict[str, str]:
    """sha256 of every file (but the signature), or with `rank`, of the files that rank loads."""
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != SIGNATURE and not (rank is not None and others_partition(f.name, rank)):
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            out[str(f.relative_to(folder))] = h.hexdigest()
    return out


def _mac(digests: dict[str, str]) -> str:
    return hmac.new(checkpoint_key(), json.dumps(digests, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def sign(folder: Path) -> None:
    digests = _digests(folder)
    (folder / SIGNATURE).write_text(json.dumps({"files": digests, "hmac": _mac(digests)}, indent=1))


def check_signature(folder: Path, rank: int | None = None) -> None:
    """Raises ConfigError unless `folder` holds exactly the files this user's key signed; with `rank`, only
    the files that rank loads are compared (its own ZeRO partition and the shared files), not all ranks'."""
    path = folder / SIGNATURE
    try:
        signed = json.loads(path.read_text())
        files, mac = signed["files"], signed["hmac"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{folder}: no valid {SIGNATURE}, so not a checkpoint this user's runs wrote: refusing to "
                          f"load it (DeepSpeed's .pt files are pickles, which can run code). If you trust it, its "
                          f"weights.safetensors loads without running code (mshg export)") from None
    if not hmac.compare_digest(mac, _mac(files)):
        raise ConfigError(f"{folder}: signed with another key (another user or machine; set MSHG_CHECKPOINT_KEY to "
                          f"the key file that signed it): refusing to unpickle it")
    now = _digests(folder, rank)
    if rank is not None:
        files = {k: v for k, v in files.items() if not others_partition(Path(k).name, rank)}
    changed = sorted(k for k in set(files) | set(now) if files.get(k) != now.get(k))
    if changed:
        raise ConfigError(f"{folder}: {', '.join(changed[:5])} changed since the checkpoint was written "
                          f"(or is missing, or empty): refusing to load it")


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def latest_tag(directory: str | Path) -> str | None:
    """The tag `latest` names, or None when there is no checkpoint yet. A `latest` that names a
    missing folder is an error (someone deleted it): resuming from scratch would silently restart."""
    d = Path(directory)
    f = d / LATEST
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    if not (d / tag).is_dir():
        raise FileNotFoundError(f"{f} names {tag}, but {d / tag} is missing")
    return tag


def nothing_to_resume(directory: str | Path) -> ConfigError:
    """The error of train.resume=require (`mshg train --resume`) where `directory` holds no checkpoint."""
    return ConfigError(f"train.resume=require, but {directory} has no checkpoint (no `latest`)")


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """`runs/NAME`, `runs/NAME/checkpoints` or `runs/NAME/checkpoints/TAG` -> (checkpoints dir, tag)."""
    p = Path(path)
    if (p / "checkpoints" / LATEST).is_file():
        p = p / "checkpoints"
    if (p / LATEST).is_file():
        return p, latest_tag(p)
    if p.is_dir() and p.name.startswith("step") and any(p.glob("*model_states.pt")):
        return p.parent, p.name
    raise FileNotFoundError(f"{path}: not a checkpoint (expected runs/NAME/checkpoints with a `latest` file, "
                            f"or one of its step* folders)")


def find_resume_tag(directory: str | Path, mode: str, world) -> str | None:
    """The tag to resume from (rank 0's view of `latest`, on every rank), or None for a new run.
    mode (train.resume): auto (resume if there is a checkpoint), never (error if there is one), require
    (error if there is none)."""
    found: tuple[str | None, str | None] = (None, None)
    if world.is_main:
        try:
            found = (latest_tag(directory), None)
        except FileNotFoundError as e:
            found = (None, str(e))
    tag, error = broadcast_object(found, world)
    if error:
        raise ConfigError(error)
    if tag is None and mode == "require":
        raise nothing_to_resume(directory)
    if tag is not None and mode == "never":
        raise ConfigError(f"train.resume=never, but {directory} already holds checkpoint {tag}: "
                          f"pick another train.run_name, or resume with train.resume=auto")
    return tag


def written_by(directory: str | Path, tag: str) -> int | None:
    """The number of ranks that wrote checkpoint `tag` (its meta.json), None when it does not say."""
    meta = Path(directory) / tag / META
    return json.loads(meta.read_text()).get("world_size") if meta.is_file() else None


def holds_tensors_only(state) -> bool:
    """A state saved as safetensors (readable without unpickling), not in DeepSpeed's client_state."""
    return isinstance(state, dict) and bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


class Checkpointer:
    """A run's checkpoints, handed what they hold: DeepSpeed's `engine`; `states`, name -> an object with
    state_dict() (None: not in this run), each saved under its name: in DeepSpeed's client_state, or as
    <name>.safetensors when its dict holds tensors only (the weight average); the model `record` for
    meta.json. It keeps the last train.keep_checkpoints and says when one is due (train.checkpoint_every)."""

    def __init__(self, directory: Path, world, train: TrainConfig, engine=None, states: dict | None = None,
                 record: ModelRecord | None = None):
        self.dir = Path(directory)
        self.world = world
        self.keep, self.every = max(train.keep_checkpoints, 1), train.checkpoint_every
        self.engine, self.record = engine, record
        self.states = {name: state for name, state in (states or {}).items() if state is not None}
        self.saved_step: int | None = None  # the step of the last checkpoint this process wrote
        self.last_saved: Path | None = None
        checkpoint_key()  # a missing key is made, a weak one refused now: not at the first checkpoint, hours in

    def latest_tag(self) -> str | None:
        return latest_tag(self.dir)

    def due(self, step: int) -> bool:
        """Whether a checkpoint is due after optimizer step `step`: every train.checkpoint_every steps (0: only
        the one at the end)."""
        return bool(self.every) and step % self.every == 0

    def save(self, step: int) -> Path:
        """All ranks call this, after optimizer step `step`: the engine's files, every state (their state_dicts
        are taken on every rank: the RNG's gathers all ranks'), the full fp32 weights, and meta.json, for people
        and for `mshg export`: where training stood and the model record. A second call at the same step
        returns the first's checkpoint (checkpoint_every fell on the last step)."""
        if self.saved_step == step:
            return self.last_saved
        saved = {name: state.state_dict() for name, state in self.states.items()}
        tensors = {name: d for name, d in saved.items() if holds_tensors_only(d)}
        tensors["weights"] = full_state_dict(self.engine.module, self.engine.zero_optimization_stage())
        client_state = {"step": step, **{name: d for name, d in saved.items() if name not in tensors}}
        data = saved.get("data", {})
        meta = {"step": step, "engine_steps": self.engine.global_steps, "micro_batches": data.get("drawn"),
                "epoch": data.get("epoch"), "position": data.get("position"), "world_size": self.world.size,
                "zero_stage": self.engine.zero_optimization_stage(), **self.record.fields()}
        return self.write(step, client_state, meta, tensors)

    def write(self, step: int, client_state: dict, meta: dict, tensors: dict[str, dict]) -> Path:
        """All ranks write their part of the tag (DeepSpeed's files, with `client_state`); then rank 0 adds
        `meta` (<tag>/meta.json) and `tensors` ({name: {key: tensor}}, <tag>/<name>.safetensors), signs the
        tag and names it `latest`."""
        tag = f"step{step:08d}"
        partial = PARTIAL + tag
        if self.world.is_main:  # leftovers of a crash, or of an earlier attempt at this very tag
            self.dir.mkdir(parents=True, exist_ok=True)
            for old in [*self.dir.glob(PARTIAL + "*"), *self.dir.glob(UNIVERSAL + "*")]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier(self.world.size)
        try:
            self.engine.save_checkpoint(str(self.dir), tag=partial, client_state=client_state, save_latest=False)
        except (OSError, RuntimeError) as e:
            raise self.write_failed(partial, e) from None
        _barrier(self.world.size)  # every rank's part of this tag is written
        if self.world.is_main:
            try:
                (self.dir / partial / META).write_text(json.dumps(meta, indent=1))
                for name, state in tensors.items():
                    save_file(state, str(self.dir / partial / f"{name}.safetensors"))
                sign(self.dir / partial)
                _fsync_tree(self.dir / partial)
            except (OSError, RuntimeError) as e:
                raise self.write_failed(partial, e) from None
            if (self.dir / tag).exists():  # written before by a run that crashed before naming it latest
                shutil.rmtree(self.dir / tag)
            os.replace(self.dir / partial, self.dir / tag)
            tmp = self.dir / f".{LATEST}.tmp"
            with open(tmp, "w") as f:
                f.write(tag)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / LATEST)
            _fsync_dir(self.dir)
            self._prune(keep_also=tag)
        _barrier(self.world.size)
        self.saved_step, self.last_saved = step, self.dir / tag
        return self.dir / tag

    def write_failed(self, partial: str, error: Exception) -> OSError:
        """A checkpoint that could not be written (a full disk shows as torch's `enforce fail at
        inline_container.cc` RuntimeError): the half-written folder is removed, the previous checkpoint
        stays `latest`, and the error says so in words, with the path."""
        shutil.rmtree(self.dir / partial, ignore_errors=True)
        free = shutil.disk_usage(self.dir).free if self.dir.exists() else 0
        full = getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error) or (
            "inline_container" in str(error) and free < 64 << 20)
        what = "no space left on device" if full else f"{type(error).__name__}: {str(error).splitlines()[0]}"
        try:
            kept = self.latest_tag()
        except FileNotFoundError:
            kept = None
        return OSError(errno.ENOSPC if full else errno.EIO,
                       f"{what} while writing checkpoint {self.dir / partial} ({free / 2**20:.1f} MiB free there); "
                       f"removed it, {'kept ' + str(self.dir / kept) + ' as latest' if kept else 'no earlier checkpoint'}")

    def load(self, tag: str) -> dict:
        """Loads checkpoint `tag` into the engine, after checking its signature; returns its client_state (the
        step, and the states by name: the caller decides how they continue). Every rank checks, with its own
        key, the files it unpickles (rank 0 all of them): a node whose copy differs is caught too. A refusal on
        any rank stops every rank, before DeepSpeed loads.

        Written by another number of ranks, a ZeRO checkpoint's optimizer state is partitioned for that
        number: rank 0 converts it to DeepSpeed's universal checkpoint (one file per parameter and state,
        `to_universal`), which the engine (built with `checkpoint.load_universal`, see `deepspeed_config`)
        partitions for this run; the BatchNorm statistics, which the universal load leaves alone, come from
        the tag's weights.safetensors."""
        engine = self.engine
        self.verify(tag, all_files=False)
        elastic = (written_by(self.dir, tag) or self.world.size) != self.world.size and engine.zero_optimization()
        load_tag = self.to_universal(tag) if elastic else tag
        try:
            path, client_state = engine.load_checkpoint(str(self.dir), tag=load_tag)
        except (OSError, RuntimeError, EOFError, ValueError, KeyError, AssertionError) as e:
            raise ConfigError(f"{self.dir / tag}: DeepSpeed cannot load this checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
        finally:
            if elastic:
                _barrier(self.world.size)
                if self.world.is_main:
                    shutil.rmtree(self.dir / load_tag, ignore_errors=True)
        if path is None:
            raise ConfigError(f"{self.dir / tag}: DeepSpeed could not load this checkpoint")
        if elastic:
            restore_rmsprop_state(engine.optimizer.optimizer)
            saved = self.load_tensors(tag, "weights")
            for name, buffer in engine.module.named_buffers():
                buffer.copy_(saved[name])
            check_resharded(engine, saved, client_state["step"], f"{self.dir / tag}")
        self.saved_step, self.last_saved = client_state["step"], self.dir / tag
        return client_state

    def verify(self, tag: str, all_files: bool) -> None:
        """check_signature on every rank (each its own files, or with `all_files` every file); one rank's
        refusal stops all of them, with its message."""
        verdict = None
        try:
            check_signature(self.dir / tag, rank=None if all_files or self.world.is_main else self.world.rank)
        except ConfigError as e:
            verdict = str(e) if self.world.is_main else f"rank {self.world.rank}: {e}"
        verdict = next((v for v in gather_objects(verdict, self.world) if v), None)
        if verdict:
            raise ConfigError(verdict)

    def to_universal(self, tag: str) -> str:
        """Rank 0 converts checkpoint `tag` (its signature checked) to DeepSpeed's universal format in
        `.universal-<tag>/`, signs it and every rank checks that signature before DeepSpeed unpickles it.
        Returns its tag; `load` removes it after loading."""
        out, error = self.dir / (UNIVERSAL + tag), None
        if self.world.is_main:
            try:
                convert_to_universal(self.dir / tag, out)
                sign(out)
            except Exception as e:  # noqa: BLE001 - whatever the converter raises, the resume stops with it in words
                ranks = written_by(self.dir, tag)
                error = (f"{self.dir / tag}: written by {ranks} rank(s); converting it for {self.world.size} with "
                         f"DeepSpeed's ds_to_universal failed ({type(e).__name__}: {first_line(e)}): resume with "
                         f"{ranks} rank(s), or start a new run from its weights with train.init_from={self.dir.parent}")
        error = broadcast_object(error, self.world)
        if error:
            raise ConfigError(error)
        self.verify(UNIVERSAL + tag, all_files=True)
        return UNIVERSAL + tag

    def load_tensors(self, tag: str, name: str) -> dict | None:
        """<tag>/<name>.safetensors as a tensor dict, or None when the checkpoint has none."""
        path = self.dir / tag / f"{name}.safetensors"
        return load_file(str(path)) if path.is_file() else None

    def _prune(self, keep_also: str) -> None:
        tags = sorted(p.name for p in self.dir.glob("step*") if p.is_dir())
        for old in tags[:-self.keep]:
            if old != keep_also:
                shutil.rmtree(self.dir / old, ignore_errors=True)


# DeepSpeed's ds_to_universal, and its ZeRO-3 loader, know Adam's moments by name only (exp_avg, exp_avg_sq):
# RMSprop's one running average travels under Adam's second moment's name, and gets its own back once loaded
RMSPROP_AS_ADAM = {"square_avg": "exp_avg_sq"}


def convert_to_universal(checkpoint: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal from `checkpoint` (a tag folder, ZeRO 1/2/3) to `out`: one folder per
    parameter holding its full fp32 value and optimizer state, which the engine partitions for any number
    of ranks (`checkpoint.load_universal`). An RMSprop checkpoint is converted from a copy whose state is
    renamed to Adam's names (RMSPROP_AS_ADAM; `restore_rmsprop_state` renames it back after the load)."""
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".convert-") as tmp:
        source = checkpoint
        optim_files = sorted(checkpoint.glob("*optim_states.pt"))
        states = [torch.load(f, map_location="cpu", weights_only=False) for f in optim_files]
        if any([_rename_state_keys(state, RMSPROP_AS_ADAM) for state in states]):  # every file: a list, not lazily
            source = Path(tmp) / "renamed"
            shutil.copytree(checkpoint, source, ignore=shutil.ignore_patterns("*optim_states.pt"))
            for f, state in zip(optim_files, states):
                torch.save(state, source / f.name)
        args = argparse.Namespace(input_folder=str(source), output_folder=str(out), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            ds_to_universal.main(args)  # its progress bars and prints are not the run's log
    (out.parent / "latest_universal").unlink(missing_ok=True)  # the converter's; `latest` is the run's


def restore_rmsprop_state(optimizer) -> None:
    """After a universal load: RMSprop's running average back under its own name (RMSPROP_AS_ADAM), the
    placeholder first moment dropped. Nothing to do for Adam."""
    if isinstance(optimizer, torch.optim.RMSprop):
        for state in optimizer.state.values():
            for own, adams in RMSPROP_AS_ADAM.items():
                if adams in state:
                    state[own] = state.pop(adams)
            state.pop("exp_avg", None)


def _rename_state_keys(tree, names: dict[str, str]) -> bool:
    """Renames, in place, the per-tensor state entries (dicts holding `names`' keys) anywhere in `tree`; each
    renamed entry also gets Adam's first moment as a placeholder (the converter requires it; it is dropped
    after). True when anything was renamed."""
    found = False
    if isinstance(tree, dict):
        if any(k in tree for k in names):
            for old, new in names.items():
                tree[new] = tree.pop(old)
            tree.setdefault("exp_avg", tree[next(iter(names.values()))])
            return True
        for value in tree.values():
            found |= _rename_state_keys(value, names)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            found |= _rename_state_keys(value, names)
    return found


def check_resharded(engine, saved: dict[str, torch.Tensor], step: int, where: str) -> None:
    """After a load resharded for another number of ranks: the model equals the checkpoint's weights
    (weights.safetensors; gathered under ZeRO-3) and the optimizer holds state at the checkpoint's step for
    each of its tensors. A conversion that lost either is refused here, not noticed hours later as a run
    that trains from a fresh optimizer."""
    now = full_state_dict(engine.module, engine.zero_optimization_stage())
    differ = [k for k in saved if k not in now or not torch.equal(now[k].to(saved[k].dtype), saved[k])]
    states = list(engine.optimizer.optimizer.state.values())  # the torch optimizer inside ZeRO's
    steps = sorted({int(s["step"]) for s in states if "step" in s})
    if differ or not states or steps != [step]:
        what = (f"{len(differ)} weight tensor(s) differ from its weights.safetensors ({', '.join(differ[:3])})"
                if differ else f"the optimizer's state is at step(s) {steps or 'none'}, not {step}")
        raise ConfigError(f"{where}: resharding for this number of ranks failed: {what}; resume with the number of "
                          f"ranks that wrote it")


def full_state_dict(module: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """The model's whole fp32 state dict, on every rank (ZeRO-3 partitions the weights: gathered first)."""
    if zero_stage == 3:
        import deepspeed  # here, not at the top: after distributed.init set DS_ACCELERATOR

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
