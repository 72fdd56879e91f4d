"""RSST's penalties: how the weights a structure will drop are faded during a state.

Two variants, one registry (`PENALTIES`), both restarted every state and driven by a growth
schedule `g(t)` of `schedules.LAMBDA_SCHEDULES`:

- `gradient` (the research code's form): λ(t)·W is added to the gradient of the faded weights.
  Under Adam the update is normalised by the gradient's running scale, so once λ·W outweighs the
  loss gradient the weights move by about one learning rate per step whatever λ is: the fade is
  set by the learning rate, not by the schedule.
- `fade` (decoupled, like AdamW's weight decay): after each optimiser step the faded weights are
  multiplied by exp(-F·g(t)/G), G = Σ_t g(t) over the state, F = ln(1/fade_to). The penalty alone
  takes them to `fade_to` of their size by the state's end along the schedule's shape, whatever
  the optimiser, learning rate, data size or number of steps; the loss can still hold up what it needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..registry import Registry
from ..masks import PruneMasks
from .schedules import LAMBDA_SCHEDULES, LambdaSchedule


def penalised_weights(structured: PruneMasks, element: PruneMasks) -> dict[str, torch.Tensor]:
    """The weights RSST fades: dropped by the structure (`structured == 0`) yet still alive after
    magnitude pruning (`element == 1`). Weights magnitude already removed are cut at the end anyway."""
    return {n: ~structured[n] & element[n] for n in structured.layout.weight_names()}


class _Penalty:
    """Targets and the logged value shared by the variants; `value` holds the last strength applied."""

    def __init__(self, structured: PruneMasks, element: PruneMasks):
        self.targets = penalised_weights(structured, element)
        self.value = 0.0

    def _each(self, model: nn.Module):
        for name, target in self.targets.items():
            p = model.get_parameter(name)
            yield p, target.to(device=p.device, dtype=p.dtype)

    def __call__(self, model: nn.Module, step: int, total_steps: int) -> float:
        return self.value

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        return None

    @torch.no_grad()
    def norm(self, model: nn.Module) -> float:
        """L2 norm of the penalised weights: how far RSST has faded them."""
        return sum(float((p.detach().float() * t).pow(2).sum()) for p, t in self._each(model)) ** 0.5


PENALTIES: Registry[type[_Penalty]] = Registry("rsst penalty")


@PENALTIES.register("gradient")
class RSSTPenalty(_Penalty):
    """λ(t)·W added to the gradient of the faded weights (after clipping); `value` is λ(t)."""

    def __init__(self, structured: PruneMasks, element: PruneMasks, schedule: LambdaSchedule, fade_to: float = 0.01):
        super().__init__(structured, element)
        self.schedule = schedule

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int, total_steps: int) -> float:
        self.value = self.schedule(step, total_steps)
        for p, target in self._each(model):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(p.detach() * target, alpha=self.value)
        return self.value


@PENALTIES.register("fade")
class FadePenalty(_Penalty):
    """Decoupled fade: after step t the faded weights are scaled by exp(-F·g(t)/G) (module doc);
    `value` is the last step's F·g(t)/G, the log-shrink of that step."""

    def __init__(self, structured: PruneMasks, element: PruneMasks, schedule: LambdaSchedule, fade_to: float = 0.01):
        super().__init__(structured, element)
        self.growth = LAMBDA_SCHEDULES.get(schedule.name)
        self.exponent = schedule.exponent
        self.strength = math.log(1.0 / fade_to)
        self._sums: dict[int, float] = {}

    def rate(self, step: int, total_steps: int) -> float:
        """The log-shrink of step `step` of `total_steps`: the rates of one state sum to ln(1/fade_to)."""
        T = max(1, total_steps)
        if T not in self._sums:
            self._sums[T] = sum(self.growth(t, T, self.exponent) for t in range(1, T + 1))
        return self.strength * self.growth(min(step, T - 1) + 1, T, self.exponent) / self._sums[T]

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        self.value = self.rate(step, total_steps)
        scale = math.exp(-self.value)
        for p, target in self._each(model):
            # target is 0/1: faded weights are scaled, the rest multiplied by exactly 1.
            p.mul_(1.0 - (1.0 - scale) * target)
