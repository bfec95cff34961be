"""An exponential moving average of the weights (and BatchNorm statistics): torch's AveragedModel.

    ema = WeightAverage(model, decay=0.999)
    ema.update(model)          # after every optimizer step
    ema.module                 # the averaged network: evaluated, checkpointed, exported

The decay warms up as in timm's ModelEma, min(decay, (1 + n) / (10 + n)) after n updates, so the
average follows the fast early changes instead of remembering the random initialisation for
thousands of steps. Its state is a plain tensor dict (saved as safetensors beside the checkpoint).
"""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel


def warmed_up_ema(decay: float):
    @torch.no_grad()
    def average(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        if not averaged[0].is_floating_point():  # AveragedModel groups by dtype: BatchNorm's step counters
            torch._foreach_copy_(averaged, current)
            return
        n = int(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(averaged, current, 1.0 - d)
    return average


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.averaged = AveragedModel(model, multi_avg_fn=warmed_up_ema(decay), use_buffers=True)

    @property
    def module(self) -> torch.nn.Module:
        return self.averaged.module

    def update(self, model: torch.nn.Module) -> None:
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged network's state dict (the model's own keys) and `n_averaged`."""
        state = {k.removeprefix("module."): v.detach().contiguous() for k, v in self.averaged.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.averaged.load_state_dict({(k if k == "n_averaged" else "module." + k): v for k, v in state.items()})
