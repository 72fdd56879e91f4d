"""The one timing loop: two runners warmed up, then timed in alternating rounds (A B A B ...), so
drift of a shared machine hits both alike. The benchmark, the latency table and the export
optimiser's check all time through `measure_pair`.

The number of rounds is capped by a time budget (estimated from the last warm-up run) but never
below `min_rounds`.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Protocol

Runner = Callable[[], object]


class Rounds(Protocol):
    """How a pair is timed (a `BenchConfig` and a `Timing` both say it)."""

    warmup: int
    rounds: int
    runs_per_round: int
    min_rounds: int
    time_budget_s: float | None


@dataclass(frozen=True)
class Timing:
    """Rounds of the timing loop for one pair: `rounds`, capped by `time_budget_s` (both runners
    together), never under `min_rounds`."""

    warmup: int = 3
    rounds: int = 20
    runs_per_round: int = 3
    min_rounds: int = 5
    time_budget_s: float | None = 60.0


def time_ms(run: Runner) -> float:
    start = time.perf_counter_ns()
    run()
    return (time.perf_counter_ns() - start) / 1e6


def plan_rounds(config: Rounds, seconds_per_round: float | None) -> int:
    """Rounds to time: `config.rounds`, fewer if the time budget says so, never under min_rounds."""
    if config.time_budget_s is None or not seconds_per_round:
        return config.rounds
    fit = math.floor(config.time_budget_s / seconds_per_round)
    return max(min(config.min_rounds, config.rounds), min(config.rounds, fit))


def measure_pair(first: Runner, second: Runner, batch: int, config: Rounds,
                 order: list[tuple[str, int]]) -> tuple[list[list[float]], list[list[float]]]:
    """Warm up both, then time them in alternating rounds ([round][run] ms each); appends the run
    order to `order` ("dense" for the first runner, "compact" for the second)."""
    last = {"dense": 0.0, "compact": 0.0}
    for _ in range(config.warmup):
        last["dense"] = time_ms(first)
        last["compact"] = time_ms(second)
    per_round_s = (last["dense"] + last["compact"]) * config.runs_per_round / 1000.0
    rounds = plan_rounds(config, per_round_s if config.warmup else None)
    first_ms, second_ms = [], []
    for _ in range(rounds):
        first_ms.append([time_ms(first) for _ in range(config.runs_per_round)])
        order.append(("dense", batch))
        second_ms.append([time_ms(second) for _ in range(config.runs_per_round)])
        order.append(("compact", batch))
    return first_ms, second_ms


def median_pair(first: Runner, second: Runner, config: Rounds) -> tuple[float, float]:
    """Median ms per run of the two runners, timed by `measure_pair`."""
    first_ms, second_ms = measure_pair(first, second, 0, config, [])
    return (statistics.median(t for r in first_ms for t in r), statistics.median(t for r in second_ms for t in r))
