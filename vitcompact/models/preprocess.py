"""How a model wants its images: timm's data config (input size, interpolation, crop, mean, std).

It lives where timm keeps it, `model.pretrained_cfg`, so `timm.data.resolve_model_data_config`
and `data_config` agree. A model *knows* its preprocessing when its weights were trained with
one: an artifact that records it, or a timm model with pretrained or checkpoint weights (timm's
own config for the architecture). A randomly initialised model does not: it takes the plain
preprocessing (bilinear resize of the whole image, no crop) with the training data's mean and
std, which `vitcompact.load_data_for` records on it the first time it sees data, so the artifact,
the ONNX metadata and every later command use the same numbers. Whether a model knows it is kept
in its record (`get_record(model).preprocessing_known`).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from timm.data import resolve_model_data_config

from .adapter import input_size
from .record import set_record

KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
CROP_MODES = ("center", "squash", "border")
PLAIN = {"interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}


def _per_channel(values: Any, channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    # A 3-channel config on a 1-channel model (or the reverse): one value for every channel.
    return (sum(values) / len(values),) * channels


def data_config(model: nn.Module) -> dict[str, Any]:
    """timm's data config of `model` (`resolve_model_data_config`), with the input size the
    model really takes and one mean/std value per input channel."""
    cfg = resolve_model_data_config(model)
    channels, height, width = input_size(model)
    return {"input_size": (channels, height, width), "interpolation": str(cfg["interpolation"]),
            "mean": _per_channel(cfg["mean"], channels), "std": _per_channel(cfg["std"], channels),
            "crop_pct": float(cfg["crop_pct"]), "crop_mode": str(cfg.get("crop_mode", "center"))}


def set_data_config(model: nn.Module, known: bool, **values: Any) -> None:
    """Write `values` (keys of `KEYS`) into `model.pretrained_cfg`, the input size always from the
    model itself, and record whether the model now knows its preprocessing
    (`ModelRecord.preprocessing_known`)."""
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ValueError(f"not data-config keys: {', '.join(unknown)}")
    cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **values}
    if hasattr(model, "patch_embed"):  # a model that is not a ViT is refused later, by `vit_layout`
        cfg["input_size"] = input_size(model)
    channels = cfg.get("input_size", (3,))[0]
    for key in ("mean", "std"):
        if key in cfg:
            cfg[key] = _per_channel(cfg[key], channels)
    model.pretrained_cfg = model.default_cfg = cfg  # timm keeps `default_cfg` as an alias
    set_record(model, preprocessing_known=known)
