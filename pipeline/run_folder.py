"""A run's folder, runs/<run_name>/: what a run writes besides its checkpoints, and its log.

    folder = RunFolder(cfg.train.out_dir, run_name, is_main=world.is_main)
    folder.log("...")            # rank 0: to stdout and train.log, time-stamped
    folder.save_config(cfg)      # config.yaml: what was run ("auto" settings resolved)
    folder.write_summary(...)    # summary.txt: the lines the run ends with (launchers repeat them)

model.safetensors is written by pipeline.weights, checkpoints/ by pipeline.checkpoint.
"""
from __future__ import annotations

import fcntl
import os
import socket
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from pipeline.config import Config, ConfigError, save_config

LOG_FILE, SUMMARY_FILE, CONFIG_FILE, LOCK_FILE = "train.log", "summary.txt", "config.yaml", ".lock"
# the run's MLflow run id, written by the tracker when the run starts: how `mshg train --ranks N` finds the
# run to mark FAILED after a rank died (pipeline.runs.mark_failed), never another run of the same name
RUN_ID_FILE = "mlflow_run_id"


class RunEnd(NamedTuple):
    """How a run ended: why, at which step, after how many seconds of training, and what it left."""
    reason: str
    step: int
    seconds: float
    checkpoint: Path
    weights: Path | None  # model.safetensors (rank 0's; None where the run was preempted)


def default_run_name(cfg: Config) -> str:
    """train.run_name, or <config name>-<timestamp> (`mshg train --ranks N` fixes it before the launcher
    starts the ranks, so that every rank and the summary agree)."""
    return cfg.train.run_name or f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"


def writable_dir(path: Path, option: str) -> None:
    """The nearest existing folder of `path` must be writable, checked before any work and without
    writing anything."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}: cannot write {path} ({existing} is {'not a folder' if not existing.is_dir() else 'not writable'})")


class RunFolder:
    def __init__(self, out_dir: str | Path, run_name: str, is_main: bool = True):
        self.path = Path(out_dir) / run_name
        self.is_main = is_main
        self.notes: list[str] = []  # lines the summary ends with (an elastic resume's)
        writable_dir(self.path, "train.out_dir")

    def lock(self) -> None:
        """Rank 0 holds the folder for the run's life: a second run of the same name (a sweep, two jobs) fails at
        once naming the holder, instead of the two deleting each other's checkpoints. An flock: the kernel
        releases it when the process ends, crash and SIGKILL included, so a resume or a requeue takes it again."""
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / LOCK_FILE, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ConfigError(f"{self.path}: in use by another run ({holder}); wait for it to end or give this "
                              f"run another train.run_name") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now():%Y-%m-%d %H:%M:%S}\n")
        f.flush()
        self._lock_file = f  # kept open: closing it would release the lock

    def check_free(self) -> None:
        """Fail now if another run holds the folder (the launcher's check before it starts the ranks)."""
        if (self.path / LOCK_FILE).is_file():
            self.lock()
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    @property
    def log_file(self) -> Path:
        return self.path / LOG_FILE

    def log(self, message: str) -> None:
        """Rank 0 speaks for the run: the line on stdout and in train.log."""
        if self.is_main:
            line = f"[{datetime.now():%H:%M:%S}] {message}"
            print(line, flush=True)
            self.path.mkdir(parents=True, exist_ok=True)
            with open(self.log_file, "a") as f:
                f.write(line + "\n")

    def save_config(self, cfg: Config) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.path / CONFIG_FILE)
        return self.path / CONFIG_FILE

    def write_summary(self, headline: str | None, end: RunEnd, run_id: str | None, ui_command: str) -> str:
        """The lines a run ends with; also kept in summary.txt so launchers can repeat them."""
        lines = [headline] if headline else []
        lines += [f"stopped at step {end.step} ({end.reason}) after {end.seconds:.0f} s of training",
                  f"checkpoint: {end.checkpoint}", f"weights:    {end.weights}", f"run dir:    {self.path}",
                  f"MLflow run {run_id}; look at it with:", f"  {ui_command}", *self.notes]
        text = "\n".join(lines)
        (self.path / SUMMARY_FILE).write_text(text + "\n")
        return text
