"""Element-wise magnitude pruning over the qkv/proj/fc1/fc2 weights."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..validate import ratio
from ..masks import PruneMasks

MAGNITUDE_SCOPES = ("global", "layer-wise")


def _drop_smallest(scores: torch.Tensor, keep: torch.Tensor, rate: float) -> torch.Tensor:
    """Remove round(rate * survivors) of the surviving entries with the smallest scores."""
    flat_keep = keep.flatten().clone()
    survivors = flat_keep.nonzero().flatten()
    n_drop = int(round(rate * survivors.numel()))
    if n_drop:
        order = torch.argsort(scores.flatten()[survivors], stable=True)
        flat_keep[survivors[order[:n_drop]]] = False
    return flat_keep.view_as(keep)


@torch.no_grad()
def magnitude_prune(model: nn.Module, rate: float, masks: PruneMasks | None = None,
                    scope: str = "global") -> PruneMasks:
    """Remove `rate` of the still-surviving prunable weights with the smallest |w|.

    Only qkv, proj, fc1 and fc2 weights are candidates. Passing the previous `masks` makes calls
    compound: each removes `rate` of what survives. `scope="layer-wise"` applies the rate to every
    weight tensor separately.
    """
    rate = ratio("rate", rate)
    if scope not in MAGNITUDE_SCOPES:
        raise ConfigError(f"unknown scope {scope!r}; choose one of: {', '.join(MAGNITUDE_SCOPES)}")
    masks = masks.clone() if masks is not None else PruneMasks.ones(model)
    masks.check_model(model)
    weights = {n: p for n, p in model.named_parameters() if n in masks.masks}
    names = masks.layout.weight_names()
    if scope == "layer-wise":
        for n in names:
            m = masks.masks[n]
            masks.masks[n] = _drop_smallest(weights[n].detach().abs().to(m.device), m, rate)
        return masks
    scores = torch.cat([weights[n].detach().abs().flatten().float().cpu() for n in names])
    keep = torch.cat([masks.masks[n].flatten().cpu() for n in names])
    keep = _drop_smallest(scores, keep, rate)
    offset = 0
    for n in names:
        m = masks.masks[n]
        masks.masks[n] = keep[offset:offset + m.numel()].view_as(m).to(m.device)
        offset += m.numel()
    return masks
