"""`mshg`: the command line. Each subcommand is a thin door into a module that does the work.

    mshg shard lspet --root DIR --out DIR [--range FIRST:LAST]     (shards/cli.py)
    mshg verify DIR
    mshg train --config FILE [--ranks N] [--resume [RUN]] [--run-name NAME] [--device D] [--seed N] [key=value ...]
    mshg config show FILE [key=value ...] | mshg config list
    mshg evaluate --checkpoint runs/NAME --shards DIR
    mshg predict [--checkpoint NAME|runs/NAME|FILE] [--out preds.json] [--overlay DIR] SOURCE...
    mshg models
    mshg export --checkpoint CKPT [--safetensors OUT] [--onnx OUT]
    mshg runs [--experiment mshg] [-n 20]
    mshg model-info CONFIG...

Each command imports its module when it runs (the imports inside the cmd_* functions), so that `mshg shard`
or `--help` does not load torch, DeepSpeed or DALI.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.show import add_command as add_show_batch  # mshg show-batch (pipeline/show.py)
from shards.cli import add_commands as add_shard_commands


def train_flag_overrides(args) -> list[str]:
    """`mshg train`'s flags as the key=value overrides they stand for (appended after the given ones, so a flag
    and its key behave the same, and the run's config.yaml records it):
    --resume [RUN] -> train.resume=require (and train.run_name=RUN), --run-name NAME -> train.run_name=NAME,
    --device D -> train.device=D, --seed N -> data.seed=N."""
    out = []
    resume, run_name = getattr(args, "resume", None), getattr(args, "run_name", None)
    if resume is not None:
        out.append("train.resume=require")
        if "=" in resume:  # `--resume stop.max_steps=9`: argparse took an override for the optional RUN
            out.append(resume)
            resume = ""
        if resume and run_name and resume != run_name:
            raise ValueError(f"--resume {resume} and --run-name {run_name} name two runs: give one")
        run_name = resume or run_name
    if run_name:
        out.append(f"train.run_name={run_name}")
    if getattr(args, "device", None):
        out.append(f"train.device={args.device}")
    if getattr(args, "seed", None) is not None:
        out.append(f"data.seed={args.seed}")
    return out


def check_resumable(cfg) -> None:
    """train.resume=require (`mshg train --resume`) on a run without a checkpoint: the error now, before
    DeepSpeed or the launcher start (the trainer would give the same one after starting them)."""
    if cfg.train.resume != "require":
        return
    from pipeline.checkpoint import latest_tag, nothing_to_resume

    if not cfg.train.run_name:
        raise ValueError("--resume (train.resume=require) needs the run to resume: --resume RUN, --run-name RUN "
                         f"or train.run_name=RUN (a folder under train.out_dir={cfg.train.out_dir})")
    checkpoints = Path(cfg.train.out_dir) / cfg.train.run_name / "checkpoints"
    if latest_tag(checkpoints) is None:
        raise nothing_to_resume(checkpoints)


def cmd_train(args) -> int:
    from pipeline.config import batch_plan, load_config

    args.overrides = [*args.overrides, *train_flag_overrides(args)]
    cfg = load_config(args.config, args.overrides)  # bad configs fail here, before DeepSpeed or any rank starts
    check_resumable(cfg)  # and so does --resume of a run without a checkpoint
    if args.ranks > 1:  # DeepSpeed's launcher starts the ranks; we repeat the run's summary at the end
        from pipeline.distributed import allocator_preload, choose_device, launcher_devices
        from pipeline.run_folder import SUMMARY_FILE, RunFolder, default_run_name
        from pipeline.train import open_shards

        batch_plan(cfg.train, args.ranks)  # and so does a batch that does not split over the ranks
        open_shards(cfg)  # and missing shards or a validation set of other joints
        if cfg.train.init_from:  # and weights to fine-tune from that are not there
            from pipeline.weights import resolve

            resolve(cfg.train.init_from)
        run_name = default_run_name(cfg)  # fixed here, so that every rank and the summary agree
        RunFolder(cfg.train.out_dir, run_name).check_free()  # and a run folder another run holds
        choose_device(cfg.train.device)  # the launcher counts devices of DS_ACCELERATOR's kind
        preload = allocator_preload(cfg.train.allocator)  # the ranks inherit the launcher's environment
        launcher = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
        cmd = [launcher, *launcher_devices(args.ranks), "--master_port", str(args.master_port),
               "--module", "pipeline.train", "--config", args.config, *args.overrides,
               f"train.run_name={run_name}"]
        print(" ".join(cmd), flush=True)
        code = subprocess.call(cmd, env={**os.environ, "LD_PRELOAD": preload} if preload else None)
        summary = Path(cfg.train.out_dir) / run_name / SUMMARY_FILE
        if code == 0 and summary.is_file():
            print("\n" + summary.read_text(), end="", flush=True)
        elif code not in (0, 75):  # 75: checkpointed after a signal, the run is KILLED and resumable
            from pipeline.runs import mark_failed

            if mark_failed(Path(cfg.train.out_dir) / run_name, f"a rank exited with code {code} (see the log above)"):
                print(f"mshg train: the ranks exited with code {code}; MLflow run {run_name} marked FAILED",
                      file=sys.stderr)
        return code
    from pipeline import train

    return train.main(["--config", args.config, *args.overrides])


def writable(path: str | None, option: str) -> None:
    """Fail before the work, not after it, when an output file cannot be written."""
    if not path:
        return
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise ValueError(f"{option} {path}: is a directory, expected a file name")
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"{option} {path}: not writable (permission denied)")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default where it has one worth showing."""

    def _get_help_string(self, action):
        # not for flags (--no-flip, --val: their "default" is the dest's, not a value to give) nor an empty
        # default; by identity, so that a default of 0 is shown
        if (action.nargs == 0 or action.default is None or action.default is argparse.SUPPRESS
                or action.default == [] or "default" in (action.help or "")):
            return action.help
        return super()._get_help_string(action)


def at_least_one(text: str) -> int:
    """argparse type of a count that must be >= 1 (argparse then names the option in its error)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def zoom_factors(text: str) -> list[float]:
    """argparse type of --scales: comma-separated zoom factors, e.g. 0.9,1,1.15."""
    try:
        return [float(f) for f in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected zoom factors such as 0.9,1,1.15; got {text!r}") from None


EVALUATE_DESCRIPTION = (
    "Scores trained weights on a shard set with the metric of the dataset its manifest names: PCK@0.2 for LSP and "
    "LSPET (a joint is correct within 0.2 x the torso, left shoulder to right hip); PCKh@0.5 for MPII (within "
    "0.5 x the head size, as MPII's official script); COCO keypoint AP/AR (OKS, pycocotools, the set's per-joint "
    "sigmas) for COCO and every COCO-format set (CrowdPose, ...); PCK@0.2 for any other set.")


def package_version() -> str:
    """The installed package's version (pyproject.toml), as `mshg --version` prints it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mshg")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed: pip install -e .)"


SCALES_HELP = ("the multi-scale test's zoom factors instead of the run's eval.scales, e.g. 0.9,1,1.15 "
               "(1: one scale; each factor is another pass)")


def cmd_evaluate(args) -> int:
    from pipeline import evaluate

    writable(args.out, "--out")
    return evaluate.main(args)


def cmd_predict(args) -> int:
    from pipeline import predict

    writable(args.out, "--out")
    if args.format is None:
        args.format = "jsonl" if args.out.endswith(".jsonl") else "json"
    if args.coco_ids and args.format != "coco":
        raise ValueError("--coco-ids goes with --format coco")
    return predict.main(args)


def cmd_models(args) -> int:
    from pipeline.weights import DEFAULT_MODEL, describe_shipped, shipped_models

    models = shipped_models()
    if not models:
        raise FileNotFoundError("no shipped model is installed (pipeline/pretrained/ is empty)")
    for name, path in models.items():
        print(f"{name}{'  (default)' if name == DEFAULT_MODEL else ''}\n  {describe_shipped(path)}\n  card: "
              f"{path.with_suffix('.md')}")
    return 0


def cmd_export(args) -> int:
    if not (args.safetensors or args.onnx):
        raise ValueError("nothing to do: give --safetensors OUT and/or --onnx OUT")
    weights = args.checkpoint
    if args.safetensors:
        from pipeline.weights import export_zero_checkpoint

        weights = export_zero_checkpoint(args.checkpoint, args.safetensors)
        print(f"wrote {weights}")
        weights = weights or args.safetensors
    if args.onnx:
        from pipeline.export import export_onnx

        print(f"wrote {export_onnx(weights, args.onnx)}")
    return 0


def cmd_runs(args) -> int:
    from pipeline.runs import print_runs

    if args.compare is not None and len(args.compare) < 2:
        raise ValueError("--compare needs two or more runs (names or ids)")
    return print_runs(args.experiment, args.limit, args.tracking_uri, args.compare)


def cmd_propose_stop(args) -> int:
    """`mshg propose-stop RUN`: stop.expected_loss / tolerance / window from a calibration run's curves."""
    from pipeline.stop import propose
    from pipeline.runs import run_curves

    curves, metric = run_curves(args.run, args.experiment, args.tracking_uri, ("loss/smoothed", "minutes"))
    steps, smoothed = curves["loss/smoothed"]
    eval_steps, values = curves[metric]
    minutes = dict(zip(*curves["minutes"]))
    p = propose(steps, smoothed, eval_steps, values, args.within / 100)
    print(f"calibration run {args.run}: best {metric} {100 * p['best']:.1f} at {p['last_step']} steps; within "
          f"{args.within:g} points of it from step {p['target_step']}")
    print(f"  stop.expected_loss={p['expected_loss']:.5f} stop.tolerance={p['tolerance']:g} stop.window={p['window']}")
    if p["fires_at"] is None:
        print("  replayed on this run's curve the rule does not fire: the loss was still falling at the end")
    else:
        saved = minutes.get(p["last_step"], 0) - minutes.get(p["fires_at"], 0)
        print(f"  replayed on this run's curve it fires at step {p['fires_at']} of {p['last_step']}"
              + (f" ({saved:.1f} training minutes saved)" if minutes else "")
              + (f", {metric} there {100 * p['metric_at_stop']:.1f} ({100 * (p['best'] - p['metric_at_stop']):.1f} "
                 f"points below the best)" if p["metric_at_stop"] is not None else ""))
    return 0


CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"  # the shipped configs
GPU_STATUS = "# gpu-status:"  # the machine-readable header line of a config: has it run on a GPU, and what


def config_header(path: Path) -> tuple[str, str]:
    """(purpose, gpu status) of a config file: its first comment line and its `# gpu-status:` line."""
    purpose, status = "", "not stated (no `# gpu-status:` line)"
    for line in path.read_text().splitlines():
        if line.startswith(GPU_STATUS):
            status = line[len(GPU_STATUS):].strip()
        elif line.startswith("#") and not purpose:
            purpose = line.lstrip("#").strip()
    return purpose, status


def cmd_config(args) -> int:
    """`mshg config show CONFIG [key=value ...]`: the resolved config as YAML; `mshg config list`: the shipped ones."""
    if args.action == "show":
        from omegaconf import OmegaConf

        from pipeline.config import load_config

        cfg = load_config(args.config, args.overrides)  # overrides applied and validated: a bad key is a ConfigError
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
        return 0
    paths = sorted(Path(args.dir).glob("*.yaml"))
    if not paths:
        raise FileNotFoundError(f"no *.yaml config in {args.dir}")
    shown = [os.path.relpath(p) if not os.path.relpath(p).startswith("..") else str(p) for p in paths]
    width = max(len(name) for name in shown)
    for path, name in zip(paths, shown):
        purpose, status = config_header(path)
        print(f"{name:{width}s}  {purpose}  [gpu-status: {status}]")
    return 0


def cmd_model_info(args) -> int:
    from pipeline.config import load_config
    from pipeline.model import describe

    for path in args.configs:
        print(describe(load_config(path), num_joints=args.joints))
    return 0


def build_parser() -> argparse.ArgumentParser:
    F = DefaultsFormatter  # every command's help shows its defaults
    parser = argparse.ArgumentParser(prog="mshg", description="Multi-scale cascaded hourglass pose pipeline",
                                     formatter_class=F)
    parser.add_argument("--version", action="version", version=f"mshg {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_shard_commands(sub, formatter_class=F)

    p = sub.add_parser("train", help="train a model (DeepSpeed; one process, or --ranks N through the launcher)",
                       formatter_class=F)
    p.add_argument("--config", required=True, help="YAML under configs/")
    p.add_argument("--ranks", type=int, default=1, help="processes on this machine (GPUs, or CPU ranks)")
    p.add_argument("--master-port", type=int, default=29500, help="the rendezvous port of the ranks (with --ranks > 1)")
    # each flag is the override it names, appended after the key=value ones (train_flag_overrides)
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN",
                   help="continue a run from its last checkpoint, an error if it has none (train.resume=require); "
                        "RUN: the run's name (train.run_name=RUN)")
    p.add_argument("--run-name", default=None, metavar="NAME",
                   help="the run's folder under train.out_dir and its MLflow name (train.run_name=NAME; "
                        "default: <config name>-<timestamp>)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default=None,
                   help="train.device: auto (CUDA if torch has it), cuda (an error without CUDA) or cpu; "
                        "default: the config's")
    p.add_argument("--seed", type=int, default=None, metavar="N", help="data.seed=N (default: the config's)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stop.max_steps=100")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="the dataset's metric (PCK@0.2, PCKh@0.5 or COCO AP) of trained weights "
                                        "on a shard set", description=EVALUATE_DESCRIPTION, formatter_class=F)
    p.add_argument("--checkpoint", required=True, help="a run directory (runs/NAME) or a .safetensors file")
    p.add_argument("--shards", required=True, help="a shard directory (with manifest.json)")
    p.add_argument("--batch-size", type=at_least_one, default=16, help="validation crops (or photos) a batch")
    p.add_argument("--out", default=None, help="also write the metrics as JSON here")
    p.add_argument("--sheet", default=None, metavar="PNG",
                   help="also draw a contact sheet of the first 16 validation crops (truth green, prediction red)")
    p.add_argument("--no-flip", action="store_true", help="no flip test (faster, a little less accurate)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: a GPU when there is one")
    p.add_argument("--modules", default=None, metavar="M,N,...",
                   help="decode from the mean of these modules' heatmaps (1-based) instead of the run's eval.modules")
    p.add_argument("--dark-kernel", type=int, default=None, metavar="K",
                   help="sub-pixel decoding instead of the run's eval.dark_kernel: 0 quarter-pixel, odd K >= 3 DARK")
    p.add_argument("--scales", type=zoom_factors, default=None, metavar="F,G,...", help=SCALES_HELP)
    p.add_argument("--photos", choices=("boxes", "bare"), default=None,
                   help="score `mshg predict` on the shards' photographs instead of the validation crops: with "
                        "each person's box (boxes) or without any (bare, as a user with a photo runs it)")
    p.add_argument("--passes", type=at_least_one, default=3,
                   help="with --photos bare: the whole photo's crop refined (passes - 1) times on the box of the joints "
                        "found (default 3)")
    p.add_argument("--accurate", action="store_true",
                   help="with --photos bare: search windows of the photo too and run every pass at the run's full "
                        "test, as `mshg predict --accurate`")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="keypoints for photos, folders, globs and videos (the shipped model by default)",
                       formatter_class=DefaultsFormatter)
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="image files, folders (their images and videos), globs ('photos/**/*.jpg') or videos")
    p.add_argument("--checkpoint", default=None,
                   help="a shipped model's name (`mshg models`), a run folder (runs/NAME) or a .safetensors file; "
                        "default: the shipped model")
    p.add_argument("--out", default="predictions.json", help="file the predictions are written to, as they come")
    p.add_argument("--format", choices=("json", "jsonl", "coco"), default=None,
                   help="json: {joints, skeleton, predictions}; jsonl: one prediction a line; coco: COCO keypoint "
                        "results for pycocotools (image ids from --coco-ids). Default: jsonl for a .jsonl --out, else json")
    p.add_argument("--coco-ids", default=None, metavar="ANNOTATIONS.json",
                   help="with --format coco: a COCO annotation file whose images[] give each file's image id")
    p.add_argument("--boxes", default=None, help="JSON {image path: [x0, y0, w, h]}; images without one are searched")
    p.add_argument("--overlay", default=None, metavar="DIR", help="also draw each skeleton: DIR/<name>.jpg, a video DIR/<name>.mp4")
    p.add_argument("--accurate", action="store_true",
                   help="photos without a box: also search a grid of windows (for a person small in the photo), refine the "
                        "3 surest crops and run every pass at the run's full test (its zooms and the flip test): ~30x "
                        "slower; no more accurate on LSPET, whose persons fill the photo (docs/results/predict_speed.md)")
    p.add_argument("--passes", type=at_least_one, default=None,
                   help="photos without a box: refine the surest crops (passes - 1) times on the box of the joints "
                        "found (default: 3)")
    p.add_argument("--no-flip", action="store_true", help="no flip test (faster, a little less accurate)")
    p.add_argument("--scales", type=zoom_factors, default=None, metavar="F,G,...", help=SCALES_HELP)
    p.add_argument("--batch-size", type=at_least_one, default=16, help="images a batch")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: a GPU when there is one")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("models", help="the models shipped with the package (use one with --checkpoint NAME or "
                                      "train.init_from=NAME)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("export", help="trained weights -> model.safetensors (from a DeepSpeed checkpoint) and/or ONNX",
                       formatter_class=F)
    p.add_argument("--checkpoint", required=True, help="a run directory, a .safetensors file, or a DeepSpeed checkpoint")
    p.add_argument("--safetensors", default=None, metavar="OUT", help="write fp32 weights with their metadata here")
    p.add_argument("--onnx", default=None, metavar="OUT", help="write the ONNX model (last-module heatmaps) here")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("runs", help="recent MLflow runs: key params and final metrics, as a table", formatter_class=F)
    p.add_argument("--experiment", default="mshg", help="the MLflow experiment (train.experiment)")
    p.add_argument("-n", "--limit", type=int, default=20, help="how many runs, newest first")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--compare", nargs="+", default=None, metavar="RUN",
                   help="print the config differences and final metrics of these runs (names or ids)")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("propose-stop", help="a convergence stop (expected loss, tolerance, window) from a "
                                            "calibration run's loss and validation curves in MLflow", formatter_class=F)
    p.add_argument("run", help="the calibration run's name")
    p.add_argument("--within", type=float, default=2.0, help="points of the validation metric below its best at "
                                                            "which more training stops paying (default 2)")
    p.add_argument("--experiment", default="mshg", help="the MLflow experiment (train.experiment)")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.set_defaults(func=cmd_propose_stop)

    p = sub.add_parser("config", help="show a resolved config (after overrides) or list the shipped configs",
                       formatter_class=F)
    actions = p.add_subparsers(dest="action", required=True)
    q = actions.add_parser("show", help="the config as training resolves it (its overrides applied, validated), as YAML",
                           formatter_class=F)
    q.add_argument("config", help="a YAML config, e.g. configs/lspet_cpu.yaml")
    q.add_argument("overrides", nargs="*", help="key=value overrides, as `mshg train` takes them")
    q = actions.add_parser("list", help="the shipped configs: each one's purpose (its first comment line) and "
                                        "whether it has run on a GPU (its `# gpu-status:` line)", formatter_class=F)
    q.add_argument("--dir", default=str(CONFIGS_DIR), help="the folder of configs")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("model-info", help="parameter count and FLOPs of configs", formatter_class=F)
    p.add_argument("configs", nargs="+", help="YAML files under configs/")
    p.add_argument("--joints", type=int, default=14, help="number of joints to size the heads for")
    p.set_defaults(func=cmd_model_info)

    add_show_batch(sub, formatter_class=F)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:  # bad input: a clear message, not a traceback
        print(f"mshg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a shard or image that cannot be read (pipeline.data.BadSampleError and DALI's)
        message = str(e)
        if "Error in" in message:  # DALI's own multi-line error: only then is DALI there to import
            from pipeline.data import dali_summary

            message = dali_summary(message)
        elif type(e).__name__ not in ("BadSampleError", "ShardError"):
            raise  # not bad input but a bug (a CUDA fault, say): its traceback is worth having
        print(f"mshg {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
