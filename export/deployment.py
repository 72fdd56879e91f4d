"""`deploy`: the fastest way to run a model on this machine whose accuracy stays within the guard.

The candidates: onnxruntime FP32 (the plain, verified ONNX export every other one starts from),
onnxruntime static INT8 (`to_int8`, calibrated on the training split) and, where OpenVINO is
installed, OpenVINO f32 / bf16 / INT8 IR files (`to_openvino`). Each is made and checked by its own
exporter (a refusal, or a runtime this machine lacks, stays in the table with the reason), its
validation top-1 is measured against the FP32 file's, and it is timed by the core's latency
backends (`ort-cpu`, `openvino`) and timing loop at every requested batch size, with the same
threads. `choice.choose` keeps the fastest within `max_accuracy_drop`, timing the fastest few again
in interleaved rounds. Its files go to `out` with deploy.json and deploy.md: the table of every
candidate, with the CPU and its instruction sets named.

The ranking latency is the geometric mean over the batch sizes of each one's median, so every batch
size weighs alike whatever its absolute time.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch.nn as nn

from vitcompact.accounting import count
from vitcompact.data import DataBundle
from vitcompact.errors import BackendUnavailableError, ConfigError
from vitcompact.io import ensure_dir, scratch, write_json, write_text
from vitcompact.latency.backends import Backend, BackendOptions, Loaded, Runner, make_backend
from vitcompact.latency.environment import environment, physical_cores
from vitcompact.latency.sources import BenchModel, module_label
from vitcompact.latency.timing import Timing, median_ms
from vitcompact.models import input_size
from vitcompact.validate import finite, in_range, integer, one_of, seed

from .choice import Candidate, Choice, Measurement, choose
from .files import data_file, publish
from .int8 import Int8Config, to_int8
from .onnx import ExportConfig, to_onnx
from .openvino import publish_ir, to_openvino
from .openvino_config import INT8_SOURCES, OpenVINOConfig
from .openvino_runtime import compile_ir, require_openvino, runner
from .verify import loader_top1, onnx_runner, ort_session

SCHEMA = "vitcompact.deploy/1"
REFERENCE = "onnxruntime fp32"
CANDIDATES = (REFERENCE, "onnxruntime int8", "openvino f32", "openvino bf16", "openvino int8")
BACKEND_OF = {"onnxruntime": "ort-cpu", "openvino": "openvino"}  # runtime -> the core's latency backend


@dataclass
class DeployConfig:
    """What `deploy` measures: the candidates, batch sizes, threads, the accuracy guard and the timing."""

    batch_sizes: tuple[int, ...] = (1, 8)
    threads: int | None = None              # None: every physical core available
    max_accuracy_drop: float | None = 1.0   # validation top-1 points below onnxruntime FP32; None: never refuse
    candidates: tuple[str, ...] = CANDIDATES
    time_budget_s: float = 5.0              # per candidate, batch size and timing: caps the rounds (at least 3)
    retime_top: int = 3                     # how many of the fastest are timed again, interleaved
    retime_rounds: int = 3
    int8_source: str = "auto"               # OpenVINO INT8: nncf, qdq or auto (the faster of the two)
    seed: int = 0                           # the timed input batch

    def __post_init__(self) -> None:
        if not self.batch_sizes:
            raise ConfigError("batch sizes must not be empty")
        for b in self.batch_sizes:
            integer("batch size", b, 1)
        if self.threads is not None:
            integer("threads", self.threads, 1)
        if self.max_accuracy_drop is not None and finite("max_accuracy_drop", self.max_accuracy_drop) < 0:
            raise ConfigError(f"max_accuracy_drop must be >= 0 points, got {self.max_accuracy_drop}")
        if not self.candidates or len(set(self.candidates)) != len(self.candidates):
            raise ConfigError(f"candidates must name each of {', '.join(CANDIDATES)} at most once, at least one")
        for name in self.candidates:
            one_of("deploy candidate", name, CANDIDATES)
        in_range("time_budget_s", self.time_budget_s, 0.0, low_open=True)
        integer("retime_top", self.retime_top, 1)
        integer("retime_rounds", self.retime_rounds, 0)
        one_of("INT8 source", self.int8_source, INT8_SOURCES)
        seed("seed", self.seed)

    @property
    def timing(self) -> Timing:
        return Timing(warmup=2, rounds=50, runs_per_round=1, min_rounds=3, time_budget_s=self.time_budget_s)


def geomean(values: Any) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def available_candidates(candidates: tuple[str, ...]) -> tuple[tuple[str, ...], str | None]:
    """`candidates` less the OpenVINO ones where OpenVINO is not installed, with the line saying so
    (None when nothing was left out, or when nothing else would be left)."""
    try:
        require_openvino()
    except BackendUnavailableError as e:
        kept = tuple(name for name in candidates if not name.startswith("openvino "))
        if kept and kept != candidates:
            return kept, f"{e}; choosing among {', '.join(kept)} only"
    return candidates, None


class Candidates:
    """Each candidate's files, accuracy and timings, made on first need (what `choose` calls).

    `verify=False` skips each exporter's checks: for a file made only to be timed (the bench's dense
    model, exported the way the compact one was chosen to run)."""

    def __init__(self, fp32: Path, stage: Path, data: DataBundle, config: DeployConfig, threads: int,
                 image_size: tuple[int, int, int], progress: Callable[[str], None], verify: bool = True):
        self.fp32, self.stage, self.data, self.config = fp32, stage, data, config
        self.threads, self.image_size, self.progress, self.verify = threads, image_size, progress, verify
        self.files: dict[str, list[Path]] = {}
        self.int8_sources: dict[str, str | None] = {}  # OpenVINO candidate -> the INT8 source it was made from
        self.backends: dict[str, Backend] = {}
        self.loaded: dict[str, Loaded] = {}
        self.runners: dict[tuple[str, int], Runner] = {}
        self.timings: dict[str, list[dict[int, float]]] = {}
        self.top1: dict[Path, float] = {}

    @classmethod
    def export(cls, model: nn.Module, stage: Path, data: DataBundle, config: DeployConfig, threads: int,
               progress: Callable[[str], None] | None = None, verify: bool = True) -> "Candidates":
        """The candidates of `model`, starting from its plain FP32 ONNX export in `stage`."""
        ensure_dir(stage)
        fp32 = to_onnx(model, stage / "model.onnx", ExportConfig(optimize="off", verify=verify)).path
        return cls(fp32, stage, data, config, threads, input_size(model), progress or (lambda line: None), verify)

    def made(self, c: Candidate) -> list[Path]:
        """The candidate's files (the one a runtime loads first), exported and checked by its exporter on
        first need (its refusal raises)."""
        if c.label in self.files:
            return self.files[c.label]
        if c.label == REFERENCE:
            self.files[c.label] = [self.fp32]
        elif c.runtime == "onnxruntime":
            path = to_int8(self.fp32, self.stage / "model.int8.onnx", Int8Config(mode="static", max_accuracy_drop=None),
                           self.data, verify=self.verify).path
            self.files[c.label] = [path, *([data_file(path)] if data_file(path).exists() else [])]
        else:
            result = to_openvino(self.fp32, self.stage / f"model.{c.precision}.xml",
                                 OpenVINOConfig(precision=c.precision, int8_source=self.config.int8_source,
                                                max_accuracy_drop=None, threads=self.threads, verify=self.verify),
                                 calibration=self.data)
            self.files[c.label] = [result.path, result.bin_path]
            self.int8_sources[c.label] = result.int8_source
        return self.files[c.label]

    def accuracy(self, c: Candidate) -> float:
        """Validation top-1 of the candidate's file on its runtime."""
        path = self.made(c)[0]
        if path not in self.top1:
            run = (onnx_runner(ort_session(path, self.threads)) if c.runtime == "onnxruntime"
                   else runner(compile_ir(path, threads=self.threads)))
            self.top1[path] = loader_top1(run, self.data.val)
            self.progress(f"{c.label}: validation top-1 {self.top1[path]:.4f}")
        return self.top1[path]

    def reference_accuracy(self) -> float:
        return self.accuracy(Candidate(*REFERENCE.split()))

    def backend(self, runtime: str) -> Backend:
        """The core's latency backend that times `runtime`'s files, with this choice's threads."""
        name = BACKEND_OF[runtime]
        if name not in self.backends:
            self.backends[name] = make_backend(name, BackendOptions(self.threads, seed=self.config.seed))
        return self.backends[name]

    def runner(self, c: Candidate, batch: int) -> Runner:
        """One inference of the candidate's file at `batch`, by its latency backend."""
        if c.label not in self.loaded:
            path = self.made(c)[0]
            backend = self.backend(c.runtime)
            self.loaded[c.label] = (backend.load_ir(path) if c.runtime == "openvino" else
                                    backend.load(BenchModel(c.label, self.image_size, None, onnx_path=path,
                                                            precision=c.precision)))
        if (c.label, batch) not in self.runners:
            self.runners[c.label, batch] = self.loaded[c.label](batch)
        return self.runners[c.label, batch]

    def time(self, c: Candidate) -> float:
        """Median ms at each batch size (recorded); the ranking latency is their geometric mean."""
        ms = {b: median_ms(self.runner(c, b), self.config.timing) for b in self.config.batch_sizes}
        self.timings.setdefault(c.label, []).append(ms)
        if len(self.timings[c.label]) == 1:
            self.progress(f"{c.label}: " + ", ".join(f"batch {b} {t:.2f} ms" for b, t in ms.items()))
        return geomean(ms.values())

    def choose(self) -> Choice:
        """The fastest of the configured candidates within the accuracy guard (`choice.choose`)."""
        config = self.config
        return choose([Candidate(*name.split()) for name in config.candidates], self.time, self.accuracy,
                      config.max_accuracy_drop, reference_accuracy=self.reference_accuracy(),
                      retime_top=config.retime_top, rounds=config.retime_rounds)

    def batch_ms(self) -> dict[str, dict[int, float]]:
        """Per candidate and batch size, the median of the re-timings where there are some (as
        `Measurement.latency_ms`), else the first timing."""
        out = {}
        for label, timings in self.timings.items():
            used = timings[1:] or timings
            out[label] = {b: statistics.median(t[b] for t in used) for b in self.config.batch_sizes}
        return out


def choice_record(choice: Choice, batch_ms: dict[str, dict[int, float]]) -> dict[str, Any]:
    """`choice.to_dict()` with each candidate's median ms per batch size (what deploy.json and the
    bench's JSON record)."""
    record = choice.to_dict()
    for c in record["candidates"]:
        c["batch_ms"] = batch_ms.get(f"{c['runtime']} {c['precision']}")
    return record


@dataclass
class DeployResult:
    """The chosen candidate, its files in `out`, and the measurements of every candidate."""

    out: Path
    files: list[Path]
    choice: Choice
    batch_ms: dict[str, dict[int, float]]   # candidate label -> batch size -> median ms
    config: DeployConfig
    threads: int
    model: dict[str, Any]
    environment: dict[str, Any]
    seconds: float = 0.0

    @property
    def chosen(self) -> str:
        return self.choice.chosen.candidate.label

    def speedup(self, label: str, batch: int) -> float | None:
        """`label`'s speed-up over onnxruntime FP32 at `batch`, where both were timed."""
        return _speedup(self.batch_ms, label, batch)

    def to_dict(self) -> dict[str, Any]:
        choice = choice_record(self.choice, self.batch_ms)
        return {"schema": SCHEMA, "chosen": self.chosen, "files": [p.name for p in self.files], "model": self.model,
                "batch_sizes": list(self.config.batch_sizes), "threads": self.threads, **choice,
                "environment": self.environment, "seconds": round(self.seconds, 1)}

    def to_markdown(self) -> str:
        cpu = self.environment["cpu_features"]
        guard = self.config.max_accuracy_drop
        return "\n".join([
            f"# Deployment of {self.model['label']}", "",
            f"Chosen: **{self.chosen}** ({', '.join(p.name for p in self.files)}), the fastest of "
            f"{len(self.choice.table)} candidates "
            + ("(no accuracy guard)." if guard is None else f"within {guard:g} points of validation top-1 of "
               f"onnxruntime FP32 ({self.choice.reference_accuracy:.4f})."),
            f"CPU: {cpu['model']} ({cpu['best_isa']}; AMX {_yes(cpu['amx'])}, AVX-512 BF16 {_yes(cpu['avx512_bf16'])}, "
            f"AVX-512 VNNI {_yes(cpu['avx512_vnni'])}), {self.threads} thread(s); onnxruntime "
            f"{self.environment['onnxruntime']}, OpenVINO {self.environment['openvino'] or 'not installed'}.",
            "Latency: median ms per batch, speed-up over onnxruntime FP32 at that batch; the ranking is their "
            f"geometric mean, the fastest {self.config.retime_top} timed again in {self.choice.rounds} "
            "interleaved rounds.", "",
            candidates_table(self.choice, self.batch_ms, self.config.batch_sizes)])


def candidates_table(choice: Choice, batch_ms: Mapping[str, Mapping[int, float]], batch_sizes: Sequence[int]) -> str:
    """Every candidate, fastest first: median ms and speed-up over onnxruntime FP32 at each batch
    size, the ranking latency, accuracy, drop and status (deploy.md's table)."""
    columns = {f"batch {b} ms (speed-up)": _cell(batch_ms, b) for b in batch_sizes}
    return choice.to_markdown(columns, latency="geo-mean ms")


def table_of(report: Mapping[str, Any]) -> str:
    """`candidates_table` of a deploy.json (`DeployResult.to_dict()`), e.g. in a pipeline's summary."""
    batch_ms = {f"{c['runtime']} {c['precision']}": {int(b): ms for b, ms in (c.get("batch_ms") or {}).items()}
                for c in report["candidates"]}
    return candidates_table(Choice.from_dict(report), batch_ms, report["batch_sizes"])


def _speedup(batch_ms: Mapping[str, Mapping[int, float]], label: str, batch: int) -> float | None:
    mine, base = batch_ms.get(label, {}).get(batch), batch_ms.get(REFERENCE, {}).get(batch)
    return base / mine if mine and base else None


def _cell(batch_ms: Mapping[str, Mapping[int, float]], batch: int) -> Callable[[Measurement], str]:
    def cell(m: Measurement) -> str:
        ms, speedup = batch_ms.get(m.candidate.label, {}).get(batch), _speedup(batch_ms, m.candidate.label, batch)
        return "-" if ms is None else f"{ms:.2f}" + (f" ({speedup:.2f}x)" if speedup else "")
    return cell


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _publish(files: list[Path], out: Path) -> list[Path]:
    """Move the chosen candidate's files into `out` (weights first), returning where they went."""
    ensure_dir(out)
    main = files[0]
    (publish_ir if main.suffix == ".xml" else publish)(main, out / main.name)
    return [out / f.name for f in files]


def deploy(model: nn.Module, out: str | os.PathLike, config: DeployConfig | None = None,
           data: DataBundle | None = None, progress: Callable[[str], None] | None = None) -> DeployResult:
    """Export `model` for every candidate runtime and precision, time each on this machine, and write
    the fastest one within the accuracy guard to the folder `out`, with deploy.json and deploy.md.

    `data` (`vc.load_data_for(model, source)`): its training split calibrates INT8, its validation
    split measures each candidate's top-1. `progress` receives a line per measurement. Raises
    AccuracyDropError when no candidate is within the guard; nothing is written then.
    """
    config = config or DeployConfig()
    if not isinstance(data, DataBundle):
        raise ConfigError("deploy measures each candidate's accuracy: pass the data (vc.load_data_for(model, source))")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give the folder to write the chosen model to")
    start, threads = time.perf_counter(), config.threads or physical_cores()
    ensure_dir(out.parent)
    with scratch(f".{out.name}.tmp-", out.parent) as stage:
        runs = Candidates.export(model, stage, data, config, threads, progress)
        choice = runs.choose()
        files = _publish(runs.made(choice.chosen.candidate), out)
    counted = count(model)
    described = {"label": module_label(model), "params": counted.params, "macs": counted.macs,
                 "input_size": list(input_size(model)), "validation_images": len(data.val.dataset)}
    settings = {"threads": threads, "backends": {name: b.settings() for name, b in runs.backends.items()}}
    result = DeployResult(out, files, choice, runs.batch_ms(), config, threads, described, environment(settings),
                          time.perf_counter() - start)
    write_json(out / "deploy.json", result.to_dict())
    write_text(out / "deploy.md", result.to_markdown())
    return result
