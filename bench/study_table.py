"""The study's table and plot from its MLflow runs (bench/cascade_vs_stacked.sh calls it).

    python bench/study_table.py RUN_NAME... [--out docs/results/cascade_study.md] [--plot docs/pck_vs_minutes.png]

Per run: parameters, forward GFLOPs per image, images/s (median of the logged values), steps and
images seen, PCK@0.2 (flip test) per joint and mean at the end, and the validation PCK at equal
training minutes and at equal images seen (linear between evaluations): the first says which model
wins on this machine's clock, the second whether one learns more per image (the patent's claim)
independently of its speed. Per model: the mean over seeds and the seeds' spread, against the
difference between the models. The table replaces the text between the `<!-- study:begin -->` and
`<!-- study:end -->` markers of --out; the plot (PCK against minutes and against images seen) goes
beside it and, with the table, to an MLflow run `study-summary`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"


def history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def at(curve: list[tuple[float, float]], x: float) -> float:
    """The curve's value at x (linear between points, from (0, 0)); NaN past its last point."""
    prev = (0.0, 0.0)
    for xi, value in curve:
        if xi >= x:
            x0, v0 = prev
            return v0 + (value - v0) * (x - x0) / max(xi - x0, 1e-9)
        prev = (xi, value)
    return float("nan")


def spread(values: list[float]) -> str:
    """'mean (seeds: a, b)' in percent."""
    return f"{100 * statistics.mean(values):.1f} (seeds: {', '.join(f'{100 * v:.1f}' for v in values)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "cascade_study.md"))
    p.add_argument("--plot", default=str(REPO / "docs" / "pck_vs_minutes.png"))
    p.add_argument("--experiment", default="mshg")
    p.add_argument("--summary-run", default="study-summary", help="the MLflow run the table and plot go to")
    args = p.parse_args()

    import mlflow
    from mlflow.tracking import MlflowClient

    from bench.recipe_curve import find_run, plot_curves, run_curve
    from pipeline.config import config_from_yaml
    from pipeline.model import build_model, count_flops, count_parameters

    client = MlflowClient()
    rows, curves, joints = [], {}, None  # curves: name -> [(minutes, images seen, pck)]
    for name in args.runs:
        run = find_run(client, args.experiment, name)
        cfg = config_from_yaml((REPO / "runs" / name / "config.yaml").read_text(), source=name)
        model = build_model(cfg.model, 14, cfg.data.input_size)
        curves[name] = [(m, i, v / 100) for m, i, v in run_curve(client, run)]
        joints = joints or sorted(k.split("/", 1)[1] for k in run.data.metrics if k.startswith("pck/"))
        per_joint = {j: run.data.metrics.get(f"pck/{j}", float("nan")) for j in joints}
        rates = list(history(client, run.info.run_id, "images_per_s").values())
        rows.append({
            "run": name, "run_id": run.info.run_id, "model": "MSC-HG" if len(cfg.model.stages) > 1 else "stacked",
            "params": count_parameters(model) / 1e6, "gflops": count_flops(model, cfg.data.input_size) / 1e9,
            "img_s": statistics.median(rates[len(rates) // 4:]) if rates else float("nan"),
            "steps": run.data.tags.get("stopped_at_step", "?"), "pck": run.data.metrics.get("final/pck", float("nan")),
            "per_joint": per_joint, "images": curves[name][-1][1] if curves[name] else 0})

    # the comparison points every run reached: half and all of the shortest run's minutes; the fewest images
    half_min = min(c[-1][0] for c in curves.values()) / 2
    end_min = 2 * half_min
    equal_images = min(c[-1][1] for c in curves.values())
    for r in rows:
        c = curves[r["run"]]
        r["at_half"] = at([(m, v) for m, _, v in c], half_min)
        r["at_end"] = at([(m, v) for m, _, v in c], end_min)
        r["at_images"] = at([(i, v) for _, i, v in c], equal_images)
    # the curve is the periodic evaluations (one scale); the final evaluation uses the run's eval settings
    lines = [BEGIN, "", f"| run | model | params (M) | GFLOPs | images/s | steps | images seen | final evaluation "
             f"(eval.scales) | curve at {half_min:.1f} min | at {end_min:.1f} min | at {equal_images:,} images |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['model']} | {r['params']:.2f} | {r['gflops']:.3f} | {r['img_s']:.1f} | "
                     f"{r['steps']} | {r['images']:,} | {100 * r['pck']:.1f} | {100 * r['at_half']:.1f} | "
                     f"{100 * r['at_end']:.1f} | {100 * r['at_images']:.1f} |")
    lines += ["", "Per joint (PCK@0.2 at the final evaluation):", "",
              "| run | " + " | ".join(joints) + " |", "|---|" + "---|" * len(joints)]
    for r in rows:
        lines.append(f"| {r['run']} | " + " | ".join(f"{100 * r['per_joint'][j]:.1f}" for j in joints) + " |")
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    lines += ["", "Mean over seeds, PCK@0.2 % of the curve (periodic evaluations, one scale, flip test):", ""]
    for label, key in ((f"at {end_min:.1f} min (equal wall time)", "at_end"),
                       (f"at {equal_images:,} images (equal samples)", "at_images")):
        lines.append(f"- {label}: " + "; ".join(f"{m} {spread([r[key] for r in rs])}" for m, rs in by_model.items()))
    lines += ["", "MLflow run ids: " + ", ".join(f"{r['run']} `{r['run_id']}`" for r in rows), "",
              f"![PCK@0.2 against training minutes and images seen]({os.path.relpath(args.plot, Path(args.out).parent)})", "", END]
    table = "\n".join(lines)

    plot_curves({n: [(m, i, 100 * v) for m, i, v in c] for n, c in curves.items()}, args.plot,
                dashed=lambda name: not ("cascade" in name or "msc" in name))

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
