"""Importance criteria for heads and neurons: one registry, one signature.

A criterion takes the model (already masked: scores come from the current masked weights, so a
pruned unit cannot come back through stale values), the element masks and a `ScoreContext`, and
returns, per block, one score per head and one per neuron (None for a removed branch). Higher
means more important. Each registered criterion declares `needs_data`: whether it scores units on
calibration batches, so that a caller fetches those batches only for the criteria that use them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..models.adapter import unit_weights
from ..registry import Registry
from ..masks import PruneMasks, per_head, per_neuron
from .refit_scores import BlockScores, contribution_scores, fisher_scores, reconstruction_scores

Criterion = Callable[[nn.Module, PruneMasks, "ScoreContext"], list[BlockScores]]

CRITERIA: Registry[Criterion] = Registry("criterion")


def criterion(name: str, needs_data: bool = False, one_scale: bool = False) -> Callable[[Criterion], Criterion]:
    """Register a criterion under `name`, declaring whether it needs calibration data and whether
    its scores share one scale in every block (so global selection ranks them as they are)."""
    def add(fn: Criterion) -> Criterion:
        fn.needs_data = needs_data
        fn.one_scale = one_scale
        return CRITERIA.register(name)(fn)
    return add


def resolve(criteria: str | Criterion) -> Criterion:
    """The named criterion, or the callable itself."""
    return CRITERIA.get(criteria) if isinstance(criteria, str) else criteria


def on_one_scale(criteria: str | Criterion) -> bool:
    """Whether the criterion's scores compare across blocks as they are (a callable that does not
    say so is normalised per block, as the built-in weight and activation criteria are)."""
    return bool(getattr(resolve(criteria), "one_scale", False))


@dataclass
class ScoreContext:
    """Calibration data for data-driven criteria: an iterable of (images, labels) batches."""

    data: Iterable[Any] | None = None
    num_batches: int = 8
    device: torch.device | str | None = None

    def batches(self, criterion: str) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        if self.data is None:
            raise ConfigError(f"criterion {criterion!r} needs calibration data: pass data= "
                              "(an iterable of (images, labels) batches)")
        out = []
        for batch in itertools.islice(self.data, self.num_batches):
            x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
            out.append((x, y))
        if not out:
            raise ConfigError(f"criterion {criterion!r} got empty calibration data")
        return out


def _unit_sums(masks: PruneMasks, tensors: dict[str, torch.Tensor]) -> list[BlockScores]:
    """Sum per-weight values over each unit's incoming and outgoing weights."""
    scores: list[BlockScores] = []
    for block in masks.layout.blocks:
        head = neuron = None
        if block.num_heads:
            q, p = f"{block.name}.attn.qkv.weight", f"{block.name}.attn.proj.weight"
            head = per_head(q, tensors[q], block) + per_head(p, tensors[p], block)
        if block.hidden:
            f1, f2 = f"{block.name}.mlp.fc1.weight", f"{block.name}.mlp.fc2.weight"
            neuron = per_neuron(f1, tensors[f1]) + per_neuron(f2, tensors[f2])
        scores.append((head, neuron))
    return scores


def _masked_weights(model: nn.Module, masks: PruneMasks) -> dict[str, torch.Tensor]:
    out = {}
    for block in masks.layout.blocks:
        for name, p in unit_weights(model, block).items():
            out[name] = p.detach().float() * masks[name].to(p.device)
    return out


@criterion("remain")
def remain(model: nn.Module, masks: PruneMasks, ctx: ScoreContext) -> list[BlockScores]:
    """Number of surviving weights of the unit."""
    return _unit_sums(masks, {n: m.float() for n, m in masks.masks.items()})


@criterion("magnitude")
def magnitude(model: nn.Module, masks: PruneMasks, ctx: ScoreContext) -> list[BlockScores]:
    """L1 norm of the unit's masked weights."""
    return _unit_sums(masks, {n: w.abs() for n, w in _masked_weights(model, masks).items()})


def _masked_copy(model: nn.Module, masks: PruneMasks, device) -> nn.Module:
    import copy
    scoring = copy.deepcopy(model)
    if device is not None:
        scoring.to(device)
    masks.apply_(scoring)
    return scoring.eval()


def _activation_scores(model: nn.Module, masks: PruneMasks, ctx: ScoreContext, name: str,
                       reduce: Callable[[torch.Tensor], torch.Tensor], finish) -> list[BlockScores]:
    """Accumulate reduce(|output|) per head over qkv outputs and per neuron over fc1 outputs."""
    scoring = _masked_copy(model, masks, ctx.device)
    device = next(scoring.parameters()).device
    sums: dict[tuple[int, str], torch.Tensor] = {}
    counts: dict[tuple[int, str], int] = {}
    hooks = []

    def add(key, value, n):
        sums[key] = sums.get(key, 0) + value
        counts[key] = counts.get(key, 0) + n

    for block in masks.layout.blocks:
        b = scoring.blocks[block.index]
        if block.num_heads:
            def on_qkv(mod, inp, out, block=block):
                o = out.detach().float().reshape(*out.shape[:-1], 3, block.num_heads, block.head_dim)
                o = o.movedim(-2, 0).reshape(block.num_heads, -1)
                add((block.index, "head"), reduce(o).sum(dim=1), o.shape[1])
            hooks.append(b.attn.qkv.register_forward_hook(on_qkv))
        if block.hidden:
            def on_fc1(mod, inp, out, block=block):
                o = out.detach().float().reshape(-1, out.shape[-1]).t()
                add((block.index, "neuron"), reduce(o).sum(dim=1), o.shape[1])
            hooks.append(b.mlp.fc1.register_forward_hook(on_fc1))
    try:
        with torch.no_grad():
            for x, _ in ctx.batches(name):
                scoring(x.to(device))
    finally:
        for h in hooks:
            h.remove()
    scores: list[BlockScores] = []
    for block in masks.layout.blocks:
        head = finish(sums[(block.index, "head")] / counts[(block.index, "head")]) if block.num_heads else None
        neuron = finish(sums[(block.index, "neuron")] / counts[(block.index, "neuron")]) if block.hidden else None
        scores.append((None if head is None else head.cpu(), None if neuron is None else neuron.cpu()))
    return scores


@criterion("l1", needs_data=True)
def l1(model: nn.Module, masks: PruneMasks, ctx: ScoreContext) -> list[BlockScores]:
    """Mean |activation| of the unit's qkv outputs (heads) or pre-activation fc1 output (neurons)."""
    return _activation_scores(model, masks, ctx, "l1", torch.abs, lambda t: t)


@criterion("l2", needs_data=True)
def l2(model: nn.Module, masks: PruneMasks, ctx: ScoreContext) -> list[BlockScores]:
    """RMS activation of the same outputs as `l1`."""
    return _activation_scores(model, masks, ctx, "l2", torch.square, torch.sqrt)


@criterion("saliency", needs_data=True)
def saliency(model: nn.Module, masks: PruneMasks, ctx: ScoreContext) -> list[BlockScores]:
    """First-order Taylor importance: sum over the unit's weights of |w * dL/dw|, over N batches."""
    scoring = _masked_copy(model, masks, ctx.device)
    device = next(scoring.parameters()).device
    weights = {n: p for n, p in scoring.named_parameters() if n in masks.masks}
    totals = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in weights.items()}
    for x, y in ctx.batches("saliency"):
        if y is None:
            raise ConfigError("criterion 'saliency' needs labelled calibration batches (images, labels)")
        scoring.zero_grad(set_to_none=True)
        logits = scoring(x.to(device))
        F.cross_entropy(logits, y.to(device)).backward()
        for n, p in weights.items():
            totals[n] += (p.detach().float() * p.grad.float()).abs()
    return _unit_sums(masks, {n: t.cpu() for n, t in totals.items()})


@criterion("activation", needs_data=True)
def activation(model: nn.Module, masks: PruneMasks, ctx: ScoreContext) -> list[BlockScores]:
    """What the unit adds to the residual stream: the variance of its output (a head's attention
    output, a neuron's activation) over the calibration tokens times the squared norm of its
    columns in proj / fc2 (LayerScale included), so that scores compare across blocks."""
    images = [x for x, _ in ctx.batches("activation")]
    return contribution_scores(_masked_copy(model, masks, ctx.device), masks.layout, images)


# One scale: each score estimates how much the loss grows without the unit, wherever the unit is.
# Ranked as they are, they took whole heads from the later blocks and none from the first of the
# Fashion-MNIST reference (0.3/0.3, refit: validation 89.30 % against 89.00 normalised per block;
# digits +0.4 / +0.6 / -0.1 points at 0.3 / 0.5 / 0.7; docs/results/refit-fashion.md).
@criterion("fisher", needs_data=True, one_scale=True)
def fisher(model: nn.Module, masks: PruneMasks, ctx: ScoreContext) -> list[BlockScores]:
    """Empirical Fisher of a mask on the unit's output, with the model's own top-1 predictions as
    labels (calibration labels are not needed): the squared per-image gradient, summed."""
    images = [x for x, _ in ctx.batches("fisher")]
    return fisher_scores(_masked_copy(model, masks, ctx.device), masks.layout, images)


@criterion("reconstruction", needs_data=True)
def reconstruction(model: nn.Module, masks: PruneMasks, ctx: ScoreContext) -> list[BlockScores]:
    """The growth of the output layer's least-squares error when the unit is removed and the other
    units' columns are refit (optimal brain surgeon by groups, on the calibration covariance)."""
    images = [x for x, _ in ctx.batches("reconstruction")]
    return reconstruction_scores(_masked_copy(model, masks, ctx.device), masks.layout, images)


def score_units(model: nn.Module, masks: PruneMasks, criteria: str | Criterion,
                ctx: ScoreContext | None = None) -> list[BlockScores]:
    """Scores per block with the named criterion, or with a callable of the criterion signature."""
    return resolve(criteria)(model, masks, ctx or ScoreContext())


# The registered criteria that score on calibration data, by name (read from their declarations).
DATA_DRIVEN = tuple(name for name in CRITERIA if CRITERIA.get(name).needs_data)
