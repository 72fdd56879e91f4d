"""The one timing loop: runners warmed up, then timed in alternating rounds (A B A B ...), so drift
of a shared machine hits them alike. The benchmark, the latency table and the export optimiser's
check time pairs through `measure_pair`; deploy's choice times one runner at a time (`median_ms`)
and interleaves the candidates itself.

The number of rounds is capped by a time budget (estimated from the last warm-up run) but never
below `min_rounds`.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

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


def measure_rounds(runners: Sequence[Runner], config: Rounds) -> list[list[list[float]]]:
    """Warm up every runner, then time them in alternating rounds: [runner][round][run] ms."""
    last = [0.0] * len(runners)
    for _ in range(config.warmup):
        for i, run in enumerate(runners):
            last[i] = time_ms(run)
    per_round_s = sum(last) * config.runs_per_round / 1000.0
    rounds = plan_rounds(config, per_round_s if config.warmup else None)
    times: list[list[list[float]]] = [[] for _ in runners]
    for _ in range(rounds):
        for i, run in enumerate(runners):
            times[i].append([time_ms(run) for _ in range(config.runs_per_round)])
    return times


def measure_pair(first: Runner, second: Runner, batch: int, config: Rounds,
                 order: list[tuple[str, int]]) -> tuple[list[list[float]], list[list[float]]]:
    """Warm up both, then time them in alternating rounds ([round][run] ms each); appends the run
    order to `order` ("dense" for the first runner, "compact" for the second)."""
    first_ms, second_ms = measure_rounds([first, second], config)
    order.extend([("dense", batch), ("compact", batch)] * len(first_ms))
    return first_ms, second_ms


def median_pair(first: Runner, second: Runner, config: Rounds) -> tuple[float, float]:
    """Median ms per run of the two runners, timed by `measure_pair`."""
    first_ms, second_ms = measure_rounds([first, second], config)
    return statistics.median(t for r in first_ms for t in r), statistics.median(t for r in second_ms for t in r)


def median_ms(run: Runner, config: Rounds) -> float:
    """Median ms per run of one runner, timed by the same loop."""
    (times,) = measure_rounds([run], config)
    return statistics.median(t for r in times for t in r)
