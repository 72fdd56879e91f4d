"""RSST's penalty: a growing λ(t)·W added to the gradient of the weights a structure will drop."""

from __future__ import annotations

import torch
import torch.nn as nn

from .masks import PruneMasks
from .schedules import LambdaSchedule


def penalised_weights(structured: PruneMasks, element: PruneMasks) -> dict[str, torch.Tensor]:
    """The weights RSST fades: dropped by the structure (`structured == 0`) yet still alive after
    magnitude pruning (`element == 1`). Weights magnitude already removed are cut at the end anyway."""
    return {n: ~structured[n] & element[n] for n in structured.layout.weight_names()}


class RSSTPenalty:
    """Gradient penalty for one state; `value` holds the last λ applied (for logs and checkpoints)."""

    def __init__(self, structured: PruneMasks, element: PruneMasks, schedule: LambdaSchedule):
        self.targets = penalised_weights(structured, element)
        self.schedule = schedule
        self.value = 0.0

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int, total_steps: int) -> float:
        self.value = self.schedule(step, total_steps)
        for name, target in self.targets.items():
            p = model.get_parameter(name)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(p.detach() * target.to(device=p.device, dtype=p.dtype), alpha=self.value)
        return self.value

    @torch.no_grad()
    def norm(self, model: nn.Module) -> float:
        """L2 norm of the penalised weights: how far RSST has faded them."""
        total = 0.0
        for name, target in self.targets.items():
            p = model.get_parameter(name)
            total += float((p.detach().float() * target.to(p.device)).pow(2).sum())
        return total ** 0.5
