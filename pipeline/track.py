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
(`log_model`: `mlflow.pytorch.log_model` in pt2 format with an input example, plus the ONNX file the caller
exported). The read side (`mshg runs`, `--compare`, propose-stop's curves, `mark_failed`) is pipeline/runs.py.
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
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.tracking import MlflowClient, fluent
from PIL import Image

from pipeline.model_record import ModelRecord
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

    @property
    def recording(self) -> bool:
        """Whether calls reach the store: rank 0's tracker, and the store has not failed."""
        return self.enabled and not self._failed

    def log_model(self, model: torch.nn.Module, onnx_file: str | Path | None, record: ModelRecord) -> None:
        """The final model: `model` (what MLflow serves, e.g. pipeline.export's last-module heatmaps in eval mode)
        through `mlflow.pytorch.log_model` (pt2, an input example of two zero images so the batch dimension stays
        dynamic) under `model` with the model record as its metadata, and the exported ONNX file (the caller
        exported it; None: it could not) as the artifact `onnx/<its name>`. A model MLflow refuses is a warning,
        not a failed run."""
        if not self.recording:
            return
        if onnx_file is not None:
            self.log_artifact(onnx_file, "onnx")
        if self._failed:
            return
        example = np.zeros((2, 3, record.input_size, record.input_size), np.float32)
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={self._mlflow.__version__}"]
        try:
            self._mlflow.pytorch.log_model(model, name="model", input_example=example, serialization_format="pt2",
                                           pip_requirements=requirements, metadata=record.metadata())
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
