"""DeepSpeed checkpoints of a run: `runs/NAME/checkpoints/<tag>/` plus a `latest` file.

DeepSpeed's engine saves and loads the model, optimizer, scheduler and ZeRO partitions; the trainer's
own state (step, epoch, stop detector, data position, RNG, MLflow run id) travels as `client_state`.
`latest` is written by us only after every rank has finished writing the tag, via a temporary file
and an atomic rename, so it never names a half-written checkpoint. The last `keep` tags are kept.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist

LATEST = "latest"


class Checkpointer:
    def __init__(self, directory: Path, keep: int, is_main: bool):
        self.dir = Path(directory)
        self.keep = max(keep, 1)
        self.is_main = is_main

    def latest_tag(self) -> str | None:
        f = self.dir / LATEST
        if not f.is_file():
            return None
        tag = f.read_text().strip()
        return tag if (self.dir / tag).is_dir() else None

    def save(self, engine, step: int, client_state: dict) -> Path:
        tag = f"step{step:08d}"
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        dist.barrier()  # every rank's shard of this tag is on disk
        if self.is_main:
            tmp = self.dir / f".{LATEST}.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.dir / LATEST)
            self._prune(keep_also=tag)
        dist.barrier()
        return self.dir / tag

    def load(self, engine) -> dict | None:
        """Loads `latest` into the engine; returns the trainer's client_state, or None if none."""
        tag = self.latest_tag()
        if tag is None:
            return None
        path, client_state = engine.load_checkpoint(str(self.dir), tag=tag)
        if path is None:
            raise RuntimeError(f"{self.dir / tag}: DeepSpeed could not load this checkpoint")
        return client_state

    def _prune(self, keep_also: str) -> None:
        tags = sorted(p.name for p in self.dir.glob("step*") if p.is_dir())
        for old in tags[:-self.keep]:
            if old != keep_also:
                shutil.rmtree(self.dir / old, ignore_errors=True)
