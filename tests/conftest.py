"""Shared fixtures: real shards of the embedded LSPET sample (shards/sample/lspet), a tiny config."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main as mshg

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "shards" / "sample" / "lspet"
SHARED_DATA = REPO.parent / "shared" / "data"  # ../shared/data, present on the team's machines and in CI


def shard_sample(out: Path, first: int, last: int) -> Path:
    assert mshg(["shard", "lspet", "--root", str(SAMPLE), "--out", str(out), "--range", f"{first}:{last}",
                 "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def lspet_shards(tmp_path_factory) -> dict[str, Path]:
    """Train: images 1-48 of the embedded sample; val: 161-176 (held apart, as in the demo)."""
    root = tmp_path_factory.mktemp("shards")
    return {"train": shard_sample(root / "train", 1, 48), "val": shard_sample(root / "val", 161, 176)}


def tiny_config(tmp: Path, shards: dict[str, Path], **sections) -> Path:
    """A config small enough to train for a few steps in seconds on one core per rank."""
    import yaml

    cfg = {
        "name": "tiny",
        "model": {"channels": 16, "stages": [[2, 2], [4, 4], [8, 2]]},
        "data": {"train_shards": str(shards["train"]), "val_shards": str(shards["val"]), "input_size": 64,
                 "num_threads": 1, "shuffle_buffer": 16},
        # no MLflow model at the end (10-20 s of CPU each); tests/test_track.py logs one
        "train": {"micro_batch": 4, "out_dir": str(tmp / "runs"), "lr": 1e-3, "log_model": False},
        "stop": {"max_steps": 6},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
