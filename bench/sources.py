"""What a benchmark measures: a model from a module, an artifact directory, a name, an ONNX file or a
TensorRT engine file (`.engine`, `.plan`, described by the `<engine>.json` written beside it).

A `BenchModel` knows its input size and per-image MACs (for the ideal speed-up) and exports itself
to ONNX once, on first use by an onnxruntime backend, so one dense model can be compared with
several compact ones without exporting it again.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch.nn as nn

import vitcompact as vc
from vitcompact.artifact import resolve_model
from vitcompact.errors import ArtifactError, ConfigError
from vitcompact.export.tensorrt import ENGINE_SUFFIXES, EngineInfo
from vitcompact.io import regular_file, temp_dir

ModelSource = Union[nn.Module, str, os.PathLike, "BenchModel"]


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

    def onnx(self, optimize: str = "off") -> Path:
        """The model as an ONNX file, exported to a private temporary folder on first use.

        `optimize` is the exporter's graph-fusion mode; the bench default "off" gives dense and
        compact the same plain graph, since "auto" may fuse one and not the other.
        """
        if self.onnx_path is not None and (self._export_dir is None or optimize in self._exports):
            return self._exports.get(optimize, self.onnx_path)
        from vitcompact.export import ExportConfig, to_onnx  # bench -> export, never the other way
        if self._export_dir is None:
            self._export_dir = temp_dir(tempfile.gettempdir(), "vitcompact-bench-")
            weakref.finalize(self, shutil.rmtree, self._export_dir, True)
        # The dynamo exporter prints progress lines; they would corrupt `--json` output.
        with contextlib.redirect_stdout(io.StringIO()):
            result = to_onnx(self.module.eval(), self._export_dir / f"model-{optimize}.onnx",
                             ExportConfig(verify=False, optimize=optimize))
        self._exports[optimize] = self.onnx_path = Path(result.path)
        optimized = getattr(result, "optimized", None)
        self.export_notes[optimize] = getattr(optimized, "reason", "") if optimized else ""
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


def _module_label(module: nn.Module) -> str:
    source = getattr(module, "vitcompact_source", None) or {}
    name = source.get("preset") or source.get("architecture") or type(module).__name__
    return f"{name} (compact)" if vc.is_compact(module) else name


def _from_module(module: nn.Module, label: str) -> BenchModel:
    vc.vit_layout(module)  # refuses non-ViT models with a message naming them
    return BenchModel(label, vc.input_size(module), vc.count(module).macs, module=module.eval())


def onnx_metadata(path: Path) -> dict[str, str]:
    """The file's metadata_props as a dict (graph weights are not loaded)."""
    import onnx
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others for a corrupt file
        raise ArtifactError(f"{path} is not a readable ONNX file: {e}") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if "input_size" not in meta:
        dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]
        if len(dims) == 3 and all(dims):
            meta["input_size"] = json.dumps(dims)
    return meta


def _from_onnx(path: Path, label: str) -> BenchModel:
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist")
    meta = onnx_metadata(path)
    if "input_size" not in meta:
        raise ArtifactError(f"{path}: input size unknown (no 'input_size' metadata and no static "
                            "C, H, W input dims); re-export it with `vitcompact export`")
    macs = int(meta["macs"]) if meta.get("macs", "").isdigit() else None
    return BenchModel(label, tuple(json.loads(meta["input_size"])), macs, onnx_path=path,
                      precision=meta.get("precision", "fp32"))


def _from_engine(path: Path, label: str) -> BenchModel:
    info = EngineInfo.read(regular_file(path))
    return BenchModel(label, info.input_size, info.macs, precision=info.precision, engine_path=path)


def resolve(source: ModelSource) -> BenchModel:
    """A BenchModel from a module, an artifact directory, a preset / timm name, an .onnx file or a
    TensorRT engine file (.engine, .plan) with its `<engine>.json`."""
    if isinstance(source, BenchModel):
        return source
    if isinstance(source, nn.Module):
        return _from_module(source, _module_label(source))
    path, label = Path(source), str(source)
    if path.suffix == ".onnx":
        return _from_onnx(path, label)
    if path.suffix in ENGINE_SUFFIXES:
        return _from_engine(path, label)
    return _from_module(resolve_model(source), label)


def ideal_speedup(dense: BenchModel, compact: BenchModel) -> float | None:
    if dense.macs is None or compact.macs is None or compact.macs == 0:
        return None
    return dense.macs / compact.macs


def check_pair(dense: BenchModel, compact: BenchModel) -> None:
    if tuple(dense.input_size) != tuple(compact.input_size):
        raise ConfigError(f"dense input {list(dense.input_size)} and compact input "
                          f"{list(compact.input_size)} differ; compare models of the same input size")
