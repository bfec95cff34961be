"""The command line's conventions (issue 47): `mshg --version`, help that shows defaults, `mshg train`'s flags
(each one the key=value override it names), `mshg config show|list`, one spelling per flag, the progress bars
of `mshg evaluate`."""
from __future__ import annotations

import argparse
import re
import sys
import types
from importlib.metadata import version

import pytest
import yaml

from pipeline.cli import DefaultsFormatter, build_parser, config_header, train_flag_overrides
from pipeline.config import config_from_yaml, load_config
from tests.conftest import REPO, mshg

GPU_CONFIGS = ("lspet_gpu.yaml", "lspet_gpu_stacked.yaml", "mpii_gpu.yaml", "coco_gpu.yaml")


def parsers(parser: argparse.ArgumentParser, name: str = "mshg"):
    """(command line, parser) of `mshg` and of every sub-command, nested ones included."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from parsers(sub, f"{name} {sub_name}")


def visible_options(parser: argparse.ArgumentParser) -> list[str]:
    return [o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        mshg(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"mshg {version('mshg')}" == "mshg 0.1.0"


def test_every_command_shows_its_defaults_and_evaluate_names_its_metrics(capsys):
    for name, parser in parsers(build_parser()):
        if any(a.dest != "help" and not isinstance(a, argparse._SubParsersAction) for a in parser._actions):
            assert parser.formatter_class is DefaultsFormatter, name

    def help_of(*argv: str) -> str:
        with pytest.raises(SystemExit):
            mshg([*argv, "--help"])
        return " ".join(capsys.readouterr().out.split())  # argparse wraps the lines

    assert "(default: 29500)" in help_of("train")
    shard = help_of("shard", "lspet")
    assert "samples per shard at most (default: 1000)" in shard and "seed of the shuffled order (default: 0)" in shard
    assert "(default: False)" not in shard  # flags (--overwrite, --quiet) have no value to show
    assert "crops in the grid (one batch) (default: 8)" in help_of("show-batch")
    evaluate = help_of("evaluate")
    for words in ("PCK@0.2 for LSP and LSPET", "PCKh@0.5 for MPII", "COCO keypoint AP/AR (OKS"):
        assert words in evaluate


def parse_train(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", "--config", "c.yaml", *argv])


def test_train_flags_are_the_overrides_they_name():
    assert train_flag_overrides(parse_train()) == []
    assert train_flag_overrides(parse_train("--resume")) == ["train.resume=require"]
    assert train_flag_overrides(parse_train("--resume", "r1")) == ["train.resume=require", "train.run_name=r1"]
    assert train_flag_overrides(parse_train("--resume", "--run-name", "r1")) == ["train.resume=require",
                                                                                  "train.run_name=r1"]
    assert train_flag_overrides(parse_train("--run-name", "r2")) == ["train.run_name=r2"]
    assert train_flag_overrides(parse_train("--device", "cpu")) == ["train.device=cpu"]
    assert train_flag_overrides(parse_train("--seed", "0")) == ["data.seed=0"]
    # an override right after --resume is an override, not the run's name
    args = parse_train("--resume", "stop.max_steps=9", "train.lr=0.1")
    assert args.overrides == ["train.lr=0.1"]
    assert train_flag_overrides(args) == ["train.resume=require", "stop.max_steps=9"]
    with pytest.raises(ValueError, match="--resume r1 and --run-name r2 name two runs"):
        train_flag_overrides(parse_train("--resume", "r1", "--run-name", "r2"))
    with pytest.raises(SystemExit):
        parse_train("--device", "tpu")
    # a flag and its key give the same config (the flags come last: they win over a key=value before them)
    args = parse_train("--seed", "7", "--device", "cpu", "--resume", "r3", "data.seed=1")
    by_flags = load_config(REPO / "configs" / "msc_hg_cpu.yaml", [*args.overrides, *train_flag_overrides(args)])
    by_keys = load_config(REPO / "configs" / "msc_hg_cpu.yaml",
                          ["data.seed=7", "train.device=cpu", "train.resume=require", "train.run_name=r3"])
    assert by_flags == by_keys


def test_train_resume_of_a_run_without_checkpoint_fails_before_deepspeed(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"train_shards": str(tmp_path / "shards")},
                                   "train": {"out_dir": str(tmp_path / "runs")}}))
    started = []
    trainer = types.SimpleNamespace(main=lambda argv: started.append(argv) or 0)  # DeepSpeed would start here
    monkeypatch.setitem(sys.modules, "pipeline.train", trainer)
    monkeypatch.setattr(sys.modules["pipeline"], "train", trainer, raising=False)
    (tmp_path / "runs" / "empty" / "checkpoints").mkdir(parents=True)
    for ranks in ("1", "2"):
        assert mshg(["train", "--config", str(cfg), "--ranks", ranks, "--resume", "empty"]) == 2
        err = capsys.readouterr().err
        assert f"train.resume=require, but {tmp_path / 'runs' / 'empty' / 'checkpoints'} has no checkpoint" in err
    assert mshg(["train", "--config", str(cfg), "train.resume=require", "--run-name", "gone"]) == 2  # the key too
    assert "train.resume=require, but" in capsys.readouterr().err
    assert mshg(["train", "--config", str(cfg), "--resume"]) == 2
    assert "needs the run to resume: --resume RUN" in capsys.readouterr().err
    assert not started
    # with a checkpoint the flags reach the trainer as overrides
    (tmp_path / "runs" / "done" / "checkpoints" / "step00000004").mkdir(parents=True)
    (tmp_path / "runs" / "done" / "checkpoints" / "latest").write_text("step00000004")
    assert mshg(["train", "--config", str(cfg), "--resume", "done", "--seed", "3"]) == 0
    assert started == [["--config", str(cfg), "train.resume=require", "train.run_name=done", "data.seed=3"]]


def test_config_show_prints_the_resolved_config(capsys):
    path = REPO / "configs" / "lspet_cpu.yaml"
    assert mshg(["config", "show", str(path), "train.lr=0.125", "data.seed=5"]) == 0
    shown = capsys.readouterr().out
    assert config_from_yaml(shown) == load_config(path, ["train.lr=0.125", "data.seed=5"])
    assert yaml.safe_load(shown)["train"]["lr"] == 0.125
    assert mshg(["config", "show", str(path), "train.bogus=1"]) == 2
    assert "mshg config: error:" in (err := capsys.readouterr().err) and "Key 'bogus' not in 'TrainConfig'" in err
    assert mshg(["config", "show", str(path), "train.micro_batch=0"]) == 2  # validated too
    assert "train.micro_batch" in capsys.readouterr().err


def test_config_list_gives_each_config_its_purpose_and_gpu_status(capsys):
    assert mshg(["config", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shipped = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert [re.split(r"\s", line)[0].rsplit("/", 1)[-1] for line in lines] == shipped
    for line in lines:
        assert "[gpu-status: " in line and "not stated" not in line, line
    for name in shipped:  # every shipped config states it, in its header
        purpose, status = config_header(REPO / "configs" / name)
        assert purpose and not purpose.startswith("gpu-status"), name
        if name != "lspet_gpu.yaml":
            assert "never run on a GPU" in status, name
    assert "bench/gpu_smoke.py" in config_header(REPO / "configs" / "lspet_gpu.yaml")[1]


def test_flags_are_spelled_one_way():
    for name, parser in parsers(build_parser()):
        for option in visible_options(parser):
            assert re.fullmatch(r"-[a-z]|--[a-z0-9]+(-[a-z0-9]+)*", option), f"{name} {option}"
            assert option not in ("--maxcount", "--maxsize", "--batch", "--model", "--weights", "--output"), \
                f"{name} {option}"
    reads_a_model = {"evaluate", "predict", "export"}
    for name, parser in parsers(build_parser()):
        if name.split()[-1] in reads_a_model:
            assert "--checkpoint" in visible_options(parser), name
    # the old spellings, still used by tests and docs, are hidden aliases
    args = build_parser().parse_args(["shard", "lspet", "--root", "r", "--out", "o", "--maxcount", "5", "--maxsize", "9"])
    assert (args.maxcount, args.maxsize) == (5, 9)
    assert build_parser().parse_args(["show-batch", "--config", "c", "--out", "o", "--batch", "3"]).batch_size == 3


def test_evaluate_shows_progress_over_batches_and_photos(weights, lspet_shards, monkeypatch, capsys):
    from pipeline import evaluate

    bars = []

    class Recording(evaluate.tqdm):
        def __init__(self, *args, **kwargs):
            bars.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(evaluate, "tqdm", Recording)
    assert mshg(["evaluate", "--checkpoint", str(weights), "--shards", str(lspet_shards["val"]),
                 "--batch-size", "4", "--no-flip"]) == 0
    assert [(b["unit"], b["disable"]) for b in bars] == [("batch", None)]  # None: off when not a terminal
    bars.clear()
    assert mshg(["evaluate", "--checkpoint", str(weights), "--shards", str(lspet_shards["val"]),
                 "--photos", "boxes", "--no-flip"]) == 0
    assert [(b["unit"], b["total"], b["disable"]) for b in bars] == [("photo", 16, None)]
    assert "\r" not in capsys.readouterr().err  # stderr is not a terminal here: no bar frames


def header(name: str) -> list[str]:
    """The leading comment lines of a shipped config, without the '#'."""
    lines = (REPO / "configs" / name).read_text().splitlines()
    return [line[1:].strip() for line in lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))]]


def test_gpu_configs_fix_their_global_batch_and_say_how_to_run_on_1_4_8_gpus():
    from pipeline.config import batch_plan

    for name in GPU_CONFIGS:
        cfg = load_config(REPO / "configs" / name)
        assert cfg.train.global_batch and cfg.train.grad_accum == 1, name
        text = "\n".join(header(name))
        for gpus in (1, 4, 8):
            assert batch_plan(cfg.train, gpus)[::2] == (cfg.train.global_batch, cfg.train.global_batch //
                                                        (cfg.train.micro_batch * gpus)), (name, gpus)
            assert re.search(rf"{gpus} GPUs?:\s+mshg train " + (f"--ranks {gpus} " if gpus > 1 else "") +
                             f"--config configs/{name}", text), (name, gpus)
        assert cfg.stop.expected_loss == 0 and "TO BE TUNED" not in text and "mshg propose-stop RUN" in text, name


def test_gpu_config_headers_shard_exactly_the_folders_they_read(tmp_path):
    for name in GPU_CONFIGS:
        cfg = load_config(REPO / "configs" / name)
        outs = {m.group(1) for line in header(name) for m in [re.search(r"mshg shard .* --out (\S+)", line)] if m}
        if name == "lspet_gpu_stacked.yaml":  # "the same shards" as lspet_gpu.yaml
            outs = {m.group(1) for line in header("lspet_gpu.yaml")
                    for m in [re.search(r"mshg shard .* --out (\S+)", line)] if m}
        assert outs == {cfg.data.train_shards, cfg.data.val_shards}, name
    # MPII's split files, made as its header says: the validation images, and the training ones without them
    (tmp_path / "mpii").mkdir()
    (tmp_path / "mpii" / "train.json").write_text('[{"image": "a.jpg"}, {"image": "b.jpg"}, {"image": "a.jpg"}]')
    (tmp_path / "mpii" / "valid.json").write_text('[{"image": "b.jpg"}, {"image": "c.jpg"}]')
    command = next(line for line in header("mpii_gpu.yaml") if line.startswith("python -c "))
    import subprocess

    assert subprocess.run(["bash", "-c", command.replace("python ", f"{sys.executable} ", 1)], cwd=tmp_path,
                          timeout=60).returncode == 0
    assert (tmp_path / "mpii" / "val_images.txt").read_text().split() == ["b.jpg", "c.jpg"]
    assert (tmp_path / "mpii" / "train_images.txt").read_text().split() == ["a.jpg"]
    shard_lines = [line for line in header("mpii_gpu.yaml") if line.startswith("mshg shard mpii")]
    assert [line.split("--split-file ")[1].split()[0] for line in shard_lines] == ["mpii/train_images.txt",
                                                                                  "mpii/val_images.txt"]


# --- a run's end never hangs in the MLflow model export (train.log_model_timeout) -----------------------------

def test_within_bounds_a_call_and_keeps_the_callers_mlflow_run():
    import time

    from mlflow.tracking import fluent

    from pipeline.track import within

    start = time.monotonic()
    assert within(0.3, time.sleep, 30) is False  # a stuck export: left behind in its daemon thread
    assert time.monotonic() - start < 5
    seen = []
    assert within(30, lambda x: seen.append(x), 7) is True and seen == [7]
    with pytest.raises(ZeroDivisionError):  # a failure inside is the caller's
        within(30, lambda: 1 / 0)
    assert within(0, seen.clear) is True and seen == []  # 0: no limit
    run = object()  # MLflow keeps the active run per thread: the export must see the run it belongs to
    fluent._active_run_stack.get().append(run)
    try:
        assert within(30, lambda: seen.append(fluent._active_run_stack.get()[-1])) and seen == [run]
    finally:
        fluent._active_run_stack.get().remove(run)


def test_a_slow_model_export_ends_the_run_after_train_log_model_timeout(weights, tmp_path, capsys, monkeypatch):
    import time

    from pipeline import train
    from pipeline.run_folder import SUMMARY_FILE, RunEnd, RunFolder

    exported = []

    def slow_export(*args):  # what took over 5 minutes on the H200 node (docs/gpu.md)
        exported.append("started")
        time.sleep(60)

    monkeypatch.setattr(train, "export_model_onnx", slow_export)  # the ONNX export before the tracker logs it
    tracker = types.SimpleNamespace(log_metrics=lambda *a: None, log_artifact=lambda *a: None,
                                    log_loss_curves=lambda *a: None, run_id="r", ui_command=lambda: "ui",
                                    recording=True, log_model=lambda *a: None)
    folder = RunFolder(tmp_path, "run")
    folder.path.mkdir()
    folder.log_file.write_text("")
    cfg = load_config(None, ["data.input_size=64", "train.log_model_timeout=0.5"])
    start = time.monotonic()
    with pytest.warns(UserWarning, match=r"did not finish within train.log_model_timeout=0.5 s"):
        train.publish_run(cfg, folder, tracker, None, RunEnd("max_steps", 6, 1.0, tmp_path / "ckpt", weights), 3)
    assert time.monotonic() - start < 20  # not the export's 60 s
    assert exported == ["started"] and (folder.path / SUMMARY_FILE).is_file()  # the summary came first
    assert "stopped at step 6" in capsys.readouterr().out
    with pytest.raises(Exception, match="train.log_model_timeout must be >= 0"):
        load_config(None, ["train.log_model_timeout=-1"])
