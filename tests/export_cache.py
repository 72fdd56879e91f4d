"""One export per distinct model in a test session: torch's exporter takes ~3 s for a small model,
most of a test that times or compares models (latency tables, benches, budget reports), and many tests
export the same dense model or variant on two code paths. conftest applies `exports_once` to the
whole session, its graphs shared by the xdist workers; a test marked `real_export` runs the exporter
every time."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import shutil
import types
from pathlib import Path
from typing import Iterator

import pytest
import torch


def _export_key(model: torch.nn.Module, config) -> str | None:
    """What torch's exporter makes of `model`: every submodule's type, its weights and buffers (values,
    dtypes, shapes) and its other attributes (flags, the model's record and token merging) pickled
    without shared references (so equal records built apart match), and the export settings it
    reads; None (export every time) for a model with an attribute that does not pickle."""
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    digest = hashlib.sha256(repr((config.opset, config.input_name, config.output_name, config.max_batch,
                                  config.graph, config.external_data)).encode())
    for name, module in model.named_modules(remove_duplicate=False):
        digest.update(f"module {name} {type(module).__module__}.{type(module).__qualname__}".encode())
        for attr, value in vars(module).items():
            digest.update(f"attr {attr}".encode())
            if attr == "_modules":  # the submodules follow one by one
                digest.update(repr(list(value)).encode())
            elif attr in ("_parameters", "_buffers"):
                for key, tensor in value.items():
                    digest.update(f"tensor {key}".encode())
                    if tensor is not None:
                        tensor = tensor.detach().cpu().contiguous()
                        digest.update(f"{tensor.dtype} {tuple(tensor.shape)} {tensor.requires_grad}".encode())
                        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
            elif isinstance(value, types.MethodType) and isinstance(value.__self__, torch.nn.Module):
                if id(value.__self__) not in names:
                    return None
                func = value.__func__
                digest.update(f"method {func.__module__}.{func.__qualname__} of {names[id(value.__self__)]}".encode())
            else:
                buffer = io.BytesIO()
                pickler = pickle.Pickler(buffer, protocol=4)
                pickler.fast = True  # no memo: shared and separate equal objects pickle alike
                try:
                    pickler.dump(value)
                except Exception:
                    return None
                digest.update(buffer.getvalue())
    return digest.hexdigest()


def _registry_once(patch: pytest.MonkeyPatch) -> None:
    """torch's ONNX exporter builds its registry of onnxscript functions anew for every export (a fifth
    of a small model's export: it reads the source of ~500 functions); build it once per opset. Only a
    `custom_translation_table`, which vitcompact never passes, changes a registry once built. A torch
    without this private class exports as usual."""
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry
        build = ONNXRegistry.__dict__["from_torchlib"].__func__
    except (ImportError, KeyError, AttributeError):
        return
    built: dict[str, ONNXRegistry] = {}

    def from_torchlib(cls, *args, **kwargs):
        key = repr((cls, args, sorted(kwargs.items())))
        if key not in built:
            built[key] = build(cls, *args, **kwargs)
        return built[key]
    patch.setattr(ONNXRegistry, "from_torchlib", classmethod(from_torchlib))


_REAL: list = []  # the exporter exports_once wraps


def real_export_program():
    """vitcompact's export_program as it was before `exports_once` wrapped it."""
    if _REAL:
        return _REAL[0]
    from vitcompact.export import onnx as onnx_export
    return onnx_export.export_program


@contextlib.contextmanager
def exports_once(folder: Path) -> Iterator[None]:
    """Run torch's exporter once per distinct model: a later `to_onnx` of a model whose every
    submodule and attribute pickles the same, with the same graph settings, gets a copy of the first
    graph file (the exporter is deterministic) and goes on as usual (metadata, verification,
    optimisation, publishing); and build the exporter's registry once (`_registry_once`). A small
    model's export takes ~3 s, most of a test that times or compares models (latency tables,
    benches, budget reports) and exports the same dense model or variant on two code paths.
    `folder` may be shared by processes (the xdist workers): a graph is published there by rename."""
    from vitcompact.export import onnx as onnx_export
    from vitcompact.export.files import data_file
    real = onnx_export.export_program
    _REAL.append(real)
    folder.mkdir(parents=True, exist_ok=True)

    def export_program(model, path, config):
        key = _export_key(model, config)
        kept = folder / f"{key}.onnx"
        if key is not None and kept.is_file():
            shutil.copyfile(kept, path)
            return
        real(model, path, config)
        if key is not None and not data_file(Path(path)).exists():  # files with external weights are not kept
            staged = folder / f"{key}.{os.getpid()}.part"
            shutil.copyfile(path, staged)
            os.replace(staged, kept)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_export, "export_program", export_program)
        _registry_once(patch)
        yield
