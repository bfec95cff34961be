"""The study's table and plot from its MLflow runs (bench/cascade_vs_stacked.sh calls it).

    python bench/study_table.py RUN_NAME... [--out docs/results.md] [--plot docs/pck_vs_minutes.png]

Per run: parameters, forward GFLOPs per image, images/s (median of the logged values), steps reached,
PCK@0.2 (flip test) per joint and mean at the end, and the training minutes at which the validation
PCK first reached 50 % and 65 % (linear between evaluations). The table replaces the text between
the `<!-- study:begin -->` and `<!-- study:end -->` markers of --out; the plot of PCK against minutes
of every run goes beside it and, with the table, to an MLflow run `study-summary`.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"


def history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def reached(curve: list[tuple[float, float]], level: float) -> float | None:
    """Minutes at which the curve first reaches `level` (linear between points), or None."""
    prev = (0.0, 0.0)
    for minutes, value in curve:
        if value >= level:
            m0, v0 = prev
            return m0 + (minutes - m0) * (level - v0) / max(value - v0, 1e-9)
        prev = (minutes, value)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default=str(REPO / "docs" / "results.md"))
    p.add_argument("--plot", default=str(REPO / "docs" / "pck_vs_minutes.png"))
    p.add_argument("--experiment", default="mshg")
    p.add_argument("--summary-run", default="study-summary", help="the MLflow run the table and plot go to")
    args = p.parse_args()

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.config import config_from_yaml
    from pipeline.model import build_model, count_flops, count_parameters

    client = MlflowClient()
    exp = client.get_experiment_by_name(args.experiment)
    rows, curves, joints = [], {}, None
    for name in args.runs:
        found = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'",
                                   order_by=["attributes.start_time DESC"])
        if not found:
            raise SystemExit(f"no MLflow run named {name} in experiment {args.experiment}")
        run = found[0]
        cfg = config_from_yaml((REPO / "runs" / name / "config.yaml").read_text(), source=name)
        model = build_model(cfg.model, 14, cfg.data.input_size)
        pck, minutes = history(client, run.info.run_id, "pck"), history(client, run.info.run_id, "minutes")
        curve = sorted((minutes[s], v) for s, v in pck.items() if s in minutes)
        curves[name] = curve
        joints = joints or sorted(k.split("/", 1)[1] for k in run.data.metrics if k.startswith("pck/"))
        per_joint = {j: run.data.metrics.get(f"pck/{j}", float("nan")) for j in joints}
        rates = list(history(client, run.info.run_id, "images_per_s").values())
        rows.append({
            "run": name, "run_id": run.info.run_id, "model": "MSC-HG" if len(cfg.model.stages) > 1 else "stacked",
            "params": count_parameters(model) / 1e6, "gflops": count_flops(model, cfg.data.input_size) / 1e9,
            "img_s": statistics.median(rates[len(rates) // 4:]) if rates else float("nan"),
            "steps": run.data.tags.get("stopped_at_step", "?"), "pck": run.data.metrics.get("final/pck", float("nan")),
            "per_joint": per_joint, "t50": reached(curve, 0.5), "t65": reached(curve, 0.65)})

    fmt = lambda t: f"{t:.1f}" if t is not None else "not reached"  # noqa: E731
    lines = [BEGIN, "", "| run | model | params (M) | GFLOPs | images/s | steps | PCK@0.2 | min to 50 % | min to 65 % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['model']} | {r['params']:.2f} | {r['gflops']:.3f} | {r['img_s']:.1f} | "
                     f"{r['steps']} | {100 * r['pck']:.1f} | {fmt(r['t50'])} | {fmt(r['t65'])} |")
    lines += ["", "Per joint (PCK@0.2, flip test, at the end):", "",
              "| run | " + " | ".join(joints) + " |", "|---|" + "---|" * len(joints)]
    for r in rows:
        lines.append(f"| {r['run']} | " + " | ".join(f"{100 * r['per_joint'][j]:.1f}" for j in joints) + " |")
    by_model: dict[str, list[float]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r["pck"])
    lines += ["", "Mean over seeds: " + "; ".join(f"{m} {100 * statistics.mean(v):.1f} % "
                                                    f"(seeds: {', '.join(f'{100 * x:.1f}' for x in v)})"
                                                    for m, v in by_model.items()),
              "", "MLflow run ids: " + ", ".join(f"{r['run']} `{r['run_id']}`" for r in rows), "",
              f"![PCK@0.2 against training minutes]({Path(args.plot).name})", "", END]
    table = "\n".join(lines)

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for name, curve in curves.items():
        style = "-" if "cascade" in name or "msc" in name else "--"
        ax.plot([m for m, _ in curve], [100 * v for _, v in curve], style, marker="o", markersize=3, label=name)
    ax.set_xlabel("training minutes (2 CPU ranks)")
    ax.set_ylabel("validation PCK@0.2 (%), flip test")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot)

    out = Path(args.out)
    text = out.read_text() if out.is_file() else f"# Results\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + table + text[text.index(END) + len(END):]
    else:
        text += "\n" + table + "\n"
    out.write_text(text)
    mlflow.set_experiment(args.experiment)
    with mlflow.start_run(run_name=args.summary_run, tags={"study_runs": ",".join(r["run_id"] for r in rows)}):
        mlflow.log_artifact(args.plot)
        mlflow.log_text(table, "study.md")
    print(table)


if __name__ == "__main__":
    main()
