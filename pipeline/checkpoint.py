"""DeepSpeed checkpoints of a run: `runs/NAME/checkpoints/<tag>/` plus a `latest` file.

DeepSpeed's engine saves and loads the model, optimizer, scheduler and ZeRO partitions; the trainer's
own state (step, epoch, position in the epoch, stop detector, RNG of every rank, MLflow run id)
travels as `client_state`.

Atomicity: every rank writes into `.partial-<tag>/`; after a barrier (all ranks' files are on disk)
rank 0 fsyncs them, renames the folder to `<tag>` and only then replaces `latest` (written to a
temporary file, fsynced, renamed). So a `step*` folder is always complete, `latest` only ever names a
complete one, and a crash or kill at any moment leaves the previous checkpoint usable; a leftover
`.partial-*` folder is removed by the next save. The last `keep` tags are kept.

Beside DeepSpeed's files every tag holds `weights.safetensors` (the fp32 weights, gathered under
ZeRO-3) and, with a weight average, `ema.safetensors`: what `mshg export` reads, never unpickling.
DeepSpeed's own files are pickles, which run code when loaded; so every tag is signed: rank 0
writes `signature.json`, the sha256 of each file and an HMAC of them under this user's checkpoint
key (`MSHG_CHECKPOINT_KEY`, default ~/.config/mshg/checkpoint.key, made on first use, mode 600;
share it across a cluster's nodes through the home directory; a key under 32 bytes or readable by
others is refused). A resume checks the signature before DeepSpeed unpickles anything, on every rank
for the files that rank loads: a checkpoint that this key did not sign, or that changed since, is
refused (docs/cluster.md).
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from pipeline.config import ConfigError
from pipeline.distributed import broadcast_object, gather_objects

LATEST = "latest"
PARTIAL = ".partial-"
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


class Checkpointer:
    def __init__(self, directory: Path, keep: int, world):
        self.dir = Path(directory)
        self.keep = max(keep, 1)
        self.world = world
        self.saved_step: int | None = None  # the step of the last checkpoint this process wrote
        self.last_saved: Path | None = None
        checkpoint_key()  # a missing key is made, a weak one refused now: not at the first checkpoint, hours in

    def latest_tag(self) -> str | None:
        return latest_tag(self.dir)

    def save(self, engine, step: int, client_state: dict, meta: dict | None = None,
             tensors: dict[str, dict] | None = None) -> Path:
        """All ranks call this. `meta` (JSON-able, rank 0's) goes to <tag>/meta.json, readable
        without unpickling (the export reads the run's config and joints from it); `tensors` (rank
        0's, {name: {key: tensor}}, e.g. the weight average) to <tag>/<name>.safetensors."""
        tag = f"step{step:08d}"
        partial = PARTIAL + tag
        if self.world.is_main:  # leftovers of a crash, or of an earlier attempt at this very tag
            self.dir.mkdir(parents=True, exist_ok=True)
            for old in self.dir.glob(PARTIAL + "*"):
                shutil.rmtree(old, ignore_errors=True)
        _barrier(self.world.size)
        try:
            engine.save_checkpoint(str(self.dir), tag=partial, client_state=client_state, save_latest=False)
        except (OSError, RuntimeError) as e:
            raise self.write_failed(partial, e) from None
        _barrier(self.world.size)  # every rank's part of this tag is written
        if self.world.is_main:
            try:
                if meta is not None:
                    (self.dir / partial / META).write_text(json.dumps(meta, indent=1))
                for name, state in (tensors or {}).items():
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

    def resume_tag(self, mode: str = "auto") -> str | None:
        """The tag to resume from (rank 0's view of `latest`, on every rank), or None for a new run.
        mode: auto (resume if there is a checkpoint), never (error if there is one), require (error
        if there is none)."""
        found: tuple[str | None, str | None] = (None, None)
        if self.world.is_main:
            try:
                found = (self.latest_tag(), None)
            except FileNotFoundError as e:
                found = (None, str(e))
        tag, error = broadcast_object(found, self.world)
        if error:
            raise ConfigError(error)
        if tag is None and mode == "require":
            raise nothing_to_resume(self.dir)
        if tag is not None and mode == "never":
            raise ConfigError(f"train.resume=never, but {self.dir} already holds checkpoint {tag}: "
                              f"pick another train.run_name, or resume with train.resume=auto")
        return tag

    def load(self, engine, tag: str) -> dict:
        """Loads checkpoint `tag` into the engine, after checking its signature; returns the trainer's
        client_state. Every rank checks, with its own key, the files it unpickles (rank 0 all of them): a node
        whose copy differs is caught too. A refusal on any rank stops every rank, before DeepSpeed loads."""
        verdict = None
        try:
            check_signature(self.dir / tag, rank=None if self.world.is_main else self.world.rank)
        except ConfigError as e:
            verdict = str(e) if self.world.is_main else f"rank {self.world.rank}: {e}"
        verdict = next((v for v in gather_objects(verdict, self.world) if v), None)
        if verdict:
            raise ConfigError(verdict)
        written_by = json.loads((self.dir / tag / META).read_text()).get("world_size") \
            if (self.dir / tag / META).is_file() else None
        if written_by is not None and written_by != self.world.size:  # DeepSpeed would raise deep in ZeRO's loader
            raise ConfigError(f"{self.dir / tag}: written by {written_by} rank(s), but this run has {self.world.size}: "
                              f"resuming on another number of ranks is not supported yet; resume with {written_by} "
                              f"rank(s), or start a new run from its weights with "
                              f"train.init_from={self.dir.parent}")
        try:
            path, client_state = engine.load_checkpoint(str(self.dir), tag=tag)
        except (OSError, RuntimeError, EOFError, ValueError, KeyError) as e:
            raise ConfigError(f"{self.dir / tag}: DeepSpeed cannot load this checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
        if path is None:
            raise ConfigError(f"{self.dir / tag}: DeepSpeed could not load this checkpoint")
        self.saved_step, self.last_saved = client_state["step"], self.dir / tag
        return client_state

    def load_tensors(self, tag: str, name: str) -> dict | None:
        """<tag>/<name>.safetensors as a tensor dict, or None when the checkpoint has none."""
        path = self.dir / tag / f"{name}.safetensors"
        return load_file(str(path)) if path.is_file() else None

    def _prune(self, keep_also: str) -> None:
        tags = sorted(p.name for p in self.dir.glob("step*") if p.is_dir())
        for old in tags[:-self.keep]:
            if old != keep_also:
                shutil.rmtree(self.dir / old, ignore_errors=True)


def full_state_dict(module: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """The model's whole fp32 state dict, on every rank (ZeRO-3 partitions the weights: gathered first)."""
    if zero_stage == 3:
        import deepspeed  # here, not at the top: after distributed.init set DS_ACCELERATOR

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
