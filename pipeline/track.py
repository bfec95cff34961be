"""Every MLflow call lives here, so the rest of the code never imports mlflow.

Only rank 0 tracks; other ranks get `Tracker(enabled=False)`, whose methods do nothing.
The store is MLflow's own default (`sqlite:///mlflow.db` in the working directory) unless
MLFLOW_TRACKING_URI says otherwise. Metrics are buffered and sent with `log_batch` (one request per
flush instead of one per value). If the tracking server goes away, training goes on: the tracker
warns once and drops what it cannot send.
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path


class Tracker:
    def __init__(self, enabled: bool, experiment: str = "mshg", run_name: str = "", run_id: str | None = None,
                 tags: dict | None = None, system_metrics: bool = True):
        self.enabled = enabled
        self.run_id: str | None = None
        self._pending: list = []
        self._failed = False
        if not enabled:
            return
        import mlflow
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        self._metric = mlflow.entities.Metric
        mlflow.set_experiment(experiment)
        if run_id:  # resume: the same run continues its history
            run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
        else:
            run = mlflow.start_run(run_name=run_name or None, tags=tags, log_system_metrics=system_metrics)
        self.run_id = run.info.run_id
        self._mlflow = mlflow

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
            warnings.warn(f"MLflow {what} failed ({type(e).__name__}: {e}); training continues without tracking")
            return None

    def log_params(self, params: dict) -> None:
        items = [self._mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()] if self.enabled else []
        for i in range(0, len(items), 100):  # MLflow limits a batch to 100 params
            self._guard("log_params", self.client.log_batch, self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict) -> None:
        if self.enabled:
            tag_list = [self._mlflow.entities.RunTag(k, str(v)) for k, v in tags.items()]
            self._guard("set_tags", self.client.log_batch, self.run_id, tags=tag_list)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            now = int(time.time() * 1000)
            self._pending += [self._metric(k, float(v), now, step) for k, v in metrics.items()]
            if len(self._pending) >= 500:
                self.flush()

    def flush(self) -> None:
        if self.enabled and self._pending:
            pending, self._pending = self._pending, []
            for i in range(0, len(pending), 1000):  # MLflow limits a batch to 1000 metrics
                self._guard("log_metrics", self.client.log_batch, self.run_id, metrics=pending[i:i + 1000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._guard("log_artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.flush()
            self._guard("end_run", self._mlflow.end_run, status=status)

    def ui_command(self) -> str:
        uri = self.tracking_uri
        if uri.startswith(("http://", "https://")):
            return f"open {uri} in a browser"
        return f"mlflow ui --backend-store-uri {uri} --port 5000"


def tracking_uri_hint() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
