"""DeepSpeed checkpoints of a run: `runs/NAME/checkpoints/<tag>/` plus a `latest` file.

DeepSpeed's engine saves and loads the model, optimizer, scheduler and ZeRO partitions; the trainer's
own state (step, epoch, position in the epoch, stop detector, RNG of every rank, MLflow run id)
travels as `client_state`.

Atomicity: every rank writes into `.partial-<tag>/`; after a barrier (all ranks' files are on disk)
rank 0 fsyncs them, renames the folder to `<tag>` and only then replaces `latest` (written to a
temporary file, fsynced, renamed). So a `step*` folder is always complete, `latest` only ever names a
complete one, and a crash or kill at any moment leaves the previous checkpoint usable; a leftover
`.partial-*` folder is removed by the next save. The last `keep` tags are kept.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from pipeline.config import ConfigError

LATEST = "latest"
PARTIAL = ".partial-"
META = "meta.json"


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

    def latest_tag(self) -> str | None:
        return latest_tag(self.dir)

    def save(self, engine, step: int, client_state: dict, meta: dict | None = None) -> Path:
        """All ranks call this. `meta` (JSON-able, rank 0's) goes to <tag>/meta.json, readable
        without unpickling (the export reads the run's config and joints from it)."""
        tag = f"step{step:08d}"
        partial = PARTIAL + tag
        if self.world.is_main:  # leftovers of a crash, or of an earlier attempt at this very tag
            self.dir.mkdir(parents=True, exist_ok=True)
            for old in self.dir.glob(PARTIAL + "*"):
                shutil.rmtree(old, ignore_errors=True)
        _barrier(self.world.size)
        engine.save_checkpoint(str(self.dir), tag=partial, client_state=client_state, save_latest=False)
        _barrier(self.world.size)  # every rank's part of this tag is written
        if self.world.is_main:
            if meta is not None:
                (self.dir / partial / META).write_text(json.dumps(meta, indent=1))
            _fsync_tree(self.dir / partial)
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

    def resume_tag(self, mode: str = "auto") -> str | None:
        """The tag to resume from (rank 0's view of `latest`, on every rank), or None for a new run.
        mode: auto (resume if there is a checkpoint), never (error if there is one), require (error
        if there is none)."""
        from pipeline.distributed import broadcast_object

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
            raise ConfigError(f"train.resume=require, but {self.dir} has no checkpoint (no `latest`)")
        if tag is not None and mode == "never":
            raise ConfigError(f"train.resume=never, but {self.dir} already holds checkpoint {tag}: "
                              f"pick another train.run_name, or resume with train.resume=auto")
        return tag

    def load(self, engine, tag: str) -> dict:
        """Loads checkpoint `tag` into the engine; returns the trainer's client_state."""
        path, client_state = engine.load_checkpoint(str(self.dir), tag=tag)
        if path is None:
            raise RuntimeError(f"{self.dir / tag}: DeepSpeed could not load this checkpoint")
        self.saved_step, self.last_saved = client_state["step"], self.dir / tag
        return client_state

    def _prune(self, keep_also: str) -> None:
        tags = sorted(p.name for p in self.dir.glob("step*") if p.is_dir())
        for old in tags[:-self.keep]:
            if old != keep_also:
                shutil.rmtree(self.dir / old, ignore_errors=True)
