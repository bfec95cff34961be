"""Faults and bad inputs, tried as a demanding user would: each gets a clear line and a truthful MLflow
status, never a traceback, a silent success, or code run from a file. 1-rank runs of the tiny config on
real shards unless a case needs 2 ranks."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline.cli import main as mshg
from tests.conftest import REPO, SAMPLE, tiny_config
from tests import helpers


def train(tmp: Path, cfg: Path, *overrides: str, ranks: int = 1) -> subprocess.CompletedProcess:
    """A training expected to fail: the caller checks its exit code and lines."""
    return helpers.train(tmp, cfg, *overrides, ranks=ranks, check=False)


def mlflow_run(tmp: Path, name: str):
    return helpers.find_run(tmp, name)[1]


def copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@contextmanager
def tmpfs(path: Path, size: str, *options: str):
    """A real small filesystem (root only): `no space left on device` and read-only for real."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"needs root to mount a tmpfs ({mounted.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def finished_run(lspet_shards, tmp_path_factory):
    """One finished 2-step run (runs/base with its checkpoint, config and weights; the MLflow store) that
    the checkpoint tests copy instead of training their own."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = tiny_config(tmp, lspet_shards, train={"run_name": "base"}, stop={"max_steps": 2})
    proc = train(tmp, cfg)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp


def copy_of(finished: Path, tmp: Path, name: str = "base", runs: Path | None = None) -> tuple[Path, Path]:
    """The finished run copied as run `name` under `runs` (default `tmp`/runs), its MLflow store (where the
    run is still named base) and config under `tmp`: (its config, its run directory)."""
    runs = runs or tmp / "runs"
    shutil.copytree(finished / "runs" / "base", runs / name)
    shutil.copy(finished / "mlflow.db", tmp / "mlflow.db")
    import yaml

    values = yaml.safe_load((finished / "tiny.yaml").read_text())
    values["train"].update(out_dir=str(runs), run_name=name)
    cfg = tmp / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(values))
    return cfg, runs / name


# --- failures are recorded and explained -------------------------------------------------------------

def test_nan_loss_is_one_line_and_a_failed_run(lspet_shards, tmp_path):
    cfg = tiny_config(tmp_path, lspet_shards, train={"run_name": "nan", "lr": 1e12, "grad_clip": 0.0,
                                                      "checkpoint_every": 1}, stop={"max_steps": 30})
    proc = train(tmp_path, cfg)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    line = re.search(r"error: (loss is \w+ at step (\d+): training diverged; the last good checkpoint is \S+)", proc.stderr)
    assert line and "train.lr" in proc.stderr, proc.stderr[-2000:]
    run = mlflow_run(tmp_path, "nan")
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("FloatingPointError: loss is")


def test_truncated_tar_names_the_shard_and_fails_the_run(lspet_shards, tmp_path, capsys):
    """Refused before any rank trains: by `mshg train --ranks 2` before the launcher, and by a rank itself."""
    shards = copy_shards(lspet_shards["train"], tmp_path / "shards")
    tar = shards / "shard-000000.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 3])  # the index still lists what was cut off
    cfg = tiny_config(tmp_path, lspet_shards, train={"run_name": "cut", "micro_batch": 4},
                      data={"train_shards": str(shards)}, stop={"max_steps": 30})
    assert mshg(["train", "--ranks", "2", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "shard-000000.tar" in err and "cut short or replaced" in err
    proc = train(tmp_path, cfg)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "shard-000000.tar" in proc.stderr and "cut short or replaced" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_rank_that_fails_mid_run_fails_the_run(lspet_shards, tmp_path):
    """A JPEG that DALI cannot decode, found by rank 1 only: the run is FAILED (marked by `mshg train`,
    since only rank 0 talks to MLflow) and the log names the shard and the sample."""
    shards = copy_shards(lspet_shards["train"], tmp_path / "shards")
    manifest = json.loads((shards / "manifest.json").read_text())
    assert [s["samples"] for s in manifest["shards"]] == [48]  # one tar: DALI gives rank 1 its samples 24-47
    tar = shards / manifest["shards"][0]["tar"]
    data = bytearray(tar.read_bytes())
    import tarfile
    with tarfile.open(tar) as t:
        images = [m for m in t.getmembers() if m.name.endswith(".jpg")]
    victim = images[-1]  # the last sample of the tar: rank 1's, never rank 0's
    data[victim.offset_data + 20: victim.offset_data + 400] = b"\x00" * 380
    tar.write_bytes(bytes(data))
    key = victim.name.split(".", 1)[0]
    cfg = tiny_config(tmp_path, lspet_shards, train={"run_name": "bad2"}, data={"train_shards": str(shards)},
                      stop={"max_steps": 30})
    proc = train(tmp_path, cfg, ranks=2)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert re.search(rf"rank 1: cannot decode \S*shard-000000\.tar sample {key} ", out), out[-3000:]
    assert "rank 0: cannot decode" not in out, out[-3000:]
    run = mlflow_run(tmp_path, "bad2")
    assert run.info.status == "FAILED", run.info.status
    assert run.data.tags.get("error")


def test_ctrl_c_checkpoints_and_a_second_one_stops_at_once(lspet_shards, tmp_path):
    cfg = tiny_config(tmp_path, lspet_shards, train={"run_name": "int"}, stop={"max_steps": 300})
    training = helpers.Training(tmp_path, cfg)
    training.wait_for()  # step 1
    time.sleep(1)
    training.proc.send_signal(signal.SIGINT)
    assert training.wait(120) == 75, training.output[-3000:]
    out = training.output
    assert "Ctrl-C: checkpointing" in out and "written" in out
    run = mlflow_run(tmp_path, "int")
    assert run.info.status == "KILLED" and run.data.tags["stop_reason"] == "signal"
    step = int(run.data.tags["stopped_at_step"])
    assert (tmp_path / "runs" / "int" / "checkpoints" / "latest").read_text() == f"step{step:08d}"
    # a second Ctrl-C while the first is being acted on: out at once, recorded as KILLED
    training = helpers.Training(tmp_path, cfg, "stop.max_steps=400")
    training.wait_for(r"resumed at step")
    time.sleep(2)
    training.proc.send_signal(signal.SIGINT)
    training.proc.send_signal(signal.SIGINT)
    code = training.wait(120)
    assert code in (75, 130), training.output[-3000:]  # 75 only if the step ended between the two signals
    assert mlflow_run(tmp_path, "int").info.status == "KILLED"


# --- checkpoints ---------------------------------------------------------------------------------------

class Payload:
    """Unpickling this runs a command: what a crafted checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_checkpoint_runs_no_code_on_resume_or_export(finished_run, tmp_path, capsys, monkeypatch):
    cfg, run_dir = copy_of(finished_run, tmp_path, "evil")
    tag = run_dir / "checkpoints" / "step00000002"
    marker = tmp_path / "pwned"
    with open(tag / "mp_rank_00_model_states.pt", "wb") as f:
        pickle.dump(Payload(marker), f)
    proc = train(tmp_path, cfg, "stop.max_steps=3")
    assert proc.returncode == 2 and "mp_rank_00_model_states.pt changed since the checkpoint was written" in proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()
    # export reads weights.safetensors: no pickle at all, the tampered file is not touched
    out = tmp_path / "w.safetensors"
    assert mshg(["export", "--checkpoint", str(tag), "--safetensors", str(out)]) == 0 and out.is_file()
    assert not marker.exists()
    # a foreign checkpoint (signed with another key) is refused before DeepSpeed unpickles it: the check
    # the trainer runs first on a resume, here in-process with another key
    from pipeline.checkpoint import check_signature
    from pipeline.config import ConfigError

    (tmp_path / "other.key").write_bytes(os.urandom(32))
    (tmp_path / "other.key").chmod(0o600)  # a key others may read is refused before the signature is looked at
    monkeypatch.setenv("MSHG_CHECKPOINT_KEY", str(tmp_path / "other.key"))
    with pytest.raises(ConfigError, match="signed with another key"):
        check_signature(finished_run / "runs" / "base" / "checkpoints" / "step00000002")
    assert not marker.exists()


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(finished_run, tmp_path):
    with tmpfs(tmp_path / "disk", "24m") as disk:
        cfg, run_dir = copy_of(finished_run, tmp_path, "full", runs=disk / "runs")  # checkpoint step 2 on the disk
        ckpts = run_dir / "checkpoints"
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * (free - 100_000))  # leave less than one checkpoint
        proc = train(tmp_path, cfg, "stop.max_steps=4", "train.checkpoint_every=1")
        assert proc.returncode == 1 and "no space left on device while writing checkpoint" in proc.stderr, \
            proc.stderr[-3000:]
        assert "kept" in proc.stderr and "Traceback" not in proc.stderr
        assert not list(ckpts.glob(".partial-*"))
        assert (ckpts / "latest").read_text() == "step00000002"
        assert mlflow_run(tmp_path, "base").info.status == "FAILED"  # the copied run continued


def test_refused_resume_changes_nothing_of_the_run(finished_run, tmp_path):
    cfg, run_dir = copy_of(finished_run, tmp_path)
    saved = (run_dir / "config.yaml").read_text()
    # every file but the run's lock (.lock names its holder, the refused attempt while it ran)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.name != ".lock")
    proc = train(tmp_path, cfg, "data.seed=5", "stop.max_steps=3")  # another data order: refused
    assert proc.returncode == 2 and "cannot resume with another data order (data_seed" in proc.stderr, proc.stderr[-2000:]
    assert (run_dir / "config.yaml").read_text() == saved
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.name != ".lock") == before


# --- inputs checked before the work -------------------------------------------------------------------

def test_validation_shards_of_another_joint_set_fail_before_training(lspet_shards, tmp_path, capsys, monkeypatch):
    other = copy_shards(lspet_shards["val"], tmp_path / "other")
    manifest = json.loads((other / "manifest.json").read_text())
    from shards.datasets import MPII_JOINTS

    manifest.update(dataset="mpii", joints=list(MPII_JOINTS))  # MPII's 16 joints, named as MPII names them
    (other / "manifest.json").write_text(json.dumps(manifest))
    cfg = tiny_config(tmp_path, lspet_shards, data={"val_shards": str(other)})
    with helpers.no_rank_started(monkeypatch):
        assert mshg(["train", "--ranks", "2", "--config", str(cfg)]) == 2  # before the launcher
    assert "has other joints than data.train_shards" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    proc = train(tmp_path, cfg)  # and by a rank itself, before its first step
    assert proc.returncode == 2 and "has other joints than data.train_shards" in proc.stderr
    assert not re.search(r"step +\d+ epoch", proc.stdout), proc.stdout[-3000:]
    # the rank held its run folder's lock (taken first, pipeline/run_folder.py) and wrote nothing else
    written = [p.name for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert set(written) <= {".lock"}, written


def test_read_only_out_dir_unwritable_outputs_and_bad_weights_are_lines(lspet_shards, tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "1m", "ro") as ro:
        cfg = tiny_config(tmp_path, lspet_shards, train={"out_dir": str(ro / "runs")})
        proc = train(tmp_path, cfg)
        assert proc.returncode == 2 and "train.out_dir: cannot write" in proc.stderr and "Traceback" not in proc.stderr
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"PK\x03\x04 this is a zip, not weights")
    image = str(SAMPLE / "images" / "im00161.jpg")
    assert mshg(["predict", "--checkpoint", str(garbage), "--out", str(tmp_path / "p.json"), image]) == 2
    assert "not a safetensors weights file" in capsys.readouterr().err
    t0 = time.monotonic()
    assert mshg(["predict", "--checkpoint", str(garbage), "--out", str(tmp_path / "no" / "p.json"), image]) == 2
    assert "folder" in capsys.readouterr().err and time.monotonic() - t0 < 5  # before loading anything
    assert mshg(["evaluate", "--checkpoint", str(garbage), "--shards", str(lspet_shards["val"]),
                 "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    from pipeline.config import ConfigError, load_config
    for bad in ("train.lr=nan", "stop.max_minutes=-1", "train.ema_decay=1.5", "eval.modules=[9]"):
        with pytest.raises(ConfigError):
            load_config(REPO / "configs" / "msc_hg_cpu.yaml", [bad])
    # every data setting is refused by the config, by name, before DeepSpeed or MLflow start
    for bad, name in [("data.interp=bilinear", "data.interp"), ("data.flip_prob=2", "data.flip_prob"),
                      ("data.scale_range=[1.2,0.8]", "data.scale_range"), ("data.sigma=0", "data.sigma"),
                      ("data.num_threads=0", "data.num_threads"), ("data.color_jitter=1.5", "data.color_jitter"),
                      ("train.cpu_threads=-1", "train.cpu_threads"), ("train.loss_fg_weight=-1", "train.loss_fg_weight"),
                      ("train.loss_fg_weight=inf", "train.loss_fg_weight"),
                      ("train.loss_twin_weight=-1", "train.loss_twin_weight"),
                      ("train.loss_twin_weight=nan", "train.loss_twin_weight")]:
        with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
            load_config(REPO / "configs" / "msc_hg_cpu.yaml", [bad])


@pytest.mark.quick
@pytest.mark.parametrize("bad", [
    "train.log_every=0", "train.eval_every=-1", "data.seed=-1", f"data.seed={2**31}", "stop.max_epochs=-1",
    "train.grad_clip=-1", "train.weight_decay=-0.1", "train.cos_min_ratio=1.5", "train.cos_min_ratio=-0.1",
    "train.lr_step_gamma=0", "train.lr_step_gamma=2", "train.lr_step_every=-1", "stop.tolerance=0",
    "stop.expected_loss=-1", "data.padding=inf", "data.sigma=inf", "data.rotation_deg=inf", "data.train_weight=nan",
    "data.scale_range=[0.8,inf]", "model.hg_min_size=0"])
def test_every_number_out_of_range_is_refused_by_name(bad):
    """Issue 48: these failed late (log_every=0 after DeepSpeed and MLflow started), on one rank (seed=-1) or
    silently (max_epochs=-1 stopped at step 0 with exit 0); now the config refuses each, naming the key."""
    from pipeline.config import ConfigError, load_config

    key = bad.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(key) + " must be"):
        load_config(REPO / "configs" / "msc_hg_cpu.yaml", [bad])


@pytest.mark.quick
def test_a_short_or_shared_checkpoint_key_is_refused_naming_the_file(tmp_path, monkeypatch):
    """Issue 48: an empty key file signed checkpoints with an empty HMAC key (anyone can forge those), and a
    key others can read lets them sign. Both are refused, naming the file, when the run starts (Checkpointer)."""
    from pipeline.checkpoint import Checkpointer, checkpoint_key
    from pipeline.config import ConfigError, TrainConfig
    from pipeline.distributed import World

    key = tmp_path / "checkpoint.key"
    monkeypatch.setenv("MSHG_CHECKPOINT_KEY", str(key))
    world = World(rank=0, local_rank=0, size=1, device=__import__("torch").device("cpu"))
    key.touch(mode=0o600)
    with pytest.raises(ConfigError, match=f"{re.escape(str(key))} holds 0 bytes, fewer than 32"):
        checkpoint_key()
    key.write_bytes(os.urandom(16))
    with pytest.raises(ConfigError, match=f"{re.escape(str(key))} holds 16 bytes"):
        Checkpointer(tmp_path / "checkpoints", world, TrainConfig())
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    with pytest.raises(ConfigError, match=f"{re.escape(str(key))} is readable or writable by others \\(mode 644\\)"):
        Checkpointer(tmp_path / "checkpoints", world, TrainConfig())
    key.chmod(0o600)
    assert checkpoint_key() == key.read_bytes()
    made = tmp_path / "new" / "checkpoint.key"  # first use: 32 random bytes, mode 600
    monkeypatch.setenv("MSHG_CHECKPOINT_KEY", str(made))
    assert len(checkpoint_key()) == 32 and made.stat().st_mode & 0o777 == 0o600


@pytest.mark.quick
def test_every_rank_checks_the_checkpoint_files_it_unpickles(tmp_path, monkeypatch):
    """Issue 48: only rank 0 checked a checkpoint's signature; the other ranks unpickled their ZeRO partitions
    on rank 0's word (on a node with its own copy, unchecked). Now each rank checks the files it loads (rank 0
    all of them) with its own key, and a refusal on any rank stops all of them before DeepSpeed loads."""
    import torch

    from pipeline.checkpoint import Checkpointer, check_signature, sign
    from pipeline.config import ConfigError, TrainConfig
    from pipeline.distributed import World

    key = tmp_path / "checkpoint.key"
    key.touch(mode=0o600)
    key.write_bytes(os.urandom(32))
    monkeypatch.setenv("MSHG_CHECKPOINT_KEY", str(key))
    tag = tmp_path / "checkpoints" / "step00000002"
    tag.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        (tag / name).write_bytes(name.encode())
    sign(tag)
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"a pickle that runs code")
    check_signature(tag, rank=2)  # another rank's file is not what rank 2 unpickles
    with pytest.raises(ConfigError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt changed"):
        check_signature(tag, rank=1)

    class Engine:
        loaded = False

        def load_checkpoint(self, *args, **kwargs):
            Engine.loaded = True
            return str(tag), {"step": 2}

    rank1 = World(rank=1, local_rank=1, size=1, device=torch.device("cpu"))  # rank 1's view (a world of one)
    with pytest.raises(ConfigError, match="rank 1: .*zero_pp_rank_1_mp_rank_00_optim_states.pt changed"):
        Checkpointer(tmp_path / "checkpoints", rank1, TrainConfig(), Engine()).load("step00000002")
    assert not Engine.loaded


def test_evaluate_on_a_truncated_tar_is_a_line(finished_run, lspet_shards, tmp_path, capsys):
    shards = copy_shards(lspet_shards["val"], tmp_path / "val")
    tar = shards / "shard-000000.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    code = mshg(["evaluate", "--checkpoint", str(finished_run / "runs" / "base"), "--shards", str(shards)])
    err = capsys.readouterr().err
    assert code == 2 and "shard-000000.tar" in err and "cut short or replaced" in err and "Traceback" not in err


def test_runs_against_an_unreachable_server_is_quick_and_one_line(tmp_path):
    """Timed from after the imports (seconds of them on 2 loaded cores): what is bounded is MLflow's
    retrying, which without the project's HTTP defaults takes minutes."""
    port = helpers.free_port()  # nothing listens here once the socket is closed
    timed = ("import sys, time\n"
             "import pipeline.runs  # mlflow with it\n"
             "from pipeline.cli import main\n"
             "t0 = time.monotonic()\n"
             f"code = main(['runs', '--tracking-uri', 'http://127.0.0.1:{port}'])\n"
             "print(f'ELAPSED {time.monotonic() - t0:.1f}', flush=True)\n"
             "sys.exit(code)\n")
    proc = helpers.run_python(tmp_path, timed, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
    assert float(proc.stdout.split("ELAPSED ")[1]) < 30, proc.stdout
    assert "cannot read runs from http://127.0.0.1" in proc.stderr and "Traceback" not in proc.stderr


def test_one_rank_run_listens_only_on_loopback(lspet_shards, tmp_path):
    """A world of one has no rendezvous: no TCP store on every interface, gloo's pair socket on `lo`."""
    import psutil

    cfg = tiny_config(tmp_path, lspet_shards, train={"run_name": "ports"}, stop={"max_steps": 400})
    training = helpers.Training(tmp_path, cfg)
    try:
        training.wait_for()  # step 1
        assert training.proc.poll() is None, "the trainer must still be running while its sockets are read"
        listening = [c for c in psutil.Process(training.proc.pid).net_connections(kind="inet")
                     if c.status == "LISTEN"]
        # gloo always opens its pair listener, even for one rank: no socket seen means nothing was checked
        assert listening, "no listening socket found: the check saw nothing"
        assert all(c.laddr.ip in ("127.0.0.1", "::1") for c in listening), listening
    finally:
        training.kill()


def test_verify_flags_a_jpeg_cut_short_with_a_fake_end_marker(tmp_path, capsys):
    root = tmp_path / "lspet"
    shutil.copytree(SAMPLE, root)
    victim = root / "images" / "im00003.jpg"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] + b"\xff\xd9")
    out = tmp_path / "out"
    assert mshg(["shard", "lspet", "--root", str(root), "--range", "1:5", "--out", str(out), "--quiet"]) == 0
    assert mshg(["verify", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "lspet_000003" in err and "premature end of data segment" in err


def test_a_bug_keeps_its_traceback_while_a_bad_sample_is_a_line(monkeypatch, capsys):
    """A bad sample is the user's input: one line naming it, exit 1. Any other RuntimeError is a bug (on
    the first GPU, "CUDA error: misaligned address", docs/gpu.md) whose traceback and step the user and we
    need: `mshg` lets it through instead of shortening it to a line."""
    import pipeline.cli as cli
    from pipeline.data import BadSampleError

    def raising(error):
        def command(args):
            raise error
        return command

    monkeypatch.setattr(cli, "cmd_model_info", raising(BadSampleError("shard-000003.tar, key im00042: not a JPEG")))
    assert mshg(["model-info", "configs/lspet_cpu.yaml"]) == 1
    assert "shard-000003.tar, key im00042: not a JPEG" in capsys.readouterr().err
    monkeypatch.setattr(cli, "cmd_model_info", raising(RuntimeError("CUDA error: misaligned address")))
    with pytest.raises(RuntimeError, match="misaligned address"):
        mshg(["model-info", "configs/lspet_cpu.yaml"])
