"""Artifacts: a directory with `model.safetensors` + `config.json`. Never a pickle.

`config.json` is timm-style (architecture, model_args, num_classes, ...) plus a `vitcompact`
section holding the per-block shapes needed to rebuild a compact model, its structure,
dense/compact accounting and provenance.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .accounting import count
from .artifact_config import (FORMAT_VERSION, check_accounting, check_against, compact_blocks, match_weights,
                              read_config, weight_shapes)
from .errors import ArtifactError, ConfigError, UnsupportedModelError
from .io import atomic_paths, ensure_dir, json_text, save_safetensors
from .models.blocks import resize_blocks
from .models.builder import build_model
from .models.preprocess import data_config, set_data_config
from .models.record import get_record, set_record
from .models.token_merge import merge_tokens
from .models.weights import load_state, read_state
from .version import __version__

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
PREPROCESSING = ("interpolation", "crop_pct", "crop_mode")  # config.json keys beside mean and std


def _data_config(model: nn.Module) -> dict[str, Any]:
    """The timm-style data keys of config.json. The preprocessing is written only when the model
    knows it: without `crop_pct` an artifact loads as not knowing it (mean/std are placeholders)."""
    cfg = data_config(model)
    in_chans, height, width = cfg["input_size"]
    known = {k: cfg[k] for k in PREPROCESSING} if get_record(model).preprocessing_known else {}
    return {"num_classes": model.num_classes, "img_size": [height, width], "in_chans": in_chans,
            "mean": list(cfg["mean"]), "std": list(cfg["std"]), **known}


def model_config(model: nn.Module, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json content for a model built by vitcompact (from its `ModelRecord`)."""
    record = get_record(model)
    if record.architecture is None:
        raise UnsupportedModelError(
            "model has no recorded architecture; build it with vitcompact.create_model or "
            "vitcompact.load so it can be saved and rebuilt")
    compact_count = count(model).to_dict()
    compact = record.is_compact
    # Only a merging model has the key, so other artifacts are written as before.
    merging = {"token_merge": record.token_merge.to_dict()} if record.token_merge is not None else {}
    return {
        "architecture": record.architecture,
        "model_args": dict(record.model_args),
        **_data_config(model),
        "vitcompact": {
            "format_version": FORMAT_VERSION,
            "version": __version__,
            "preset": record.preset,
            "blocks": [b.to_dict() for b in record.blocks] if compact else None,
            "structure": record.structure if compact else None,
            **merging,
            "accounting": {"dense": record.dense if compact else count(model, merged=False).to_dict(),
                           "compact": compact_count},
            "provenance": {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "torch": torch.__version__, **(provenance or {})},
        },
    }


def save(model: nn.Module, path: str | os.PathLike, provenance: dict[str, Any] | None = None) -> Path:
    """Write `model` to the directory `path` (created if needed): weights and config are replaced
    together, or (a full disk) neither is."""
    path = ensure_dir(path)
    config = model_config(model, provenance)
    with atomic_paths(path / WEIGHTS, path / CONFIG) as (weights, config_file):
        save_safetensors(weights, model.state_dict(), {"format": "pt", "vitcompact": __version__},
                         target=path / WEIGHTS)
        config_file.write_text(json_text(config))
    return path


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild a saved model from its config and load its weights strictly.

    Every field of `config.json` is checked, and the model it describes is compared with the
    weights' shapes in the safetensors header, before any module is built (`artifact_config`).
    A recorded token merging setting is applied again (`merge_tokens`).
    """
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path} is not an artifact directory (expected {CONFIG} and {WEIGHTS})")
    config = read_config(path / CONFIG)
    shapes = weight_shapes(path / WEIGHTS)
    try:
        skeleton = build_model(config.architecture, config.model_args, device="meta")
    except ConfigError as e:
        raise ArtifactError(f"{path / CONFIG}: {e}") from None
    check_against(config, skeleton, path / CONFIG)
    blocks = compact_blocks(config, skeleton)
    if blocks is not None:
        resize_blocks(skeleton, blocks)
    match_weights(skeleton, shapes, path / WEIGHTS, compact=blocks is not None)
    merge_tokens(skeleton, config.token_merge)  # checked against the input size by check_against
    check_accounting(config, skeleton, path / CONFIG)
    model = build_model(config.architecture, config.model_args, blocks, preset=config.preset)
    if blocks is not None:
        set_record(model, structure=config.structure, dense=config.dense)
    merge_tokens(model, config.token_merge)
    load_state(model, read_state(path / WEIGHTS), path / WEIGHTS)
    data = config.data
    if "crop_pct" in data:
        set_data_config(model, True, mean=data["mean"], std=data["std"],
                        **{k: data[k] for k in PREPROCESSING if k in data})
    return model.eval()
