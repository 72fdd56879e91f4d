"""`model_and_data`: where every run starts, the model sized to the data and the data at the model's input."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from .creation import create_model
from .data.bundle import DataBundle, load_data_for, open_source
from .models.adapter import vit_layout
from .training.seeding import seed_everything


def model_and_data(model: str | os.PathLike, source: str = "digits", root: str | os.PathLike | None = None, *,
                   checkpoint: str | os.PathLike | None = None, pretrained: bool = False,
                   reset_classifier: bool = False, seed: int = 0, **data_options: Any) -> tuple[nn.Module, DataBundle]:
    """The model and its data, as every command starts.

    `model` is an artifact directory, a preset or a timm ViT name (randomly initialised, with
    `checkpoint` weights, or timm's `pretrained` weights). A preset or timm name gets a classifier
    for the data's classes (a checkpoint's own classifier is reset when its count differs); an
    artifact keeps its classifier, and data with another class count is refused unless
    `reset_classifier`. The seed is set before the model is built, so random initialisation
    repeats. `data_options` go to `load_data` (batch_size, aug, workers, limit, ...).
    """
    seed_everything(seed)
    raw = open_source(source, root)
    is_artifact = checkpoint is None and Path(model).is_dir()
    sized = {} if is_artifact else {"num_classes": len(raw.class_names)}
    net = create_model(model, checkpoint, pretrained=pretrained, **sized)
    vit_layout(net)  # refuses a model that is not a timm ViT, naming it
    return net, load_data_for(net, raw, reset_classifier=reset_classifier, seed=seed, **data_options)
