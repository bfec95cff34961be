"""Training's evaluations of data.val_shards (`Validation`): `pipeline.evaluate.evaluate_shards` on every rank,
then rank 0 computes the shard set's metric (`pipeline.metrics.metric_for`) and logs it, with the prediction
grid of the fixed preview images, to the run's tracker and its log."""
from __future__ import annotations

import dataclasses

import torch

from pipeline.evaluate import evaluate_shards, summarise
from pipeline.metrics import metric_for
from pipeline.plots import prediction_grid
from shards.format import read_metadata


class Validation:
    """The learning curve is measured at one scale: each of eval.scales is another pass over the validation
    set, on the training clock. The final evaluation adds one with eval.scales, as `mshg evaluate` makes it."""

    def __init__(self, shards, cfg, batch_size: int, world, tracker, log):
        self.shards, self.cfg, self.batch_size, self.world = shards, cfg, batch_size, world
        self.curve_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, scales=[1.0]))
        self.tracker, self.log = tracker, log
        self.metric = metric_for(shards)
        self._metadata: dict[int, dict] | None = None  # read once, on rank 0, when the metric needs it

    def metadata(self) -> dict[int, dict] | None:
        if self.metric.needs_metadata and self._metadata is None:
            self._metadata = read_metadata(self.shards)
        return self._metadata

    def run(self, model: torch.nn.Module, step: int, minutes: float, final: bool = False) -> dict | None:
        """The metrics on rank 0 (the final run's: with eval.scales), None on the other ranks."""
        merged = evaluate_shards(model, self.shards, self.curve_cfg, self.batch_size, self.world)
        metrics = self.report(merged, "")
        if merged is not None:
            self.tracker.log_metrics({**self.metric.tracked(metrics), "minutes": minutes}, step)
            self.tracker.log_image(prediction_grid(merged, skeleton=self.shards.skeleton),
                                   f"predictions/step_{step:06d}.png")
        if final and self.cfg.eval.scales != [1.0]:
            merged = evaluate_shards(model, self.shards, self.cfg, self.batch_size, self.world)
            metrics = self.report(merged, f"with the multi-scale test (eval.scales {self.cfg.eval.scales}): ")
        return metrics

    def report(self, merged: dict | None, label: str) -> dict | None:
        if merged is None:
            return None
        metrics = summarise(merged, self.shards, self.metadata())
        if len(merged) != self.shards.num_samples:
            self.log(f"warning: evaluated {len(merged)} of {self.shards.num_samples} validation samples")
        self.log(label + self.metric.format(metrics))
        return metrics
