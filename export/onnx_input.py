"""A user's ONNX file, checked before onnxruntime, numpy or a converter reads it.

Every command that takes an ONNX file (bench, INT8 and FP16 variants, OpenVINO, TensorRT) reads it
through `read_onnx`, which refuses what would otherwise end in a runtime's traceback or a huge
allocation: an empty or non-ONNX file, a graph without exactly one float32 image input
(batch, channels, height, width), an image larger than vitcompact feeds, and external weights that
are missing or lie outside the model's folder. The graph's weights are not loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from vitcompact.errors import ArtifactError
from vitcompact.io import regular_file
from vitcompact.models.args import MAX_CHANNELS, MAX_IMG_SIZE

from .metadata import raw_metadata

# One image's values: 2^26 float32 values are 256 MiB, beyond any ViT input vitcompact handles
# (3 x 4096 x 4096 is 48 M), and a batch of them is still an allocation a machine survives.
MAX_INPUT_VALUES = 2**26


@dataclass(frozen=True)
class OnnxFile:
    """A checked ONNX file: its graph (weights not loaded), metadata, image input's name and
    (channels, height, width) where the file states them (static dims or vitcompact's metadata)."""

    path: Path
    proto: onnx.ModelProto = field(repr=False)
    metadata: dict[str, str]
    input_name: str
    input_size: tuple[int, int, int] | None


def read_onnx(path: str | os.PathLike) -> OnnxFile:
    """`path` as an ONNX model vitcompact can run, or an ArtifactError naming the file and why not."""
    path = regular_file(path)
    if path.stat().st_size == 0:
        raise ArtifactError(f"{path} is empty (0 bytes), not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and others for a file that is not ONNX
        raise ArtifactError(f"{path} is not a readable ONNX file: {type(e).__name__}") from None
    name, dims = _image_input(path, proto)
    _check_external_data(path, proto)
    metadata = raw_metadata(proto)
    return OnnxFile(path, proto, metadata, name, _input_size(path, metadata, dims))


def _image_input(path: Path, proto: onnx.ModelProto) -> tuple[str, list[int | None]]:
    """The one float32 (batch, C, H, W) input's name and its C, H, W (None where not static)."""
    weights = {init.name for init in proto.graph.initializer}  # older exporters list weights as inputs
    inputs = [i for i in proto.graph.input if i.name not in weights]
    if len(inputs) != 1:
        names = ", ".join(repr(i.name) for i in inputs) or "none"
        raise ArtifactError(f"{path} has {len(inputs)} inputs ({names}); vitcompact runs models with one "
                            "image input")
    tensor = inputs[0].type.tensor_type
    if not inputs[0].type.HasField("tensor_type") or tensor.elem_type != onnx.TensorProto.FLOAT:
        kind = (onnx.TensorProto.DataType.Name(tensor.elem_type).lower() if inputs[0].type.HasField("tensor_type")
                else "not a tensor")
        raise ArtifactError(f"{path}: input {inputs[0].name!r} is {kind}; vitcompact feeds float32 images")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if len(dims) != 4:
        raise ArtifactError(f"{path}: input {inputs[0].name!r} has {len(dims)} dimensions; vitcompact feeds "
                            "images as (batch, channels, height, width)")
    return inputs[0].name, dims[1:]


def _input_size(path: Path, metadata: dict[str, str], dims: list[int | None]) -> tuple[int, int, int] | None:
    """(C, H, W) from vitcompact's `input_size` metadata, else the input's static dims; each checked
    against what vitcompact feeds, and the metadata against the static dims."""
    stated = metadata.get("input_size")
    if stated is not None:
        try:
            size = json.loads(stated)
        except ValueError:
            size = None
        if not (isinstance(size, list) and len(size) == 3 and all(type(v) is int for v in size)):
            raise ArtifactError(f"{path}: metadata input_size {stated[:60]!r} is not [channels, height, width]")
        if any(d is not None and d != v for d, v in zip(dims, size)):
            raise ArtifactError(f"{path}: metadata input_size {size} disagrees with the input's dims {dims}")
    elif all(d is not None for d in dims):
        size = dims
    else:
        return None
    channels, height, width = size
    for what, value, most in (("channels", channels, MAX_CHANNELS), ("height", height, MAX_IMG_SIZE),
                              ("width", width, MAX_IMG_SIZE)):
        if not 1 <= value <= most:
            raise ArtifactError(f"{path}: input {what} {value} is outside 1..{most}")
    if channels * height * width > MAX_INPUT_VALUES:
        raise ArtifactError(f"{path}: an input image of {channels}x{height}x{width} is "
                            f"{channels * height * width:,} values, more than the {MAX_INPUT_VALUES:,} "
                            "vitcompact feeds")
    return channels, height, width


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph holds: its weights, and constants in node attributes and subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _tensors(sub)


def _check_external_data(path: Path, proto: onnx.ModelProto) -> None:
    """External weights must be files inside the model's folder, long enough for their tensors."""
    folder = path.parent.resolve()
    for tensor in _tensors(proto.graph):
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        location = info.location or ""
        target = (path.parent / location).resolve()
        if not location or os.path.isabs(location) or folder not in target.parents:
            raise ArtifactError(f"{path}: tensor {tensor.name!r} keeps its data in {location!r}, outside the "
                                f"model's folder {folder}; vitcompact reads external data only beside the model")
        if not target.is_file():
            raise ArtifactError(f"{path}: external data file {location!r} of tensor {tensor.name!r} is missing")
        end = (info.offset or 0) + (info.length or 0)
        if end > target.stat().st_size:
            raise ArtifactError(f"{path}: external data file {location!r} holds {target.stat().st_size:,} bytes, "
                                f"tensor {tensor.name!r} needs {end:,}")
