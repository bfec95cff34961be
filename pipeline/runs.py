"""The read side of MLflow: what the commands read back from the store after (or beside) a run.
`mshg runs` (`print_runs`: the table, `--compare`), `mshg propose-stop` (`run_curves`) and the launcher's
`mark_failed` after a rank died. Writing a run is pipeline/track.py's `Tracker`."""
from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.checkpoint import LATEST, META
from pipeline.metrics import TRACKED_NAMES
from pipeline.run_folder import RUN_ID_FILE
from pipeline.track import HTTP_DEFAULTS, mask_credentials, warn


def run_id_of(run_folder: str | Path) -> str | None:
    """The MLflow run id of a run folder: what its tracker wrote at the start (RUN_ID_FILE), else what its
    latest checkpoint holds (runs started before that file existed); None when neither says."""
    folder = Path(run_folder)
    try:
        return (folder / RUN_ID_FILE).read_text().strip() or None
    except OSError:
        pass
    try:
        tag = (folder / "checkpoints" / LATEST).read_text().strip()
        return json.loads((folder / "checkpoints" / tag / META).read_text()).get("mlflow_run_id")
    except (OSError, ValueError, AttributeError):
        return None


def mark_failed(run_folder: str | Path, error: str) -> bool:
    """After a multi-rank run ended badly: a rank that raised could not tell MLflow (only rank 0 tracks,
    and the launcher then ended rank 0 too), so its run would stay RUNNING. Mark it FAILED with the
    error as a tag; False when the run folder names no run or its run is not RUNNING (rank 0 recorded
    the end itself). By the id in the run folder, not by name: on a shared server another user's run
    may have the same name."""
    run_id = run_id_of(run_folder)
    if run_id is None:
        return False
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        client = MlflowClient()
        if client.get_run(run_id).info.status != "RUNNING":
            return False
        client.set_tag(run_id, "error", error[:5000])
        client.set_tag(run_id, "stop_reason", "failed")
        client.set_terminated(run_id, "FAILED")
        return True
    except Exception as e:  # the store is not worth a traceback after a failed run
        warn(f"could not mark MLflow run {run_id} of {run_folder} FAILED ({type(e).__name__}: {e})")
        return False


def run_curves(run_name: str, experiment: str, tracking_uri: str | None, keys: tuple[str, ...]
               ) -> tuple[dict[str, tuple[list[int], list[float]]], str]:
    """({key: (steps, values)} for `keys` and the run's validation metric, the metric's name) of a finished
    run, found by name (`mshg propose-stop`)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'") if exp else []
    if not runs:
        raise ValueError(f"no run named {run_name!r} in experiment {experiment!r}")
    run = runs[0]
    metric = next((k for k in TRACKED_NAMES if k in run.data.metrics), None)
    if metric is None:
        raise ValueError(f"run {run_name} has no validation metric (train it with data.val_shards and train.eval_every)")
    curves = {}
    for key in (*keys, metric):
        points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        curves[key] = ([m.step for m in points], [m.value for m in points])
    return curves, metric


def tracking_uri_hint() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")


def runs_table(experiment: str = "mshg", limit: int = 20, tracking_uri: str | None = None) -> list[dict]:
    """The newest runs of an experiment as rows of what a comparison needs (what the UI's table shows)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    rows = []
    for run in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=limit):
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        final = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("final/")}
        rows.append({
            "run": run.info.run_name or run.info.run_id[:8],
            "status": run.info.status,
            "started": datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M"),
            "dataset": tags.get("dataset", ""), "config": tags.get("config", ""),
            "zero": tags.get("zero_stage", params.get("train.zero_stage", "")),
            "ranks": tags.get("world_size", ""),
            "batch": params.get("train.micro_batch", ""), "lr": params.get("train.lr", ""),
            "steps": tags.get("stopped_at_step", ""), "stop": tags.get("stop_reason", ""),
            "loss": f"{metrics['loss/total']:.4f}" if "loss/total" in metrics else "",
            "img/s": f"{metrics['images_per_s']:.1f}" if "images_per_s" in metrics else "",
            "final": ", ".join(f"{k} {100 * v:.1f}" for k, v in sorted(final.items())),
            "commit": tags.get("git_commit", "")[:8],
            "run_id": run.info.run_id,
        })
    return rows


def compare_runs(refs: list[str], experiment: str = "mshg", tracking_uri: str | None = None) -> str:
    """Two or more runs (names or ids) side by side: the config values that differ, then every final
    metric, the stop and the speed; for terminals (the UI's Compare view, in text)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = []
    for ref in refs:
        found = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{ref}'",
                                   order_by=["attributes.start_time DESC"]) if exp else []
        if not found:
            try:
                found = [client.get_run(ref)]
            except Exception:
                raise ValueError(f"no run named or with id {ref!r} in experiment {experiment!r}") from None
        runs.append(found[0])
    names = [r.info.run_name or r.info.run_id[:8] for r in runs]
    keys = sorted({k for r in runs for k in r.data.params})
    differ = [k for k in keys if len({r.data.params.get(k, "-") for r in runs}) > 1]
    rows = [{"": k, **{n: r.data.params.get(k, "-") for n, r in zip(names, runs)}} for k in differ]
    finals = sorted({k for r in runs for k in r.data.metrics if k.startswith("final/")})
    for k in finals:
        rows.append({"": k, **{n: f"{100 * r.data.metrics[k]:.1f}" if k in r.data.metrics else "-"
                               for n, r in zip(names, runs)}})
    for label, get in (("stop", lambda r: f"{r.data.tags.get('stop_reason', '-')} at {r.data.tags.get('stopped_at_step', '-')}"),
                       ("minutes", lambda r: f"{r.data.metrics['minutes']:.1f}" if "minutes" in r.data.metrics else "-"),
                       ("images/s", lambda r: f"{r.data.metrics['images_per_s']:.1f}" if "images_per_s" in r.data.metrics else "-"),
                       ("loss/total", lambda r: f"{r.data.metrics['loss/total']:.4f}" if "loss/total" in r.data.metrics else "-"),
                       ("status", lambda r: r.info.status)):
        rows.append({"": label, **{n: get(r) for n, r in zip(names, runs)}})
    head = f"{len(differ)} of {len(keys)} config values differ" if differ else f"the configs are the same ({len(keys)} values)"
    return head + "\n\n" + format_table(rows)


def format_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def print_runs(experiment: str = "mshg", limit: int = 20, tracking_uri: str | None = None,
               compare: list[str] | None = None) -> int:
    """`mshg runs`: the table, newest first, and how to see more; `--compare A B ...`: those runs side by side."""
    uri = tracking_uri or tracking_uri_hint()
    shown = mask_credentials(uri)  # what is printed: never a token
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        print(f"no MLflow store at {shown} (run from the directory you trained in, or give --tracking-uri)")
        return 1
    if uri.startswith(("http://", "https://")):  # a terminal command: fail in seconds, not after minutes of retries
        os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    try:
        if compare:
            print(compare_runs(compare, experiment, uri))
            return 0
        rows = runs_table(experiment, limit, uri)
    except ValueError:
        raise
    except Exception as e:  # an unreachable or refusing server: one line
        cause = mask_credentials(str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
        print(f"mshg runs: error: cannot read runs from {shown} ({cause})", file=sys.stderr)
        return 2
    if not rows:
        print(f"no runs in experiment {experiment!r} at {shown}")
        return 1
    print(format_table(rows))
    page = "#/experiments?workflowType=machine_learning"  # MLflow 3.17 opens its GenAI view otherwise
    ui = (f"open {shown.rstrip('/')}/{page}" if uri.startswith(("http://", "https://"))
          else f"mlflow ui --backend-store-uri {shown} --port 5000, then http://127.0.0.1:5000/{page}")
    print(f"\n{len(rows)} run(s) of {experiment!r} at {shown}; compare them in the UI: {ui}")
    return 0
