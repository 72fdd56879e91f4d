"""ONNX export of dense and compact timm ViTs: dynamic batch, metadata, verification, optimisation."""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn as nn

from vitcompact.errors import ConfigError, UnsupportedModelError
from vitcompact.models import input_size, vit_layout
from vitcompact.validate import in_range, integer, one_of

from .files import data_file, publish, staging
from .graph import GRAPHS, traced_as
from .metadata import model_metadata, raw_metadata, stamp
from .optimize import OPTIMIZE_MODES, OptimizeReport, optimize
from .verify import DEFAULT_ATOL, DEFAULT_BATCHES, ParityReport, verify_onnx

MIN_OPSET = 17
# Opset 20 has GELU as one op, which onnxruntime fuses with its bias (BiasGelu); measured 4 % faster
# than opset 18 on ViTs at batch 1 and 8 (onnxruntime 1.32 CPU, README "Export").
DEFAULT_OPSET = 20
# The highest opset checked with this torch exporter and onnxruntime (export, load, parity).
MAX_OPSET = 25
EXPORT_BATCH = 2  # deliberately not a verification batch size, so a fixed batch cannot pass


@dataclass
class ExportConfig:
    """How `to_onnx` exports. `external_data=None` moves weights to `<file>.data` only past 1 GiB."""

    opset: int = DEFAULT_OPSET
    input_name: str = "images"
    output_name: str = "logits"
    max_batch: int = 4096
    verify: bool = True
    batch_sizes: tuple[int, ...] = DEFAULT_BATCHES
    atol: float = DEFAULT_ATOL
    optimize: str = "auto"
    external_data: bool | None = None
    graph: str = "token-matrix"  # or "timm": the model's own (batch, tokens, width) forward

    def __post_init__(self) -> None:
        if not MIN_OPSET <= integer("opset", self.opset) <= MAX_OPSET:
            raise ConfigError(f"opset {self.opset} is not supported; use an opset from {MIN_OPSET} "
                              f"to {MAX_OPSET} (default {DEFAULT_OPSET})")
        one_of("graph", self.graph, GRAPHS)
        if self.optimize not in OPTIMIZE_MODES:
            raise ConfigError(f"optimize must be one of {', '.join(OPTIMIZE_MODES)}, not {self.optimize!r}")
        integer("max_batch", self.max_batch, 1)
        if not self.batch_sizes:
            raise ConfigError("verification batch sizes must not be empty")
        for b in self.batch_sizes:
            integer("verification batch size", b, 1, self.max_batch, note="at most max_batch")
        in_range("atol", self.atol, 0.0, low_open=True)
        if not self.input_name or not self.output_name or self.input_name == self.output_name:
            raise ConfigError("the input and output names must be non-empty and differ")


@dataclass
class ExportResult:
    """The shipped file, what it holds, and the evidence that it computes what the model computes."""

    path: Path
    precision: str = "fp32"
    opset: int | None = None
    parity: ParityReport | None = None
    optimized: OptimizeReport | None = None
    external_data: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def int8(self) -> dict[str, Any]:
        """An INT8 file's record (mode, calibration, measured accuracy); empty for other precisions."""
        return json.loads(self.metadata.get("int8", "{}"))

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "precision": self.precision, "opset": self.opset,
                "external_data": self.external_data, **({"int8": self.int8} if self.int8 else {}),
                "parity": self.parity.to_dict() if self.parity is not None else None,
                "optimized": self.optimized.to_dict() if self.optimized is not None else None,
                "seconds": round(self.seconds, 3)}


def opset_of(proto: onnx.ModelProto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def export_program(model: nn.Module, path: Path, config: ExportConfig) -> None:
    """Export through torch.export (the `dynamo=True` exporter) and save to `path`.

    Why this exporter: torch.export traces each block with its own attention module, so every
    block's head count becomes a constant of its own reshape while the batch stays a symbolic
    dimension; a batch size that got baked in anyway makes export fail instead of producing a wrong
    graph. The TorchScript exporter (`dynamo=False`) is deprecated since torch 2.9 and traces timm's
    attention with warnings that its shapes may not generalise.
    """
    example = torch.randn(EXPORT_BATCH, *input_size(model))
    batch = torch.export.Dim("batch", min=1, max=config.max_batch)
    # The exporter reports progress on stdout and warns about its own internals; keep both quiet.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), traced_as(model, config.graph):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                model, (example,), None, dynamo=True, verbose=False, opset_version=config.opset,
                input_names=[config.input_name], output_names=[config.output_name],
                dynamic_shapes=({0: batch},))
        except Exception as e:  # torch.export raises many types; the first line names the cause
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsupportedModelError(f"torch.onnx could not export this model: {first}") from None
        program.save(str(path), external_data=config.external_data)


def restamp(path: Path, metadata: dict[str, str]) -> onnx.ModelProto:
    """Add metadata to a staged file in place; external weights stay where they are."""
    proto = onnx.load(str(path), load_external_data=False)
    stamp(proto, metadata)
    onnx.save_model(proto, str(path))
    return proto


def to_onnx(model: nn.Module, path: str | os.PathLike, config: ExportConfig | None = None) -> ExportResult:
    """Export `model` (dense or compact) to `path`, verified and optionally graph-optimised.

    Nothing appears at `path` unless the export passed verification (when `config.verify`).
    """
    config = config or ExportConfig()
    start = time.perf_counter()
    path = Path(path)
    model = model.eval()
    vit_layout(model)
    metadata = {**model_metadata(model, "fp32"), "graph": config.graph}
    with staging(path) as stage:
        plain, fused = stage / "plain" / path.name, stage / "optimized" / path.name
        plain.parent.mkdir()
        fused.parent.mkdir()
        export_program(model, plain, config)
        restamp(plain, metadata)
        parity = None
        if config.verify:
            parity = verify_onnx(plain, model, config.batch_sizes, config.atol).raise_if_failed()
        report = optimize(plain, fused, config.optimize, config.external_data, config.atol, config.batch_sizes)
        shipped = fused if report.applied else plain
        metadata["optimization"] = json.dumps({k: v for k, v in report.to_dict().items() if k != "parity"})
        proto = restamp(shipped, metadata)
        if report.applied and config.verify:
            parity = verify_onnx(shipped, model, config.batch_sizes, config.atol).raise_if_failed()
        external = data_file(shipped).exists()
        publish(shipped, path)
    return ExportResult(path, "fp32", opset_of(proto), parity, report, external, raw_metadata(proto),
                        time.perf_counter() - start)

