"""Which heads / neurons to keep, given their scores: per layer or across layers.

Rules, stated once:
- layer-wise keeps `max(min_keep, floor(n * (1 - ratio)))` units of a block with `n` units
  (ratio 0.3 keeps 2 of 3 heads and 268 of 384 neurons);
- global keeps `max(sum of min_keeps, floor(N * (1 - ratio)))` units of all `N` together: each
  block first keeps its `min_keep` best, the rest go to the best per-layer-normalised scores
  (score / mean score of its block, so layers compete fairly), or to the best scores as they are
  where the criterion's scores share one scale in every block (`one_scale`: Fisher);
- `round_to` then rounds every block's count up to a multiple (capped at `n`), taking the
  block's next-best units, so hardware-friendly widths never prune more than asked.
Ties keep the lower index.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..validate import integer

SELECTION_MODES = ("layer-wise", "global")


def keep_count(n: int, ratio: float, min_keep: int) -> int:
    # The epsilon keeps floor(10 * 0.7) at 7 despite 0.7 not being exact in binary.
    return min(n, max(min_keep, math.floor(n * (1.0 - ratio) + 1e-9)))


def round_up(k: int, n: int, round_to: int) -> int:
    if round_to <= 1 or k == 0:
        return k
    return min(n, math.ceil(k / round_to) * round_to)


def check_round_to(round_to: int, widths: list[int]) -> int:
    """A multiple wider than every MLP would keep all neurons whatever the ratio: refused."""
    widest = max([w for w in widths if w] or [1])
    return integer("round_to", round_to, 1, widest, note="at most the MLP width")


def _best(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.argsort(-scores.double(), stable=True)
    return order[:k]


def select_units(scores: list[torch.Tensor | None], ratio: float, mode: str = "layer-wise",
                 min_keep: int = 1, round_to: int = 1, one_scale: bool = False) -> list[torch.Tensor | None]:
    """Sorted indices of the units to keep in each block (None where a block has no such units)."""
    if mode not in SELECTION_MODES:
        raise ConfigError(f"unknown selection mode {mode!r}; choose one of: {', '.join(SELECTION_MODES)}")
    if min_keep < 0:
        raise ConfigError(f"min_keep must be >= 0, got {min_keep}")
    check_round_to(round_to, [s.numel() for s in scores if s is not None])
    if mode == "layer-wise":
        counts = [None if s is None else keep_count(s.numel(), ratio, min_keep) for s in scores]
    else:
        counts = _global_counts(scores, ratio, min_keep, one_scale)
    kept: list[torch.Tensor | None] = []
    for s, k in zip(scores, counts):
        if s is None:
            kept.append(None)
            continue
        k = round_up(k, s.numel(), round_to)
        kept.append(torch.sort(_best(s, k)).values)
    return kept


def _global_counts(scores: list[torch.Tensor | None], ratio: float, min_keep: int,
                   one_scale: bool) -> list[int | None]:
    sizes = [0 if s is None else s.numel() for s in scores]
    reserved = [min(min_keep, n) for n in sizes]
    total_keep = max(sum(reserved), math.floor(sum(sizes) * (1.0 - ratio) + 1e-9))
    candidates = []
    for b, s in enumerate(scores):
        if s is None:
            continue
        mean = 1.0 if one_scale else s.double().mean()
        normalised = s.double() / mean if mean > 0 else torch.zeros_like(s, dtype=torch.float64)
        for rank, idx in enumerate(_best(s, s.numel()).tolist()):
            if rank >= reserved[b]:
                candidates.append((-float(normalised[idx]), b, idx))
    candidates.sort()
    counts = list(reserved)
    for _, b, _ in candidates[:max(0, total_keep - sum(reserved))]:
        counts[b] += 1
    return [None if s is None else c for s, c in zip(scores, counts)]
