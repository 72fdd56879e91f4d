"""The metadata stamped on every exported ONNX file, and reading it back.

Values are strings (ONNX `metadata_props` hold strings only); structured values are JSON. The bench
harness reads these exact keys, so they are part of the public surface.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import onnx
import torch.nn as nn

import vitcompact as vc
from vitcompact.artifact import _data_config
from vitcompact.errors import ArtifactError
from vitcompact.models.record import get_record
from vitcompact.models.token_merge import model_token_counts

PRECISIONS = ("fp32", "fp16", "int8")
JSON_KEYS = ("structure", "input_size", "mean", "std", "source", "optimization", "int8", "token_merge",
             "block_tokens")
INT_KEYS = ("params", "macs", "num_classes")


def model_metadata(model: nn.Module, precision: str = "fp32") -> dict[str, str]:
    """The metadata of an export of `model`: version, structure, size, input and source, and for a
    model that merges tokens its setting (`token_merge`) and tokens per block (`block_tokens`: what
    enters each block's attention, for the input size in `input_size`); MACs count the merged tokens."""
    data = _data_config(model)
    counted = vc.count(model)
    record = get_record(model)
    merging = {} if record.token_merge is None else {
        "token_merge": json.dumps(record.token_merge.to_dict()),
        "block_tokens": json.dumps(model_token_counts(model))}
    return {
        "vitcompact_version": vc.__version__,
        "structure": json.dumps(record.structure if record.is_compact else None),
        "params": str(counted.params),
        "macs": str(counted.macs),
        "input_size": json.dumps([data["in_chans"], *data["img_size"]]),
        "mean": json.dumps(data["mean"]),
        "std": json.dumps(data["std"]),
        "num_classes": str(data["num_classes"]),
        # A model built outside vitcompact has no recorded source (null); it is exported anyway.
        "source": json.dumps(record.source()),
        "precision": precision,
        **merging,
    }


def stamp(proto: onnx.ModelProto, metadata: dict[str, str]) -> onnx.ModelProto:
    """Set `metadata` on `proto` (replacing keys already there), in place."""
    keep = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    return proto


def raw_metadata(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def parse_metadata(raw: dict[str, str]) -> dict[str, Any]:
    """Decode JSON and integer values; keys vitcompact does not know stay strings."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            if key in JSON_KEYS:
                out[key] = json.loads(value)
            elif key in INT_KEYS:
                out[key] = int(value)
            else:
                out[key] = value
        except ValueError:
            raise ArtifactError(f"ONNX metadata {key!r} is not valid ({value[:60]!r}); "
                                "re-export the model with vitcompact") from None
    return out


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The vitcompact metadata of an ONNX file, decoded (weights are not loaded)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends for a non-ONNX file
        raise ArtifactError(f"{path} is not a readable ONNX file: {type(e).__name__}") from None
    return parse_metadata(raw_metadata(proto))
