"""Every MLflow call lives here, so the rest of the code never imports mlflow.

Only rank 0 tracks; other ranks get `Tracker(enabled=False)`, whose methods do nothing.
The store is MLflow's own default (`sqlite:///mlflow.db` in the working directory) unless
MLFLOW_TRACKING_URI says otherwise. Metrics are buffered and sent with `log_batch` (one request per
flush instead of one per value). If the tracking store goes away (or is not there at the start),
training goes on: the tracker warns once and drops what it cannot send. For an HTTP server the
tracker caps MLflow's retries and timeouts (unless the environment sets them), so a dead server
costs seconds once, not minutes per call.

Besides metrics: the git commit as tags, MLflow's own system metrics (CPU, memory, GPU when
present), JSON/PNG artifacts, the per-stage loss curves (`log_loss_curves`), and the final model
(`log_model`: `mlflow.pytorch.log_model` in pt2 format with an input example, plus its ONNX export).
See docs/tracking.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.tracking import MlflowClient, fluent
from PIL import Image

from pipeline.export import HeatmapModel, export_model_onnx, onnx_metadata
from pipeline.plots import loss_curves
from pipeline.run_folder import RUN_ID_FILE

REPO = Path(__file__).resolve().parents[1]
# MLflow's HTTP defaults (7 retries with a backoff factor of 2, 120 s timeout) can stall a step
# for minutes when the server is gone; these apply unless the environment sets its own
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def mask_credentials(text: str) -> str:
    """`https://user:token@host/...` -> `https://***@host/...`, in a URI or in any text holding one (MLflow's
    errors name the URL they called): a token in MLFLOW_TRACKING_URI must not reach a terminal, a log or
    summary.txt. Everything the tracker prints or writes about the store goes through it."""
    return re.sub(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s]*@", r"\1***@", text)


def warn(message: str) -> None:
    warnings.warn(mask_credentials(message), stacklevel=2)  # the line that warned, as before


def git_tags(repo: Path = REPO) -> dict[str, str]:
    """The commit the code runs from (and whether the tree had changes), as run tags; empty when
    the code is not in a git checkout (an installed package)."""
    def git(*args) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": str(dirty).lower(), "mlflow.source.git.commit": commit,
            "mlflow.source.git.branch": branch}


def within(seconds: float, fn, *args, **kwargs) -> bool:
    """fn(*args, **kwargs) in a daemon thread, waited for at most `seconds` (0: no limit): True when it returned
    (an exception it raised is raised here), False when the time ran out: it is left running, and the process may
    end under it. The thread sees the caller's active MLflow run (MLflow keeps the active run per thread)."""
    runs = list(fluent._active_run_stack.get())
    error: list[BaseException] = []

    def work():
        fluent._active_run_stack.get().extend(runs)
        try:
            fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            error.append(e)

    thread = threading.Thread(target=work, name=f"mshg-{getattr(fn, '__name__', 'call')}", daemon=True)
    thread.start()
    thread.join(seconds or None)
    if thread.is_alive():
        return False
    if error:
        raise error[0]
    return True


def once_more_if_raced(fn, *args, **kwargs):
    """Runs started together race on the store's check-then-insert rows (the experiment's kind tag, a
    dataset): each finds none and inserts it, and the second insert breaks the row's unique key (seen
    with two runs starting at once on one server). Once the row exists, a second try updates or links it."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        if "unique constraint" not in str(e).lower():
            raise
        return fn(*args, **kwargs)


class Tracker:
    # waits (s) before each further try of the run's end status once the store has failed: a brief outage
    # must not leave the run RUNNING forever. Each try has MLflow's own capped retries (HTTP_DEFAULTS): on a
    # server that stays away the three tries cost ~12 s (measured), once, at the run's end
    END_RETRIES = (1.0, 4.0)

    def __init__(self, enabled: bool, experiment: str = "mshg", run_name: str = "", run_id: str | None = None,
                 tags: dict | None = None, system_metrics: bool = True):
        self.enabled = enabled
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._pending: list = []
        self._failed = False
        self._logged_until: dict[str, int] = {}  # metric -> last step already in the store (resumed runs)
        self._lost: dict[str, tuple[int, int]] = {}  # metric -> (first, last) step not sent: the store had failed
        if not enabled:
            return
        self._mlflow = mlflow
        if mlflow.get_tracking_uri().startswith(("http://", "https://")):
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
        if mask_credentials(mlflow.get_tracking_uri()) != mlflow.get_tracking_uri():
            # MLflow's own "View run ... at: URL" line on end_run prints the URI whole, token included;
            # the run's summary has the masked link instead
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.client = MlflowClient()
        self._metric = mlflow.entities.Metric
        tags = {**git_tags(), **{k: str(v) for k, v in (tags or {}).items()}}
        if not run_id and "dataset" in tags:
            tags["mlflow.note.content"] = run_description(tags)
        try:
            exp = mlflow.set_experiment(experiment)
            self.experiment_id = exp.experiment_id
            # without it MLflow 3's UI opens the experiment in its GenAI view (traces, tokens), not on the runs
            if exp.tags.get("mlflow.experimentKind") != "custom_model_development":
                once_more_if_raced(self.client.set_experiment_tag, exp.experiment_id, "mlflow.experimentKind",
                                   "custom_model_development")
            if run_id:  # resume: the same run continues its history
                run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
                self.run_id = run.info.run_id  # _run_tags needs it
                self._run_tags(tags)
                self._logged_until = self._last_logged_steps(run)
            else:
                # the experiment by id: when another run created it a moment before, set_experiment
                # returns it without making it the active one (MLflow 3.17), and a run started without
                # the id would land in the Default experiment
                run = mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name or None, tags=tags,
                                       log_system_metrics=system_metrics)
        except Exception as e:  # no store at the start: train anyway, untracked
            self._failed = True
            warn(f"MLflow start_run failed ({type(e).__name__}: {e}); training continues without tracking")
            return
        self.run_id = run.info.run_id

    def _last_logged_steps(self, run) -> dict[str, int]:
        """After a crash the steps since the last checkpoint are trained again (exact resume: to the
        same values); the first attempt already logged them, so log_metrics skips them and the run
        keeps one value per step. MLflow's own system metrics are not ours and are left alone."""
        return {key: max(m.step for m in self.client.get_metric_history(self.run_id, key))
                for key in run.data.metrics if not key.startswith("system/")}

    def _run_tags(self, tags: dict) -> None:
        self._guard("set_tags", self.client.log_batch, self.run_id,
                    tags=[self._mlflow.entities.RunTag(k, str(v)) for k, v in tags.items()])

    @property
    def tracking_uri(self) -> str:
        return self._mlflow.get_tracking_uri() if self.enabled else ""

    def _guard(self, what: str, fn, *args, **kwargs):
        if not self.enabled or self._failed:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # the tracking store is not worth a training run
            self._failed = True
            warn(f"MLflow {what} failed ({type(e).__name__}: {e}); training continues without tracking")
            return None

    def log_datasets(self, shard_sets: list[tuple[object, str]]) -> None:
        """Each (ShardSet, split) as an MLflow dataset input (`shard_dataset`)."""
        for shards, split in shard_sets if self.enabled else []:
            self._guard("log_input", self._log_input, shard_dataset(shards, split),
                        context="training" if split == "train" else "validation")

    def _log_input(self, dataset, context: str) -> None:
        once_more_if_raced(self._mlflow.log_input, dataset, context=context)

    def log_params(self, params: dict) -> None:
        items = [self._mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()] if self.enabled else []
        for i in range(0, len(items), 100):  # MLflow limits a batch to 100 params
            self._guard("log_params", self.client.log_batch, self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict) -> None:
        if self.enabled:
            self._run_tags(tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            now = int(time.time() * 1000)
            self._pending += [self._metric(k, float(v), now, step) for k, v in metrics.items()
                              if step > self._logged_until.get(k, -1)]
            if len(self._pending) >= 500:
                self.flush()

    def flush(self) -> None:
        if self.enabled and self._pending:
            pending, self._pending = self._pending, []
            for i in range(0, len(pending), 1000):  # MLflow limits a batch to 1000 metrics
                batch = pending[i:i + 1000]
                self._guard("log_metrics", self.client.log_batch, self.run_id, metrics=batch)
                if self._failed:  # dropped: counted, so that the summary can say what the store misses
                    for m in batch:
                        first, last = self._lost.get(m.key, (m.step, m.step))
                        self._lost[m.key] = (min(first, m.step), max(last, m.step))

    def lost_metrics(self) -> str:
        """The metrics the store misses since it failed, by step range: "steps 12-90: loss/total, lr; step 50:
        pck"; "" when nothing was lost (or there was never a run to log to)."""
        if self._failed:
            self.flush()  # no request once failed: what is pending is lost too
        if not self.run_id:
            return ""
        ranges: dict[tuple[int, int], list[str]] = {}
        for key, steps in sorted(self._lost.items()):
            ranges.setdefault(steps, []).append(key)
        return "; ".join((f"steps {a}-{b}" if a != b else f"step {a}") + f": {', '.join(keys)}"
                         for (a, b), keys in sorted(ranges.items()))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._guard("log_artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        """A dict as a JSON (or YAML, by the file's extension) artifact."""
        if self.enabled:
            self._guard("log_dict", self.client.log_dict, self.run_id, data, artifact_file)

    def log_image(self, image, artifact_file: str) -> None:
        """An RGB uint8 array as a PNG artifact, e.g. `predictions/step_000100.png`."""
        if self.enabled and image is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / Path(artifact_file).name
                Image.fromarray(image).save(path, format="PNG")
                parent = str(Path(artifact_file).parent)
                self.log_artifact(path, None if parent == "." else parent)

    def log_loss_curves(self, stages: int, artifact_file: str = "plots/stage_losses.png") -> None:
        """The per-stage loss curves (`loss/stage_1` .. `loss/stage_<stages>`) of the whole run (read
        back from the store, so a resumed run's earlier steps are in) on one plot, as a PNG artifact."""
        if not self.enabled or self._failed:
            return
        self.flush()
        names = [f"loss/stage_{i}" for i in range(1, stages + 1)]
        histories = {}
        for name in names:
            history = self._guard("get_metric_history", self.client.get_metric_history, self.run_id, name)
            if history:
                history = sorted(history, key=lambda m: m.step)
                histories[name] = ([m.step for m in history], [m.value for m in history])
        if histories:
            with tempfile.TemporaryDirectory() as tmp:
                path = loss_curves(histories, Path(tmp) / Path(artifact_file).name,
                                   title="loss of each hourglass module (stage)")
                parent = str(Path(artifact_file).parent)
                self.log_artifact(path, None if parent == "." else parent)

    def log_model(self, model, input_size: int, joints: list[str], flip_pairs: list[list[int]]) -> None:
        """The final model: `mlflow.pytorch.log_model` (pt2, last-module heatmaps, input example of
        two zero images so the batch dimension stays dynamic) under `model`, and its ONNX export as
        the artifact `onnx/model.onnx`. A model that cannot be exported is a warning, not a failed run."""
        if not self.enabled or self._failed:
            return
        model = model.float().cpu().eval()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                onnx_path = export_model_onnx(model, input_size, Path(tmp) / "model.onnx",
                                              onnx_metadata(joints, flip_pairs, input_size, int(model.strides[-1])))
            except Exception as e:
                warn(f"ONNX export failed ({type(e).__name__}: {e}); the run has no onnx/model.onnx")
            else:
                self.log_artifact(onnx_path, "onnx")
            if self._failed:
                return
            example = np.zeros((2, 3, input_size, input_size), np.float32)
            requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={self._mlflow.__version__}"]
            try:
                self._mlflow.pytorch.log_model(HeatmapModel(model).eval(), name="model", input_example=example,
                                               serialization_format="pt2", pip_requirements=requirements,
                                               metadata={"joints": joints, "flip_pairs": flip_pairs,
                                                         "input_size": input_size,
                                                         "stride": int(model.strides[-1])})
            except Exception as e:
                warn(f"mlflow.pytorch.log_model failed ({type(e).__name__}: {e}); the run has no model")

    def finish(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        self.flush()
        if not self._failed:
            self._guard("end_run", self._mlflow.end_run, status=status)
        if self._failed:
            if self.run_id:
                self._end_after_outage(status)
            abandon_local_run(self.run_id)

    def _end_after_outage(self, status: str) -> bool:
        """The store failed during the run (what followed was dropped): set the end status anyway, with what
        was lost as the tag `tracking_gap`, tried 1 + len(END_RETRIES) times; a line when it stays RUNNING."""
        lost = self.lost_metrics()
        error: Exception | None = None
        for wait in (0.0, *self.END_RETRIES):
            time.sleep(wait)
            try:
                self.client.set_terminated(self.run_id, status)
            except Exception as e:  # still away: wait and try again
                error = e
                continue
            try:  # the status is what matters; the gap's tag is a courtesy
                self.client.set_tag(self.run_id, "tracking_gap", f"not recorded: {lost}"[:5000] if lost else
                                    "the tracking store failed during the run: tags or artifacts are missing")
            except Exception:
                pass
            return True
        warn(f"the end status {status} of MLflow run {self.run_id} could not be recorded in "
             f"{1 + len(self.END_RETRIES)} tries ({type(error).__name__}: {error}); it stays RUNNING in the store")
        return False

    def log_run_inputs(self, datasets: list, params: dict, config_file, deepspeed_config: dict) -> None:
        """A new run's records: its shard sets as dataset inputs, the flattened config as params, the
        config file and DeepSpeed's derived config as artifacts. The run id goes into the run folder first
        (beside config.yaml): from then on a rank's death marks this run FAILED."""
        if config_file:
            self.record_run_id(Path(config_file).parent)
        self.log_datasets(datasets)
        self.log_params(params)
        if config_file:
            self.log_artifact(config_file)
        self.log_dict(deepspeed_config, "deepspeed_config.json")

    def ui_command(self) -> str:
        """How to look at the run (the summary's MLflow line), and what the store misses if it failed mid-run."""
        line = ui_command(self.tracking_uri, self.experiment_id)
        lost = self.lost_metrics() if self.enabled else ""
        if lost:
            line += (f"\n  incomplete: the tracking store failed during the run; not recorded in MLflow: {lost} "
                     f"(nor the tags, artifacts and model sent after the failure)")
        return line

    def record_run_id(self, folder: Path) -> None:
        """The run id into the run folder (RUN_ID_FILE), at the start: if a rank dies, the launcher marks
        exactly this run FAILED (`mark_failed`), before any checkpoint holds the id."""
        if self.enabled and self.run_id:
            try:
                (Path(folder) / RUN_ID_FILE).write_text(self.run_id + "\n")
            except OSError as e:  # bookkeeping is not worth the training
                warn(f"MLflow run id not written to {folder} ({e}); a failed multi-rank run stays RUNNING")


def shard_dataset(shards, split: str):
    """A ShardSet as an MLflow dataset: name, source directory, the manifest's digest, sample count and
    joints, so the UI's Dataset column and filters show what a run trained on."""
    class ShardDataset(MetaDataset):
        def __init__(self):
            self._profile = {"num_rows": shards.num_samples, "split": split, "joints": len(shards.joints),
                             "dataset": shards.dataset}
            digest = hashlib.sha256((Path(shards.root) / "manifest.json").read_bytes()).hexdigest()[:12]
            with warnings.catch_warnings():  # MLflow registers its local-path source twice and says so
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(str(Path(shards.root).resolve()))
            super().__init__(source, name=f"{shards.dataset}-{split}", digest=digest)

        @property
        def profile(self):
            return self._profile

        def to_dict(self):
            return {**super().to_dict(), "profile": json.dumps(self._profile)}

    return ShardDataset()


def run_description(tags: dict[str, str]) -> str:
    """A new run's description in the UI (mlflow.note.content): what to compare it by."""
    return " · ".join(f"{label} {tags[key][:8] if key == 'git_commit' else tags[key]}"
                      for label, key in [("dataset", "dataset"), ("config", "config"), ("ZeRO", "zero_stage"),
                                         ("ranks", "world_size"), ("commit", "git_commit")] if key in tags)


def ui_command(uri: str, experiment_id: str | None) -> str:
    """How to look at a run: the server command (a local store) and the page of the experiment's runs.
    MLflow 3.17's UI opens experiments in its GenAI view unless the URL (or its toggle at the top left)
    says `workflowType=machine_learning`."""
    page = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning" if experiment_id else ""
    uri = mask_credentials(uri)  # the user has the token; the line goes to logs and summary.txt
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}/{page} in a browser"
    # the mlflow next to this interpreter: the venv's, which may not be on the user's PATH
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    exe = str(mlflow_bin) if mlflow_bin.exists() and not shutil.which("mlflow") else "mlflow"
    return f"{exe} ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000/{page}"


def abandon_local_run(run_id: str | None) -> None:
    """The store is gone: end the run locally without another request (MLflow's exit hook would
    otherwise try again) and stop the system-metrics thread."""
    try:
        monitor = fluent.run_id_to_system_metrics_monitor.pop(run_id, None)
        if monitor is not None:
            monitor._shutdown_event.set()  # its thread is a daemon; no join on a dead server
        stack = fluent._active_run_stack.get()
        while stack:
            stack.pop()
    except Exception:  # MLflow internals moved: the exit hook's own try is the fallback
        pass


def run_id_of(run_folder: str | Path) -> str | None:
    """The MLflow run id of a run folder: what its tracker wrote at the start (RUN_ID_FILE), else what its
    latest checkpoint holds (runs started before that file existed); None when neither says."""
    from pipeline.checkpoint import LATEST, META

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
    metric = next((k for k in ("pck", "pckh", "coco/AP") if k in run.data.metrics), None)
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
