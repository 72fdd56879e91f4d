"""What a benchmark compares: a model from a module, an artifact directory, a name, an ONNX file or a
TensorRT engine file (`.engine`, `.plan`, described by the `<engine>.json` written beside it),
made into the core's `BenchModel` (`vitcompact.latency`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch.nn as nn

from vitcompact.creation import create_model
from vitcompact.errors import ArtifactError
from vitcompact.export.tensorrt import ENGINE_SUFFIXES, EngineInfo
from vitcompact.io import regular_file
from vitcompact.latency.sources import BenchModel, check_pair, ideal_speedup  # noqa: F401  (re-exported)

ModelSource = Union[nn.Module, str, os.PathLike, BenchModel]


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
        return BenchModel.of(source)
    path, label = Path(source), str(source)
    if path.suffix == ".onnx":
        return _from_onnx(path, label)
    if path.suffix in ENGINE_SUFFIXES:
        return _from_engine(path, label)
    return BenchModel.of(create_model(source), label)
