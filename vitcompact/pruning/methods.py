"""The pruning methods, one registered class each: what sets RSST, Refill and one-shot apart.

The loop (`loop.py`) runs the same steps for every method and asks it two things: `plan`, the
states to run and the epochs left for fine-tuning, and `run_state`, what one state does once its
structure is regrouped:
- rsst: retrains with a growing penalty on the weights the structure will drop, then cuts them;
- refill: cuts at once, optionally rewinds the survivors, and retrains;
- oneshot: Refill's state, planned as a single state at the final ratio, then the whole epoch
  budget as fine-tuning;
- refit: no training: one state at the final ratio whose blocks are refit by least squares.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Protocol

import torch.nn as nn

from ..registry import Registry
from ..masks import PruneMasks
from .penalty import PENALTIES
from .refit import refit


@dataclass
class StatePlan:
    index: int
    head_ratio: float
    mlp_ratio: float
    rate: float
    epochs: int
    budget_ms: float | None = None  # under a latency budget: this state's (the ratios are then estimates)


def state_ratio(final: float, state: int, states: int) -> float:
    """Ratio for state s of S: kept fraction (1 - r)^(s/S), and exactly r at the last state."""
    return final if state == states else 1.0 - (1.0 - final) ** (state / states)


class StateRun(Protocol):
    """What a state step may use of the running loop."""

    model: nn.Module

    def train_state(self, plan: StatePlan, **train_args: Any) -> None:
        """Train the state's epochs, logged under the method's name."""

    def cut(self, structured: PruneMasks) -> None:
        """Make `structured` the hard masks and zero what they remove."""

    def rewind(self) -> None:
        """Load the rewind weights, where the run keeps any."""


class Method(abc.ABC):
    """A pruning method, made for one run's config. By default it plans `states` states whose
    ratios grow to the final ones, each trained `epochs_per_state`, then `finetune_epochs`
    (an `IterativeConfig`'s fields)."""

    needs_calibration = False  # whether its states read calibration images whatever the criterion

    def __init__(self, config: Any):
        self.config = config

    def plan(self, head_ratio: float, mlp_ratio: float, removed: float) -> tuple[list[StatePlan], int]:
        """The states and the fine-tuning epochs; `removed` is the fraction of prunable weights the
        final structure removes, which sets the magnitude rate unless `prune_rate` does."""
        c, S = self.config, self.config.states
        # Per-state rates compound, so element sparsity tracks the structural target.
        rate = c.prune_rate if c.prune_rate is not None else 1.0 - (1.0 - removed) ** (1.0 / S)
        plans = [StatePlan(s, state_ratio(head_ratio, s, S), state_ratio(mlp_ratio, s, S), rate, c.epochs_per_state)
                 for s in range(1, S + 1)]
        return plans, c.finetune_epochs

    @abc.abstractmethod
    def run_state(self, run: StateRun, plan: StatePlan, structured: PruneMasks,
                  element: PruneMasks) -> dict[str, Any]:
        """Train and cut to `structured`; returns what the state's record adds."""


METHODS: Registry[type[Method]] = Registry("method", ordered=True)


@METHODS.register("rsst")
class RSST(Method):
    def run_state(self, run: StateRun, plan: StatePlan, structured: PruneMasks,
                  element: PruneMasks) -> dict[str, Any]:
        c = self.config
        penalty = PENALTIES.get(c.penalty)(structured, element, c.schedule(), c.fade_to)
        norm_before = penalty.norm(run.model)
        run.train_state(plan, penalty=penalty)
        info = {"lambda": penalty.value, "penalised_norm_before": norm_before,
                "penalised_norm_after": penalty.norm(run.model)}
        run.cut(structured)
        return info


@METHODS.register("refill")
class Refill(Method):
    def run_state(self, run: StateRun, plan: StatePlan, structured: PruneMasks,
                  element: PruneMasks) -> dict[str, Any]:
        run.rewind()
        run.cut(structured)
        if plan.epochs:
            run.train_state(plan)
        return {}


@METHODS.register("oneshot")
class OneShot(Refill):
    """Refill's state, planned as one state at the final ratios, then `finetune_epochs`."""

    def plan(self, head_ratio: float, mlp_ratio: float, removed: float) -> tuple[list[StatePlan], int]:
        c = self.config
        rate = c.prune_rate if c.prune_rate is not None else removed
        return [StatePlan(1, head_ratio, mlp_ratio, rate, 0)], c.finetune_epochs


@METHODS.register("refit")
class Refit(Method):
    """Compaction without training: one state at the final ratios (no magnitude pruning: the
    criterion alone chooses), whose units are removed and whose blocks are refit on the calibration
    images (`refit.refit`); then `finetune_epochs`, 0 by default."""

    needs_calibration = True

    def plan(self, head_ratio: float, mlp_ratio: float, removed: float) -> tuple[list[StatePlan], int]:
        return [StatePlan(1, head_ratio, mlp_ratio, 0.0, 0)], self.config.finetune_epochs

    def run_state(self, run: StateRun, plan: StatePlan, structured: PruneMasks,
                  element: PruneMasks) -> dict[str, Any]:
        batch = getattr(run.calibration, "batch_size", None) or 32
        report = refit(run.model, structured, run.calibration, self.config.settings(batch))
        run.cut(structured)
        return {"refit": {"images": report.images, "fallbacks": len(report.fallbacks),
                          "ridges": [fit.ridge for fit in report.branches]}}
