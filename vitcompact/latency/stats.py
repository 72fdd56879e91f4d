"""Latency statistics: percentiles of one model's timings and the dense/compact speed-up interval.

The speed-up is the ratio of medians, dense p50 / compact p50, over all timed runs. Its confidence
interval is a paired bootstrap over rounds: each resample draws rounds with replacement, keeps the
dense and compact timings of the same rounds together (so slow phases of a shared machine hit both
sides), and recomputes the ratio of medians; the interval is the percentile interval of those
ratios. The generator is seeded, so the same timings give the same interval.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from ..errors import ConfigError


@dataclass
class LatencyStats:
    """Latency of one model at one batch size, in milliseconds per batch."""

    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    runs: int
    throughput: float  # images per second at the median latency

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SpeedUp:
    """dense p50 / compact p50 with its bootstrap interval at `level` (e.g. 0.95)."""

    value: float
    low: float
    high: float
    level: float

    def to_dict(self) -> dict:
        return asdict(self)


def latency_stats(times_ms: Sequence[float], batch_size: int) -> LatencyStats:
    """Percentiles (linear interpolation), mean and sample std of timings in milliseconds."""
    t = np.asarray(times_ms, dtype=np.float64)
    if t.size == 0:
        raise ConfigError("no timed runs to summarise; use at least one round")
    p50, p90, p99 = np.percentile(t, [50, 90, 99])
    std = float(t.std(ddof=1)) if t.size > 1 else 0.0
    return LatencyStats(float(p50), float(p90), float(p99), float(t.mean()), std, int(t.size),
                        batch_size * 1000.0 / float(p50))


def speedup_interval(dense_rounds: Sequence[Sequence[float]], compact_rounds: Sequence[Sequence[float]],
                     level: float = 0.95, resamples: int = 2000, seed: int = 0) -> SpeedUp:
    """Ratio of medians with a paired bootstrap interval over rounds (see the module docstring)."""
    if len(dense_rounds) != len(compact_rounds) or not dense_rounds:
        raise ConfigError("dense and compact need the same, non-zero number of rounds")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"confidence level must be between 0 and 1, got {level}")
    dense = np.asarray(dense_rounds, dtype=np.float64)      # [rounds, runs_per_round]
    compact = np.asarray(compact_rounds, dtype=np.float64)
    value = float(np.median(dense) / np.median(compact))
    rounds = dense.shape[0]
    if rounds == 1:
        return SpeedUp(value, value, value, level)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, rounds, size=(resamples, rounds))
    ratios = (np.median(dense[picks].reshape(resamples, -1), axis=1)
              / np.median(compact[picks].reshape(resamples, -1), axis=1))
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(ratios, [tail, 100.0 - tail])
    return SpeedUp(value, float(low), float(high), level)
