"""Artifacts: a directory with `model.safetensors` + `config.json`. Never a pickle.

`config.json` is timm-style (architecture, model_args, num_classes, ...) plus a `vitcompact`
section holding the per-block shapes needed to rebuild a compact model, its structure,
dense/compact accounting and provenance.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models import adapt_input_conv
from timm.models.vision_transformer import checkpoint_filter_fn

from . import __version__
from .accounting import count
from .artifact_config import (FORMAT_VERSION, check_accounting, check_against, match_weights, read_config,
                              weight_shapes)
from .compaction import CompactInfo, apply_block_specs, block_specs, compact_info, set_compact_info
from .errors import ArtifactError, ConfigError
from .io import atomic_paths, ensure_dir, json_text, regular_file, save_safetensors
from .models.adapter import vit_layout
from .models.preprocess import data_config, knows_preprocessing, set_data_config, set_plain
from .models.presets import (PRESETS, build_model, build_pretrained, get_source, model_skeleton, set_num_classes,
                             set_source)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
PREPROCESSING = ("interpolation", "crop_pct", "crop_mode")  # config.json keys beside mean and std


def _data_config(model: nn.Module) -> dict[str, Any]:
    """The timm-style data keys of config.json. The preprocessing is written only when the model
    knows it: without `crop_pct` an artifact loads as not knowing it (mean/std are placeholders)."""
    cfg = data_config(model)
    in_chans, height, width = cfg["input_size"]
    known = {k: cfg[k] for k in PREPROCESSING} if knows_preprocessing(model) else {}
    return {"num_classes": model.num_classes, "img_size": [height, width], "in_chans": in_chans,
            "mean": list(cfg["mean"]), "std": list(cfg["std"]), **known}


def model_config(model: nn.Module, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json content for a model built by vitcompact."""
    source = get_source(model)
    info = compact_info(model)
    compact_count = count(model).to_dict()
    return {
        "architecture": source["architecture"],
        "model_args": source["model_args"],
        **_data_config(model),
        "vitcompact": {
            "format_version": FORMAT_VERSION,
            "version": __version__,
            "preset": source.get("preset"),
            "blocks": info.to_dict()["blocks"] if info else None,
            "structure": info.structure if info else None,
            "accounting": {"dense": info.dense if info else compact_count, "compact": compact_count},
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


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    regular_file(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ArtifactError(f"{path} is not a readable safetensors file: {e}") from None
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for corrupt or unsafe files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"{path} could not be read as a weights-only checkpoint: {first}") from None
        for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ArtifactError(f"{path} does not hold a state dict of tensors")
        return {k.removeprefix("module."): v for k, v in obj.items()}
    raise ArtifactError(f"{path}: unsupported checkpoint type {path.suffix!r}; use .safetensors, .pth or .pt")


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ArtifactError(f"{where} does not match the model: missing keys {missing[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                            f"{' ...' if len(unexpected) > 5 else ''}")
    for k, expected in own.items():
        if tuple(state[k].shape) != tuple(expected.shape):
            raise ArtifactError(f"{where}: {k} has shape {tuple(state[k].shape)} but the model "
                                f"expects {tuple(expected.shape)}")
    model.load_state_dict(state, strict=True)


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild a saved model from its config and load its weights strictly.

    Every field of `config.json` is checked, and the model it describes is compared with the
    weights' shapes in the safetensors header, before any module is built (`artifact_config`).
    """
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path} is not an artifact directory (expected {CONFIG} and {WEIGHTS})")
    config = read_config(path / CONFIG)
    shapes = weight_shapes(path / WEIGHTS)
    try:
        skeleton = model_skeleton(config.architecture, **config.model_args)
    except ConfigError as e:
        raise ArtifactError(f"{path / CONFIG}: {e}") from None
    check_against(config, skeleton, path / CONFIG)
    if config.blocks is not None:
        apply_block_specs(skeleton, config.blocks)
    match_weights(skeleton, shapes, path / WEIGHTS, compact=config.blocks is not None)
    check_accounting(config, skeleton, path / CONFIG)
    model = create_model(config.architecture, **config.model_args)
    set_source(model, config.architecture, config.model_args, config.preset)
    if config.blocks is not None:
        apply_block_specs(model, config.blocks)
        set_compact_info(model, CompactInfo(list(config.blocks), config.structure, config.dense))
    _load_strict(model, _read_state(path / WEIGHTS), path / WEIGHTS)
    data = config.data
    if "crop_pct" in data:
        set_data_config(model, True, mean=data["mean"], std=data["std"],
                        **{k: data[k] for k in PREPROCESSING if k in data})
    else:
        set_plain(model)
    return model.eval()


def _checkpoint_args(state: dict[str, torch.Tensor], name: str, model_args: dict[str, Any]) -> dict[str, Any]:
    """The model arguments a timm checkpoint's shapes fix: its class count (0 without a
    classifier), input channels, patch size and (from a square position grid) image size."""
    args: dict[str, Any] = {}
    patch = state.get("patch_embed.proj.weight")
    if patch is not None and patch.ndim == 4:
        height, width = int(patch.shape[2]), int(patch.shape[3])
        args.update(in_chans=int(patch.shape[1]), patch_size=height if height == width else [height, width])
    skeleton = model_skeleton(name, **{**args, **model_args})
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


def _from_timm_checkpoint(name: str, path: Path, model_args: dict[str, Any]) -> nn.Module:
    """A timm model with a local timm checkpoint's weights, as timm adapts pretrained weights:
    the checkpoint fixes the shapes the user does not give; a different image or patch size resamples
    the position and patch embeddings, other input channels adapt the patch embedding, and another
    class count gets a new classifier (`reset_classifier`)."""
    state = _read_state(path)
    fixed = _checkpoint_args(state, name, model_args)
    model = build_model(name, **{**fixed, **model_args, "num_classes": fixed["num_classes"]})
    vit_layout(model)  # timm's conversion of checkpoints is that of its VisionTransformer
    state = checkpoint_filter_fn(state, model)
    patch = state.get("patch_embed.proj.weight")
    in_chans = model.patch_embed.proj.in_channels
    if patch is not None and patch.ndim == 4 and patch.shape[1] != in_chans:
        state["patch_embed.proj.weight"] = adapt_input_conv(in_chans, patch, base_chans=patch.shape[1])
    _load_strict(model, state, path)
    if model_args.get("num_classes", model.num_classes) != model.num_classes:
        set_num_classes(model, model_args["num_classes"])
    set_data_config(model, True)  # timm's config of the architecture, at the model's input size
    return model


def create_model(name: str, checkpoint_path: str | os.PathLike | None = None, pretrained: bool = False,
                 **model_args: Any) -> nn.Module:
    """A ViT from a preset name or any timm ViT name, as timm's `create_model`: randomly initialised,
    with timm's pretrained weights (`pretrained`, timm names only, downloaded from the hub), or with
    the weights of `checkpoint_path` (.safetensors, or .pth/.pt read with weights_only).

    Keyword arguments override the preset's (e.g. `num_classes`, `in_chans`, `img_size`); each is
    checked and the model's size is bounded before any memory is allocated. A timm checkpoint is
    adapted to them as timm adapts pretrained weights; a preset's checkpoint must fit it exactly,
    but for its class count (another count gets a new classifier, `reset_classifier`).
    A model with pretrained or timm-checkpoint weights keeps timm's preprocessing of its
    architecture (`models.preprocess`); any other starts plain, its normalisation still unknown.
    """
    if pretrained and checkpoint_path is not None:
        raise ConfigError("pass either pretrained (timm's hub weights) or a checkpoint file, not both")
    if pretrained:
        model = build_pretrained(name, **model_args)
        set_data_config(model, True)
        return model
    if checkpoint_path is not None and name not in PRESETS:
        return _from_timm_checkpoint(name, Path(checkpoint_path), model_args)
    model = build_model(name, **model_args)
    if checkpoint_path is not None:
        state = _read_state(Path(checkpoint_path))
        head = state.get("head.weight")
        if head is not None and head.ndim == 2 and head.shape[0] != model.num_classes:
            # Trained for another class count: load its classifier, then reset it, as timm does.
            wanted = model.num_classes
            model = build_model(name, **{**model_args, "num_classes": int(head.shape[0])})
            _load_strict(model, state, Path(checkpoint_path))
            set_num_classes(model, wanted)
        else:
            _load_strict(model, state, Path(checkpoint_path))
    set_plain(model)
    return model


def resolve_model(spec: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                  pretrained: bool = False, **model_args: Any) -> nn.Module:
    """What the commands do with a user's model argument: `load` an artifact directory, or
    `create_model` a preset / timm name (randomly initialised, pretrained, or with `checkpoint`)."""
    path = Path(spec)
    if pretrained and path.is_dir():
        raise ConfigError(f"{spec} is an artifact, which carries its own weights; pretrained weights "
                          "are for a timm model name")
    if checkpoint is not None:
        return create_model(str(spec), checkpoint, pretrained, **model_args)
    if path.is_dir():
        if model_args:
            raise ConfigError(f"{spec} is an artifact whose config.json fixes the model; "
                              f"{', '.join(sorted(model_args))} cannot be changed for it")
        return load(path)
    if path.exists():
        raise ConfigError(f"{spec} is a file; pass an artifact directory, a preset or a timm model "
                          "name (a checkpoint file goes with --checkpoint)")
    if "/" in str(spec) or path.suffix in (".safetensors", ".pth", ".pt", ".onnx"):
        raise ArtifactError(f"{spec} does not exist")
    return create_model(str(spec), pretrained=pretrained, **model_args)


def is_compact(model: nn.Module) -> bool:
    return block_specs(model) is not None
