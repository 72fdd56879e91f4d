"""The token-count axis of a latency table (issue 28): what token merging at `r` does to latency.

With ToMe's constant schedule at `r`, block b's attention sees `N - b*r` tokens and its MLP
`N - (b+1)*r` (`token_counts`), so a block's cost depends on where it sits. The table measures
every part (the fixed-cost-free block pieces of `table.py`) at a few token counts, from the fewest
the largest `r` on the grid reaches (the last block's MLP) up to the dense count, and interpolates
linearly between them; below or above them it refuses. A count is measured on a copy of the model
whose input gives that many tokens (one row of patches), so each piece is timed at exactly that
count. Merging's own work (matching, gathers, the proportional-attention bias) is measured per `r`
on the grid: the dense model merging at `r`, minus what the table predicts for its token counts.
"""

from __future__ import annotations

import bisect
import copy
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch.nn as nn

from ..errors import ConfigError
from ..models.merge_config import TokenMergeConfig
from ..models.token_merge import merge_tokens, token_counts

MERGE_POINTS = 4  # r values measured: evenly spaced up to the largest r the model's tokens allow
TOKEN_POINTS = 4  # token counts measured, the dense count and the fewest the largest r reaches among them


def model_tokens(model: nn.Module) -> tuple[int, int]:
    """(tokens entering the first block, prefix tokens) of a timm ViT at its input size."""
    return model.patch_embed.num_patches + model.num_prefix_tokens, model.num_prefix_tokens


def merge_counts(num_tokens: int, depth: int, prefix: int, r: int) -> list[tuple[int, int]]:
    """(attention tokens, MLP tokens) of each block merging `r` per block (constant schedule)."""
    return [(n, n - r) for n in token_counts(num_tokens, depth, TokenMergeConfig(r=r), prefix)]


def largest_r(num_tokens: int, depth: int, prefix: int) -> int:
    """The largest constant r every block can merge (at most half of its mergeable tokens)."""
    r = 0
    while r + 1 <= num_tokens:
        try:
            token_counts(num_tokens, depth, TokenMergeConfig(r=r + 1), prefix)
        except ConfigError:
            break
        r += 1
    return r


def token_grid(num_tokens: int, depth: int, prefix: int) -> tuple[list[int], list[int]]:
    """The r values a budget may choose and the token counts measured for them (ascending, the
    dense count last)."""
    top = largest_r(num_tokens, depth, prefix)
    if top == 0:
        raise ConfigError(f"the model's {num_tokens} tokens leave no room for token merging; "
                          "use budget axes heads,mlp")
    grid = sorted({max(1, round(top * i / MERGE_POINTS)) for i in range(1, MERGE_POINTS + 1)})
    fewest = min(t for _, t in merge_counts(num_tokens, depth, prefix, top))
    counts = sorted({round(fewest + (num_tokens - fewest) * i / (TOKEN_POINTS - 1)) for i in range(TOKEN_POINTS)})
    return grid, counts


def with_tokens(model: nn.Module, count: int) -> nn.Module:
    """A copy of `model` whose input gives `count` tokens: one row of `count - prefix` patches."""
    _, prefix = model_tokens(model)
    if count <= prefix:
        raise ConfigError(f"a token count of {count} leaves no patch beside the {prefix} prefix tokens")
    small = copy.deepcopy(model)
    height, width = small.patch_embed.patch_size
    small.set_input_size(img_size=(height, width * (count - prefix)))
    return small


def merging(model: nn.Module, r: int) -> nn.Module:
    """A copy of `model` merging `r` tokens per block (constant schedule, ToMe's defaults)."""
    return merge_tokens(copy.deepcopy(model), TokenMergeConfig(r=r))


def mlp_at(widths: Sequence[int], ms: Sequence[float], width: int) -> float:
    """One block's MLP branch at `width` neurons, linear between the measured `widths`."""
    if not 0 <= width <= widths[-1]:
        raise ConfigError(f"MLP width {width} is outside 0..{widths[-1]}")
    i = bisect.bisect_left(widths, width)
    if widths[i] == width:
        return ms[i]
    w0, w1 = widths[i - 1], widths[i]
    return ms[i - 1] + (ms[i] - ms[i - 1]) * (width - w0) / (w1 - w0)


@dataclass(frozen=True)
class TokenSlice:
    """The block pieces at one token count (see `LatencyTable`: base, heads 0..H, MLP widths)."""

    count: int
    base_ms: float
    head_ms: tuple[float, ...]
    mlp_ms: tuple[float, ...]

    def numbers(self) -> dict[str, list[float]]:
        return {"base_ms": [self.base_ms], "head_ms": list(self.head_ms), "mlp_ms": list(self.mlp_ms)}


@dataclass(frozen=True)
class TokenAxis:
    """The table at token counts below the dense one, and merging's own cost at each r measured."""

    dense_tokens: int
    prefix_tokens: int
    slices: tuple[TokenSlice, ...]   # ascending counts, all below `dense_tokens`
    merge_r: tuple[int, ...]         # r values measured, ascending
    merge_ms: tuple[float, ...]      # merging's own cost (all blocks) at each of them

    def __post_init__(self) -> None:
        counts = [s.count for s in self.slices]
        if not counts or counts != sorted(set(counts)) or counts[-1] >= self.dense_tokens or counts[0] <= 0:
            raise ConfigError("a token axis needs ascending token counts below the dense count")
        if not self.merge_r or list(self.merge_r) != sorted(set(self.merge_r)) or self.merge_r[0] < 1 \
                or len(self.merge_r) != len(self.merge_ms):
            raise ConfigError("a token axis needs ascending r values from 1, one merging cost each")

    @property
    def counts(self) -> list[int]:
        return [s.count for s in self.slices]

    def merge_cost(self, r: int) -> float:
        """Merging's own cost at `r`, linear between the r values measured (0 at r = 0)."""
        if not 0 <= r <= self.merge_r[-1]:
            raise ConfigError(f"the latency table measured token merging up to r={self.merge_r[-1]}, not r={r}")
        rs, ms = (0, *self.merge_r), (0.0, *self.merge_ms)
        i = bisect.bisect_left(rs, r)
        if rs[i] == r:
            return ms[i]
        return ms[i - 1] + (ms[i] - ms[i - 1]) * (r - rs[i - 1]) / (rs[i] - rs[i - 1])

    def block_tokens(self, depth: int, r: int) -> list[tuple[int, int]]:
        """(attention, MLP) tokens of each block at `r`, refused beyond the counts measured."""
        tokens = merge_counts(self.dense_tokens, depth, self.prefix_tokens, r)
        if tokens[-1][1] < self.slices[0].count:
            raise ConfigError(f"r={r} leaves {tokens[-1][1]} tokens, fewer than the {self.slices[0].count} "
                              "the latency table measured")
        return tokens

    def interpolate(self, part: Callable[[Any], float], dense: Any, count: float) -> float:
        """`part` of the slices (and of `dense`, the table at the dense count) at `count` tokens."""
        rows = [*self.slices, dense]
        counts = [*self.counts, self.dense_tokens]
        if not counts[0] <= count <= counts[-1]:
            raise ConfigError(f"{count:g} tokens are outside the {counts[0]}..{counts[-1]} the latency table measured")
        i = bisect.bisect_left(counts, count)
        if counts[i] == count:
            return part(rows[i])
        c0, c1 = counts[i - 1], counts[i]
        v0, v1 = part(rows[i - 1]), part(rows[i])
        return v0 + (v1 - v0) * (count - c0) / (c1 - c0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "slices": [{**asdict(s), "head_ms": list(s.head_ms), "mlp_ms": list(s.mlp_ms)}
                                           for s in self.slices],
                "merge_r": list(self.merge_r), "merge_ms": list(self.merge_ms)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenAxis":
        slices = tuple(TokenSlice(int(s["count"]), float(s["base_ms"]), tuple(float(v) for v in s["head_ms"]),
                                  tuple(float(v) for v in s["mlp_ms"])) for s in d["slices"])
        return cls(int(d["dense_tokens"]), int(d["prefix_tokens"]), slices, tuple(int(r) for r in d["merge_r"]),
                   tuple(float(v) for v in d["merge_ms"]))


def fewer_never_slower(slices: Sequence[TokenSlice], dense: TokenSlice) -> tuple[TokenSlice, ...]:
    """Each slice's numbers capped by those of the next larger count: fewer tokens never take more
    time, and noise that says otherwise would let the allocator buy time by keeping tokens."""
    out, above = [], dense
    for s in reversed(slices):
        above = TokenSlice(s.count, min(s.base_ms, above.base_ms),
                           tuple(min(a, b) for a, b in zip(s.head_ms, above.head_ms)),
                           tuple(min(a, b) for a, b in zip(s.mlp_ms, above.mlp_ms)))
        out.append(above)
    return tuple(reversed(out))
