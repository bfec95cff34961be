"""A recipe's validation curve: PCK@0.2 against training minutes and against images seen.

    python bench/recipe_curve.py RUN_NAME... [--csv docs/curves] [--also docs/curves/r3.csv ...] \
        --plot docs/recipe_curve_r4.png

Reads each named run's `pck` and `minutes` histories from MLflow (images seen = step x global batch)
and writes them to --csv as RUN_NAME.csv (minutes, images, pck %), so that a curve outlives the
machine's MLflow store; --also adds curves kept that way by earlier sessions. One plot, two panels.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=True)
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from mlflow.tracking import MlflowClient  # noqa: E402


def run_curve(client: MlflowClient, run) -> list[tuple[float, int, float]]:
    """A run's validation curve: (minutes, images seen, PCK %) at each evaluation."""
    pck = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "pck")}
    minutes = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "minutes")}
    params, world = run.data.params, int(run.data.tags.get("world_size", 1))
    batch = int(params.get("train.global_batch", 0)) or \
        int(params["train.micro_batch"]) * int(params.get("train.grad_accum", 1)) * world
    return sorted((minutes[s], s * batch, 100 * v) for s, v in pck.items() if s in minutes)


def find_run(client: MlflowClient, experiment: str, name: str):
    """The newest MLflow run of that name."""
    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'",
                               order_by=["attributes.start_time DESC"]) if exp else []
    if not found:
        raise SystemExit(f"no MLflow run named {name} in experiment {experiment}")
    return found[0]


def plot_curves(curves: dict[str, list[tuple[float, int, float]]], path: str, dashed=lambda name: False) -> None:
    """PCK % against minutes (left) and images seen (right), a line per curve."""
    fig, (by_minutes, by_images) = plt.subplots(1, 2, figsize=(12, 5), dpi=100, sharey=True)
    for name, curve in curves.items():
        style = "--" if dashed(name) else "-"
        by_minutes.plot([m for m, _, _ in curve], [v for *_, v in curve], style, marker="o", markersize=3, label=name)
        by_images.plot([i / 1000 for _, i, _ in curve], [v for *_, v in curve], style, marker="o", markersize=3,
                       label=name)
    by_minutes.set_xlabel("training minutes (2 CPU ranks)")
    by_images.set_xlabel("images seen (thousands)")
    by_minutes.set_ylabel("validation PCK@0.2 (%), flip test")
    for ax in (by_minutes, by_images):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help="MLflow run names")
    p.add_argument("--also", nargs="*", default=[], help="curves saved earlier (CSV: minutes,images,pck)")
    p.add_argument("--csv", default="docs/curves", help="folder the runs' curves are written to")
    p.add_argument("--plot", required=True)
    p.add_argument("--experiment", default="mshg")
    args = p.parse_args()

    curves: dict[str, list[tuple[float, int, float]]] = {}
    for path in map(Path, args.also):
        with path.open() as f:
            curves[path.stem] = [(float(r["minutes"]), int(r["images"]), float(r["pck"])) for r in csv.DictReader(f)]
    client = MlflowClient()
    for name in args.runs:
        curves[name] = run_curve(client, find_run(client, args.experiment, name))
        out = Path(args.csv) / f"{name}.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["minutes", "images", "pck"])
            w.writerows((f"{m:.2f}", i, f"{v:.2f}") for m, i, v in curves[name])
        print(f"{name}: " + " / ".join(f"{v:.1f} at {m:.1f} min" for m, _, v in curves[name]) + f" -> {out}")
    if not curves:
        raise SystemExit("no curves: name MLflow runs or --also CSV files")

    plot_curves(curves, args.plot)
    print(f"plot -> {args.plot}")


if __name__ == "__main__":
    main()
