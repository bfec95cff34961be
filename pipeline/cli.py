"""`mshg`: the command line. Each subcommand is a thin door into a module that does the work.

    mshg shard lspet --root DIR --out DIR [--range FIRST:LAST]     (shards/cli.py)
    mshg verify DIR
    mshg train --config FILE [--ranks N] [key=value ...]
    mshg evaluate --checkpoint runs/NAME --shards DIR
    mshg predict --checkpoint runs/NAME --out preds.json [--boxes B.json] [--overlay DIR] IMAGE...
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


def cmd_train(args) -> int:
    if args.ranks > 1:  # DeepSpeed's launcher starts the ranks; we repeat the run's summary at the end
        from pipeline.config import batch_plan, load_config
        from pipeline.distributed import choose_device, launcher_devices
        from pipeline.run_folder import SUMMARY_FILE, default_run_name
        from pipeline.train import open_shards

        cfg = load_config(args.config, args.overrides)  # bad configs fail here, before any rank starts
        batch_plan(cfg.train, args.ranks)  # and so does a batch that does not split over the ranks
        open_shards(cfg)  # and missing shards or a validation set of other joints
        run_name = default_run_name(cfg)  # fixed here, so that every rank and the summary agree
        choose_device(cfg.train.device)  # the launcher counts devices of DS_ACCELERATOR's kind
        launcher = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
        cmd = [launcher, *launcher_devices(args.ranks), "--master_port", str(args.master_port),
               "--module", "pipeline.train", "--config", args.config, *args.overrides,
               f"train.run_name={run_name}"]
        print(" ".join(cmd), flush=True)
        code = subprocess.call(cmd)
        summary = Path(cfg.train.out_dir) / run_name / SUMMARY_FILE
        if code == 0 and summary.is_file():
            print("\n" + summary.read_text(), end="", flush=True)
        elif code not in (0, 75):  # 75: checkpointed after a signal, the run is KILLED and resumable
            from pipeline.track import mark_failed

            if mark_failed(cfg.train.experiment, run_name, f"a rank exited with code {code} (see the log above)"):
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


SCALES_HELP = ("the multi-scale test's zoom factors instead of the run's eval.scales, e.g. 0.9,1,1.15 "
               "(1: one scale; each factor is another pass)")


def cmd_evaluate(args) -> int:
    from pipeline import evaluate

    writable(args.out, "--out")
    return evaluate.main(args)


def cmd_predict(args) -> int:
    from pipeline import predict

    writable(args.out, "--out")
    return predict.main(args)


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
    from pipeline.track import print_runs

    if args.compare is not None and len(args.compare) < 2:
        raise ValueError("--compare needs two or more runs (names or ids)")
    return print_runs(args.experiment, args.limit, args.tracking_uri, args.compare)


def cmd_propose_stop(args) -> int:
    """`mshg propose-stop RUN`: stop.expected_loss / tolerance / window from a calibration run's curves."""
    from pipeline.stop import propose
    from pipeline.track import run_curves

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


def cmd_model_info(args) -> int:
    from pipeline.config import load_config
    from pipeline.model import describe

    for path in args.configs:
        print(describe(load_config(path), num_joints=args.joints))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mshg", description="Multi-scale cascaded hourglass pose pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    add_shard_commands(sub)

    p = sub.add_parser("train", help="train a model (DeepSpeed; one process, or --ranks N through the launcher)")
    p.add_argument("--config", required=True, help="YAML under configs/")
    p.add_argument("--ranks", type=int, default=1, help="processes on this machine (GPUs, or CPU ranks)")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stop.max_steps=100")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="PCK@0.2 of trained weights on a shard set")
    p.add_argument("--checkpoint", required=True, help="a run directory (runs/NAME) or a .safetensors file")
    p.add_argument("--shards", required=True, help="a shard directory (with manifest.json)")
    p.add_argument("--batch-size", type=int, default=16)
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
                   help="with --photos bare: the 3 surest of the whole photo and its windows, each refined (passes - 1) "
                        "times on the box of the joints found; the surest refined crop wins (default 3)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="keypoints for images, as JSON in original image pixels")
    p.add_argument("--checkpoint", required=True, help="a run directory (runs/NAME) or a .safetensors file")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--boxes", default=None, help="JSON {image path: [x0, y0, w, h]}; images without one are searched (--passes)")
    p.add_argument("--overlay", default=None, metavar="DIR", help="also write each image with its skeleton drawn here")
    p.add_argument("--no-flip", action="store_true", help="no flip test (faster, a little less accurate)")
    p.add_argument("--scales", type=zoom_factors, default=None, metavar="F,G,...", help=SCALES_HELP)
    p.add_argument("--passes", type=at_least_one, default=3,
                   help="photos without a box: the 3 surest of the whole photo and its windows, each refined (passes - 1) "
                        "times on the box of the joints found; the surest refined crop wins (default 3)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: a GPU when there is one")
    p.add_argument("images", nargs="+", help="image files")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="trained weights -> model.safetensors (from a DeepSpeed checkpoint) and/or ONNX")
    p.add_argument("--checkpoint", required=True, help="a run directory, a .safetensors file, or a DeepSpeed checkpoint")
    p.add_argument("--safetensors", default=None, metavar="OUT", help="write fp32 weights with their metadata here")
    p.add_argument("--onnx", default=None, metavar="OUT", help="write the ONNX model (last-module heatmaps) here")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("runs", help="recent MLflow runs: key params and final metrics, as a table")
    p.add_argument("--experiment", default="mshg")
    p.add_argument("-n", "--limit", type=int, default=20, help="how many runs, newest first")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--compare", nargs="+", default=None, metavar="RUN",
                   help="print the config differences and final metrics of these runs (names or ids)")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("propose-stop", help="a convergence stop (expected loss, tolerance, window) from a "
                                            "calibration run's loss and validation curves in MLflow")
    p.add_argument("run", help="the calibration run's name")
    p.add_argument("--within", type=float, default=2.0, help="points of the validation metric below its best at "
                                                            "which more training stops paying (default 2)")
    p.add_argument("--experiment", default="mshg")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=cmd_propose_stop)

    p = sub.add_parser("model-info", help="parameter count and FLOPs of configs")
    p.add_argument("configs", nargs="+", help="YAML files under configs/")
    p.add_argument("--joints", type=int, default=14, help="number of joints to size the heads for")
    p.set_defaults(func=cmd_model_info)

    add_show_batch(sub)
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
