"""`create_model`: a model from what a user names, as timm's `create_model`, through the one builder.

A preset or timm name is built by `models.builder.build_model` (randomly initialised, with timm's
hub weights, or with a local checkpoint's); an artifact directory is `load`ed, which builds
through the same builder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.models import adapt_input_conv
from timm.models.vision_transformer import checkpoint_filter_fn

from .artifact import load
from .errors import ArtifactError, ConfigError
from .models.adapter import vit_layout
from .models.builder import build_model, set_num_classes
from .models.presets import resolve_name
from .models.weights import load_state, read_state

NOT_A_NAME = (".safetensors", ".pth", ".pt", ".onnx")  # suffixes that mean a path, never a model name


def _artifact(name: str | os.PathLike, checkpoint_path: Any, pretrained: bool,
              model_args: dict[str, Any]) -> Path | None:
    """The artifact directory `name` is; None for a preset or timm name. Refuses a file, a path
    that does not exist and what an artifact cannot take (it carries its weights and shapes)."""
    path = Path(name)
    if pretrained and path.is_dir():
        raise ConfigError(f"{name} is an artifact, which carries its own weights; pretrained weights "
                          "are for a timm model name")
    if checkpoint_path is not None:
        return None
    if path.is_dir():
        if model_args:
            raise ConfigError(f"{name} is an artifact whose config.json fixes the model; "
                              f"{', '.join(sorted(model_args))} cannot be changed for it")
        return path
    if path.exists():
        raise ConfigError(f"{name} is a file; pass an artifact directory, a preset or a timm model "
                          "name (a checkpoint file goes with --checkpoint)")
    if "/" in str(name) or path.suffix in NOT_A_NAME:
        raise ArtifactError(f"{name} does not exist")
    return None


def _checkpoint_args(state: dict[str, torch.Tensor], architecture: str, model_args: dict[str, Any]) -> dict[str, Any]:
    """The model arguments a timm checkpoint's shapes fix: its class count (0 without a
    classifier), input channels, patch size and (from a square position grid) image size."""
    args: dict[str, Any] = {}
    patch = state.get("patch_embed.proj.weight")
    if patch is not None and patch.ndim == 4:
        height, width = int(patch.shape[2]), int(patch.shape[3])
        args.update(in_chans=int(patch.shape[1]), patch_size=height if height == width else [height, width])
    skeleton = build_model(architecture, {**args, **model_args}, device="meta")
    classifier = skeleton.pretrained_cfg.get("classifier", "head")
    head = state.get(f"{classifier if isinstance(classifier, str) else classifier[0]}.weight")
    args["num_classes"] = int(head.shape[0]) if head is not None and head.ndim == 2 else 0
    pos_embed = state.get("pos_embed")
    if patch is not None and patch.ndim == 4 and pos_embed is not None and pos_embed.ndim == 3:
        prefix = 0 if getattr(skeleton, "no_embed_class", False) else getattr(skeleton, "num_prefix_tokens", 1)
        side = math.isqrt(max(pos_embed.shape[1] - prefix, 0))
        if side and side * side == pos_embed.shape[1] - prefix:
            args["img_size"] = side * height if height == width else [side * height, side * width]
    return args


def _from_timm_checkpoint(architecture: str, model_args: dict[str, Any], path: Path) -> nn.Module:
    """A timm model with a local timm checkpoint's weights, as timm adapts pretrained weights:
    the checkpoint fixes the shapes the user does not give; a different image or patch size resamples
    the position and patch embeddings, other input channels adapt the patch embedding, and another
    class count gets a new classifier (`reset_classifier`)."""
    state = read_state(path)
    fixed = _checkpoint_args(state, architecture, model_args)
    model = build_model(architecture, {**fixed, **model_args, "num_classes": fixed["num_classes"]},
                        timm_weights=True)  # timm's preprocessing of the architecture, at the model's input size
    vit_layout(model)  # timm's conversion of checkpoints is that of its VisionTransformer
    state = checkpoint_filter_fn(state, model)
    patch = state.get("patch_embed.proj.weight")
    in_chans = model.patch_embed.proj.in_channels
    if patch is not None and patch.ndim == 4 and patch.shape[1] != in_chans:
        state["patch_embed.proj.weight"] = adapt_input_conv(in_chans, patch, base_chans=patch.shape[1])
    load_state(model, state, path)
    if model_args.get("num_classes", model.num_classes) != model.num_classes:
        set_num_classes(model, model_args["num_classes"])
    return model


def _from_preset_checkpoint(architecture: str, model_args: dict[str, Any], preset: str, path: Path) -> nn.Module:
    """A preset with a checkpoint that fits it exactly, but for its class count."""
    model = build_model(architecture, model_args, preset=preset)
    state = read_state(path)
    head = state.get("head.weight")
    if head is not None and head.ndim == 2 and head.shape[0] != model.num_classes:
        # Trained for another class count: load its classifier, then reset it, as timm does.
        wanted = model.num_classes
        model = build_model(architecture, {**model_args, "num_classes": int(head.shape[0])}, preset=preset)
        load_state(model, state, path)
        set_num_classes(model, wanted)
    else:
        load_state(model, state, path)
    return model


def create_model(name: str | os.PathLike, checkpoint_path: str | os.PathLike | None = None,
                 pretrained: bool = False, **model_args: Any) -> nn.Module:
    """A ViT from a preset name, any timm ViT name or an artifact directory (`load`), as timm's
    `create_model`: randomly initialised, with timm's pretrained weights (`pretrained`, timm names
    only, downloaded from the hub), or with the weights of `checkpoint_path` (.safetensors, or
    .pth/.pt read with weights_only).

    Keyword arguments override the preset's (e.g. `num_classes`, `in_chans`, `img_size`); each is
    checked and the model's size is bounded before any memory is allocated. A timm checkpoint is
    adapted to them as timm adapts pretrained weights; a preset's checkpoint must fit it exactly,
    but for its class count (another count gets a new classifier, `reset_classifier`).
    A model with pretrained or timm-checkpoint weights keeps timm's preprocessing of its
    architecture (`models.preprocess`); any other starts plain, its normalisation still unknown.
    An artifact keeps what it recorded and takes no keyword arguments.
    """
    if pretrained and checkpoint_path is not None:
        raise ConfigError("pass either pretrained (timm's hub weights) or a checkpoint file, not both")
    artifact = _artifact(name, checkpoint_path, pretrained, model_args)
    if artifact is not None:
        return load(artifact)
    architecture, args, preset = resolve_name(str(name), model_args)
    if pretrained and preset is not None:
        raise ConfigError(f"{name} is a vitcompact preset, which has no pretrained weights on the hub; "
                          "pass a timm model name, or a local checkpoint (checkpoint_path / --checkpoint FILE)")
    if checkpoint_path is None:
        return build_model(architecture, args, preset=preset, pretrained=pretrained)
    if preset is None:
        return _from_timm_checkpoint(architecture, args, Path(checkpoint_path))
    return _from_preset_checkpoint(architecture, args, preset, Path(checkpoint_path))
