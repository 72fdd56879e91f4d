"""What a backend times: `BenchModel`, a model as a module, an ONNX file or a TensorRT engine file,
with its input size and per-image MACs (for the ideal speed-up).

A module exports itself to ONNX once, on first use by an onnxruntime backend, so one dense model
can be compared with several compact ones without exporting it again. The exporter is
`vitcompact.export`'s: it registers itself in `ONNX_EXPORTERS` when imported, and the core loads it
by name on first need (`plugins.load`), so the core does not import the export package.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch.nn as nn

from ..accounting import count
from ..errors import ConfigError
from ..io import temp_dir
from ..models import get_record, input_size, vit_layout
from ..registry import Registry
from . import plugins



class OnnxExporter(Protocol):
    def __call__(self, module: nn.Module, path: Path, optimize: str) -> tuple[Path, str]:
        """Write `module` to `path`; the written path and the exporter's note on its optimisation."""

    def settings(self) -> dict[str, Any]:
        """What the written graph depends on (opset, graph form): part of a latency table's key."""


ONNX_EXPORTERS: Registry[OnnxExporter] = Registry("ONNX exporter")


def onnx_exporter() -> OnnxExporter:
    plugins.load()
    return ONNX_EXPORTERS.get("onnx")


def exporter_settings() -> dict[str, Any]:
    return onnx_exporter().settings()


@dataclass
class BenchModel:
    label: str
    input_size: tuple[int, int, int]  # C, H, W
    macs: int | None                  # per image; None when an ONNX file does not record it
    module: nn.Module | None = None
    onnx_path: Path | None = None
    precision: str = "fp32"           # an ONNX file's recorded precision (fp32, fp16, int8)
    engine_path: Path | None = None   # a TensorRT engine file: only the tensorrt-engine backend runs it
    export_notes: dict[str, str] = field(default_factory=dict)  # optimise mode -> exporter's note
    _export_dir: Path | None = field(default=None, repr=False)
    _exports: dict[str, Path] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, module: nn.Module, label: str | None = None) -> "BenchModel":
        """A module to time; `vit_layout` refuses non-ViT models with a message naming them."""
        vit_layout(module)
        return cls(label or module_label(module), input_size(module), count(module).macs, module=module.eval())

    def onnx(self, optimize: str = "off") -> Path:
        """The model as an ONNX file, exported to a private temporary folder on first use.

        `optimize` is the exporter's graph-fusion mode; the bench default "off" gives dense and
        compact the same plain graph, since "auto" may fuse one and not the other.
        """
        if self.onnx_path is not None and (self._export_dir is None or optimize in self._exports):
            return self._exports.get(optimize, self.onnx_path)
        if self._export_dir is None:
            self._export_dir = temp_dir(tempfile.gettempdir(), "vitcompact-bench-")
            weakref.finalize(self, shutil.rmtree, self._export_dir, True)
        export = onnx_exporter()
        # The dynamo exporter prints progress lines; they would corrupt `--json` output.
        with contextlib.redirect_stdout(io.StringIO()):
            path, note = export(self.module.eval(), self._export_dir / f"model-{optimize}.onnx", optimize)
        self._exports[optimize] = self.onnx_path = Path(path)
        self.export_notes[optimize] = note
        return self.onnx_path

    def refuse_engine(self, backend: str) -> None:
        """Refuse an engine file to a backend that cannot run one, naming the backend that can."""
        if self.engine_path is not None:
            raise ConfigError(f"{self.label} is a TensorRT engine file, which backend {backend} cannot "
                              "run; time engine files with --backend tensorrt-engine")

    def to_dict(self) -> dict:
        return {"label": self.label, "input_size": list(self.input_size), "macs": self.macs,
                "precision": self.precision,
                "onnx": str(self.onnx_path) if self.onnx_path and not self._export_dir else None,
                "engine": str(self.engine_path) if self.engine_path else None,
                "export_notes": dict(self.export_notes)}


def module_label(module: nn.Module) -> str:
    record = get_record(module)
    name = record.preset or record.architecture or type(module).__name__
    return f"{name} (compact)" if record.is_compact else name


def ideal_speedup(dense: BenchModel, compact: BenchModel) -> float | None:
    if dense.macs is None or compact.macs is None or compact.macs == 0:
        return None
    return dense.macs / compact.macs


def check_pair(dense: BenchModel, compact: BenchModel) -> None:
    if tuple(dense.input_size) != tuple(compact.input_size):
        raise ConfigError(f"dense input {list(dense.input_size)} and compact input "
                          f"{list(compact.input_size)} differ; compare models of the same input size")
