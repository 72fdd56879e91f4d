"""What a benchmark compares: a model from a module, an artifact directory, a name, an ONNX file or a
TensorRT engine file (`.engine`, `.plan`, described by the `<engine>.json` written beside it),
made into the core's `BenchModel` (`vitcompact.latency`)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Union

import torch.nn as nn

from vitcompact.creation import create_model
from vitcompact.errors import ArtifactError, ConfigError
from vitcompact.export.onnx_input import read_onnx
from vitcompact.export.tensorrt import ENGINE_SUFFIXES, EngineInfo
from vitcompact.io import regular_file
from vitcompact.latency.sources import BenchModel
from vitcompact.models.token_merge import TokenMergeConfig, merge_tokens

ModelSource = Union[nn.Module, str, os.PathLike, BenchModel]


def _from_onnx(path: Path, label: str) -> BenchModel:
    onnx_file = read_onnx(path)  # refuses what onnxruntime or numpy would fail on, naming the file
    meta = onnx_file.metadata
    if onnx_file.input_size is None:
        raise ArtifactError(f"{path}: input size unknown (no 'input_size' metadata and no static "
                            "C, H, W input dims); re-export it with `vitcompact export`")
    macs = int(meta["macs"]) if meta.get("macs", "").isdigit() else None
    return BenchModel(label, onnx_file.input_size, macs, onnx_path=path, precision=meta.get("precision", "fp32"))


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


def with_token_merge(source: nn.Module | str | os.PathLike, config: TokenMergeConfig) -> BenchModel:
    """`source` (a module, artifact directory, preset or timm name) merging tokens as `config` says; a
    module is copied, not changed. An exported file is refused: its graph is fixed."""
    if isinstance(source, nn.Module):
        model, label = copy.deepcopy(source), None
    elif Path(source).suffix in (".onnx", *ENGINE_SUFFIXES):
        raise ConfigError(f"token merging cannot be added to the exported file {source}; export the model "
                          "with it (vitcompact export onnx MODEL OUT --token-merge R) and bench that file")
    else:
        model, label = create_model(source), str(source)
    merged = BenchModel.of(merge_tokens(model, config), label)
    if config.enabled:
        merged.label += f" + token merging r={config.r}"
    return merged
