"""`BenchConfig(backend="auto")`: `vitcompact deploy`'s measured choice of runtime and precision, made
for the compact model, then dense and compact timed against each other the chosen way.

The compact model is the one a user ships, so its candidates are measured (`export.deployment`:
onnxruntime FP32 / static INT8, OpenVINO f32 / bf16 / INT8 where OpenVINO is installed), each
exported and checked by its exporter, its validation top-1 measured against its onnxruntime FP32
file and timed at the bench's batch sizes and threads; the fastest within the accuracy guard is
chosen. The dense model is then exported the same way (same exporter, calibration data and INT8
source; for timing only, so its exporter's checks are skipped), and the bench times the pair with
its interleaved loop on the chosen runtime, so the speed-up compares like with like.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch.nn as nn

from vitcompact.data import DataBundle
from vitcompact.errors import ConfigError
from vitcompact.export.choice import Candidate, Choice
from vitcompact.export.deployment import BACKEND_OF, Candidates, DeployConfig, available_candidates, choice_record
from vitcompact.io import scratch
from vitcompact.latency.backends import Runner
from vitcompact.latency.sources import BenchModel

AUTO = "auto"


@dataclass
class AutoChoice:
    """The compact model's measured choice, and both models' files made the chosen way."""

    dense: Candidates
    compact: Candidates
    choice: Choice
    note: str | None  # why some candidates were left out (OpenVINO not installed)

    @property
    def chosen(self) -> Candidate:
        return self.choice.chosen.candidate

    @property
    def backend(self) -> str:
        """The latency backend that runs the chosen candidate's files."""
        return BACKEND_OF[self.chosen.runtime]

    def runners(self, batch: int) -> tuple[Runner, Runner]:
        """Dense and compact, one inference each at `batch`, the chosen way."""
        return self.dense.runner(self.chosen, batch), self.compact.runner(self.chosen, batch)

    def settings(self) -> dict[str, Any]:
        """The chosen backend's settings, as the bench records a backend's."""
        return self.compact.backend(self.chosen.runtime).settings()

    def to_dict(self) -> dict[str, Any]:
        """The table of every candidate as deploy.json has it (`deployment.table_of` prints it)."""
        return {"chosen": self.chosen.label, "backend": self.backend, "note": self.note,
                "accuracy": "validation top-1 of each candidate's file on its own runtime",
                "batch_sizes": list(self.compact.config.batch_sizes), "threads": self.compact.threads,
                **choice_record(self.choice, self.compact.batch_ms())}


def deploy_config(batch_sizes: tuple[int, ...], threads: int, max_accuracy_drop: float | None,
                  time_budget_s: float | None, seed: int) -> DeployConfig:
    """The choice's settings from the bench's: its batch sizes and threads, the candidates this machine
    can run, and a timing budget per candidate no larger than the bench's."""
    budget = DeployConfig.time_budget_s if time_budget_s is None else min(DeployConfig.time_budget_s, time_budget_s)
    candidates, _ = available_candidates(DeployConfig.candidates)
    return DeployConfig(batch_sizes=batch_sizes, threads=threads, max_accuracy_drop=max_accuracy_drop,
                        candidates=candidates, time_budget_s=budget, seed=seed)


def auto_module(model: BenchModel) -> nn.Module:
    """The module backend auto exports its candidates from; an exported file is refused."""
    if model.module is None:
        raise ConfigError(f"{model.label}: backend auto exports every candidate from the model itself; give an "
                          "artifact directory, preset or timm name, not an exported file")
    return model.module


@contextlib.contextmanager
def auto_choice(dense: BenchModel, compact: BenchModel, config: DeployConfig, data: DataBundle | None,
                progress: Callable[[str], None] | None = None) -> Iterator[AutoChoice]:
    """Measure the compact model's candidates, choose, and make the dense model's file the chosen way;
    the files live in a scratch folder for the block. `data` (`vc.load_data_for(model, source)`):
    its training split calibrates INT8, its validation split measures each candidate's top-1."""
    dense_module, compact_module = auto_module(dense), auto_module(compact)
    if not isinstance(data, DataBundle):
        raise ConfigError("backend auto measures each candidate's accuracy, as deploy does: pass the data "
                          "(--data SOURCE; vc.load_data_for(model, source))")
    say = progress or (lambda line: None)
    _, note = available_candidates(DeployConfig.candidates)
    if note:
        say(f"backend auto: {note}")
    with scratch("vitcompact-auto-") as stage:
        compact_runs = Candidates.export(compact_module, stage / "compact", data, config, config.threads, say)
        choice = compact_runs.choose()
        chosen = choice.chosen.candidate
        say(f"backend auto chose {chosen.label} for {compact.label}; making the dense model's file the same way")
        int8_source = compact_runs.int8_sources.get(chosen.label) or config.int8_source
        dense_runs = Candidates.export(dense_module, stage / "dense", data,
                                       dataclasses.replace(config, int8_source=int8_source), config.threads,
                                       verify=False)
        dense_runs.made(chosen)
        yield AutoChoice(dense_runs, compact_runs, choice, note)
