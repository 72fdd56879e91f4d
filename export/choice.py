"""The measured choice of runtime and precision: the fastest candidate within the accuracy guard.

Each candidate (a runtime and a precision, e.g. onnxruntime fp32, OpenVINO bf16) is measured for
accuracy and timed once; those within `max_accuracy_drop` points of the reference accuracy are
ranked by that first timing, and the fastest few are timed again in interleaved rounds (A B C A B C
..., the order rotating every round) so that drift of a shared machine hits them alike. The choice is
the lowest median of those re-timings. Every candidate stays in the table, with why it was not
chosen: slower, over the accuracy guard, refused by its own checks, or not available here.

The callables say what "time" and "accuracy" mean (batch sizes, a data split); this module only
ranks, so `vitcompact deploy` (`deployment.py`) and the INT8 source choice of the OpenVINO export
share it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from vitcompact.errors import ArtifactError, BackendUnavailableError, ConfigError, VitCompactError
from vitcompact.validate import finite, integer

from .int8 import AccuracyDropError

# How far from the fastest a re-timed candidate may be and still count as a tie, for the report.
TIE = 0.03


@dataclass(frozen=True)
class Candidate:
    """One way to run the model: a runtime and a precision; `artifact` is what the callables need
    to time and score it (a file, a compiled model), never compared."""

    runtime: str
    precision: str
    artifact: Any = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        return f"{self.runtime} {self.precision}"


@dataclass
class Measurement:
    """What was measured of one candidate and what became of it."""

    candidate: Candidate
    status: str = "measured"            # chosen, slower, over the accuracy guard, refused, unavailable
    reason: str = ""
    accuracy: float | None = None       # top-1 fraction (or agreement with the reference)
    drop_points: float | None = None    # reference accuracy minus this one, in points
    first_ms: float | None = None       # the ranking timing
    retimed_ms: list[float] = field(default_factory=list)  # interleaved re-timings

    @property
    def latency_ms(self) -> float | None:
        """The median of the re-timings where there are some, else the first timing."""
        return statistics.median(self.retimed_ms) if self.retimed_ms else self.first_ms

    def to_dict(self) -> dict:
        return {"runtime": self.candidate.runtime, "precision": self.candidate.precision,
                "status": self.status, "reason": self.reason, "accuracy": self.accuracy,
                "drop_points": None if self.drop_points is None else round(self.drop_points, 4),
                "latency_ms": self.latency_ms, "first_ms": self.first_ms, "retimed_ms": list(self.retimed_ms)}

    @classmethod
    def from_dict(cls, values: dict) -> "Measurement":
        """A measurement as `to_dict` wrote it (its latency follows from the timings)."""
        return cls(Candidate(values["runtime"], values["precision"]), values["status"], values.get("reason", ""),
                   values.get("accuracy"), values.get("drop_points"), values.get("first_ms"),
                   list(values.get("retimed_ms") or []))


@dataclass
class Choice:
    """The chosen candidate and the table of all of them, fastest first."""

    chosen: Measurement
    table: list[Measurement]
    reference_accuracy: float | None
    max_accuracy_drop: float | None
    rounds: int

    def speedup_over(self, label: str) -> float | None:
        """The chosen candidate's speed-up over the candidate called `label`, from re-timings or first timings."""
        other = next((m for m in self.table if m.candidate.label == label), None)
        if other is None or other.latency_ms is None or not self.chosen.latency_ms:
            return None
        return other.latency_ms / self.chosen.latency_ms

    def to_dict(self) -> dict:
        return {"chosen": self.chosen.candidate.label, "reference_accuracy": self.reference_accuracy,
                "max_accuracy_drop": self.max_accuracy_drop, "retime_rounds": self.rounds,
                "candidates": [m.to_dict() for m in self.table]}

    @classmethod
    def from_dict(cls, values: dict) -> "Choice":
        """A choice as `to_dict` wrote it (deploy.json holds one)."""
        table = [Measurement.from_dict(m) for m in values["candidates"]]
        chosen = next(m for m in table if m.candidate.label == values["chosen"])
        return cls(chosen, table, values.get("reference_accuracy"), values.get("max_accuracy_drop"),
                   values.get("retime_rounds", 0))

    def to_markdown(self, columns: dict[str, Callable[[Measurement], str]] | None = None,
                    latency: str = "latency ms") -> str:
        """The table, fastest first; `columns` (header -> cell of a measurement) go after the precision,
        `latency` names the column of the ranking latency."""
        columns = columns or {}
        lines = ["| runtime | precision | " + "".join(f"{c} | " for c in columns)
                 + f"{latency} | accuracy | drop (points) | status |",
                 "|---|---|" + "---:|" * (len(columns) + 3) + "---|"]
        for m in self.table:
            cells = [m.candidate.runtime, m.candidate.precision, *(cell(m) for cell in columns.values()),
                     _number(m.latency_ms, ".2f"), _number(m.accuracy, ".4f"), _number(m.drop_points, ".2f"),
                     m.status + (f": {m.reason}" if m.reason else "")]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _measure(candidate: Candidate, time_fn: Callable[[Candidate], float],
             accuracy_fn: Callable[[Candidate], float]) -> Measurement:
    """Accuracy, then one timing; a candidate this machine cannot run or whose own checks refuse
    it stays in the table with the reason, one line."""
    m = Measurement(candidate)
    try:
        m.accuracy = accuracy_fn(candidate)
        m.first_ms = time_fn(candidate)
    except BackendUnavailableError as e:
        m.status, m.reason = "unavailable", str(e).splitlines()[0]
    except VitCompactError as e:
        m.status, m.reason = "refused", str(e).splitlines()[0]
    return m


def _retime(ranked: list[Measurement], time_fn: Callable[[Candidate], float], rounds: int) -> None:
    """Time `ranked` again in `rounds` interleaved rounds, rotating who goes first."""
    for r in range(rounds):
        shift = r % len(ranked)
        for m in ranked[shift:] + ranked[:shift]:
            m.retimed_ms.append(time_fn(m.candidate))


def choose(candidates: Sequence[Candidate], time_fn: Callable[[Candidate], float],
           accuracy_fn: Callable[[Candidate], float], max_accuracy_drop: float | None = 1.0, *,
           reference_accuracy: float | None = None, retime_top: int = 3, rounds: int = 5) -> Choice:
    """The fastest of `candidates` whose accuracy is within `max_accuracy_drop` points of the
    reference, with the table of all of them.

    `time_fn(candidate)` returns one latency in milliseconds (lower is better; the core's
    `vitcompact.latency.timing.median_ms` makes one), `accuracy_fn(candidate)` a top-1 fraction. The reference accuracy is `reference_accuracy`, else
    the first candidate's (put the FP32 baseline first). `max_accuracy_drop=None` measures without
    refusing. Either callable may raise `BackendUnavailableError` (the candidate is skipped as
    unavailable) or another vitcompact error (refused). Raises `AccuracyDropError` when no candidate is
    within the guard, `BackendUnavailableError` when none can run here and `ArtifactError` when every
    one that runs was refused.
    """
    if not candidates:
        raise ConfigError("no candidates to choose from")
    if max_accuracy_drop is not None and finite("max_accuracy_drop", max_accuracy_drop) < 0:
        raise ConfigError(f"max_accuracy_drop must be >= 0 points, got {max_accuracy_drop}")
    integer("retime_top", retime_top, 1)
    integer("rounds", rounds, 0)
    table = [_measure(c, time_fn, accuracy_fn) for c in candidates]
    measured = [m for m in table if m.status == "measured"]
    if not measured:
        reasons = "; ".join(f"{m.candidate.label}: {m.reason}" for m in table)
        if all(m.status == "unavailable" for m in table):
            raise BackendUnavailableError(f"none of the candidates can run here ({reasons})")
        raise ArtifactError(f"no candidate passed its checks ({reasons})")
    if reference_accuracy is None and table[0].status != "measured":
        raise ConfigError(f"the reference candidate {table[0].candidate.label} could not be measured "
                          f"({table[0].reason}); pass reference_accuracy")
    reference = reference_accuracy if reference_accuracy is not None else table[0].accuracy
    for m in measured:
        m.drop_points = (reference - m.accuracy) * 100.0
        if max_accuracy_drop is not None and m.drop_points > max_accuracy_drop:
            m.status = "over the accuracy guard"
            m.reason = f"loses {m.drop_points:.2f} points, more than {max_accuracy_drop:g}"
    within = sorted((m for m in measured if m.status == "measured"), key=lambda m: m.first_ms)
    if not within:
        raise AccuracyDropError(f"every candidate loses more than {max_accuracy_drop:g} points of accuracy: "
                                + ", ".join(f"{m.candidate.label} {m.drop_points:.2f}" for m in measured))
    top = within[:retime_top]
    if len(top) > 1:
        _retime(top, time_fn, rounds)
    chosen = min(top, key=lambda m: m.latency_ms)
    for m in within:
        m.status = "slower"
        if m is not chosen and m.latency_ms is not None:
            m.reason = f"{m.latency_ms / chosen.latency_ms:.2f}x the chosen latency"
            if m in top and m.latency_ms <= chosen.latency_ms * (1 + TIE):
                m.reason += f" (a tie: within {TIE:.0%})"
    chosen.status, chosen.reason = "chosen", ""
    table.sort(key=lambda m: (m.latency_ms is None, m.latency_ms or 0.0))
    return Choice(chosen, table, reference, max_accuracy_drop, rounds if len(top) > 1 else 0)
