"""`build_model`: the one place a model is built, from `(architecture, model_args[, blocks])`.

As timm's `build_model_with_cfg`: `vitcompact.create_model` (names, checkpoints, hub weights) and
`vitcompact.load` (artifacts) both come here, so every model is checked the same way, bounded in
size before memory is allocated, and leaves with its `ModelRecord`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping, Sequence
from urllib.error import URLError

import timm
import torch
import torch.nn as nn
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import LocalEntryNotFoundError
from timm.models import is_model_pretrained, split_model_name_tag

from ..errors import ConfigError, one_line
from .args import MAX_PARAMS, check_model_args
from .blocks import CompactBlock, resize_blocks
from .presets import PRESETS
from .preprocess import PLAIN, set_data_config
from .record import ModelRecord, get_record, set_record


def _check_architecture(architecture: str) -> None:
    base, tag = split_model_name_tag(architecture)  # a timm name may carry a pretrained tag: `arch.tag`
    if not timm.is_model(base):
        raise ConfigError(f"unknown model {architecture!r}: not a preset ({', '.join(PRESETS.names())}) "
                          "nor a timm model name")
    if tag and not is_model_pretrained(architecture):
        raise ConfigError(f"timm has no pretrained tag {tag!r} for {base}; see timm.list_pretrained('{base}*')")


def _timm_model(architecture: str, args: dict[str, Any], device: str | torch.device | None) -> nn.Module:
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return timm.create_model(architecture, pretrained=False, **args)
    except (TypeError, ValueError, AssertionError) as e:  # timm's own checks of its arguments
        raise ConfigError(f"bad model argument for {architecture}: {e}") from None


def _check_size(name: str, skeleton: nn.Module) -> None:
    """Refuse a model without patches or with more than `MAX_PARAMS` parameters (a meta skeleton:
    its shapes are known before any memory is allocated)."""
    patch_embed = getattr(skeleton, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "num_patches", 1) < 1:
        raise ConfigError(f"{name}: the image {tuple(patch_embed.img_size)} is smaller than one patch "
                          f"{tuple(patch_embed.patch_size)}; check img_size and patch_size")
    params = sum(p.numel() for p in skeleton.parameters())
    if params > MAX_PARAMS:
        raise ConfigError(f"{name} with these arguments would have {params:,} parameters, more than "
                          f"the {MAX_PARAMS:,} vitcompact builds; check the model arguments")


def _download_error(name: str, error: OSError) -> ConfigError:
    """The one-line error for a failed download: offline (no network, or HF_HUB_OFFLINE) or not
    (e.g. a gated repository), with the innermost reason."""
    chain = [error]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)
    reason = "HF_HUB_OFFLINE is set" if hub_constants.is_offline_mode() else one_line(chain[-1])
    fix = "pass a local checkpoint instead (checkpoint_path / --checkpoint FILE)"
    if any(isinstance(e, (LocalEntryNotFoundError, ConnectionError, TimeoutError, URLError)) for e in chain):
        return ConfigError(f"the pretrained weights for {name} could not be downloaded: the machine "
                           f"appears offline ({reason}); {fix}")
    return ConfigError(f"the pretrained weights for {name} could not be downloaded ({reason}); {fix}")


def _pretrained(architecture: str, args: dict[str, Any]) -> nn.Module:
    """timm's model with its hub weights (downloaded, or from the hub's cache): a different
    `num_classes` gets a new classifier, a different `img_size` or `in_chans` adapted weights."""
    if not is_model_pretrained(architecture):
        raise ConfigError(f"timm has no pretrained weights for {architecture}; pass a local checkpoint "
                          "(checkpoint_path / --checkpoint FILE)")
    try:
        return timm.create_model(architecture, pretrained=True, **args)
    except OSError as e:  # huggingface_hub's and urllib's download errors are all OSErrors
        raise _download_error(architecture, e) from None
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:  # weights that do not fit the arguments
        raise ConfigError(f"the pretrained weights for {architecture} do not fit these model arguments: "
                          f"{one_line(e)}") from None


def build_model(architecture: str, model_args: Mapping[str, Any], blocks: Sequence[CompactBlock] | None = None,
                *, preset: str | None = None, pretrained: bool = False, timm_weights: bool = False,
                device: str | torch.device | None = None) -> nn.Module:
    """A timm model of `architecture` built with `model_args`, resized to the compact `blocks` when
    given, on `device` ("meta": shapes only, no memory, no RNG), with its `ModelRecord`.

    The arguments are checked and the model's size is bounded on the meta device first. Weights
    are random, or timm's hub weights with `pretrained`. A model for timm's weights (`pretrained`,
    or `timm_weights`: a timm checkpoint the caller loads) knows timm's preprocessing of its
    architecture; any other starts with the plain one (`models.preprocess`).
    """
    _check_architecture(architecture)
    args = check_model_args(dict(model_args))
    skeleton = _timm_model(architecture, args, "meta")
    _check_size(preset or architecture, skeleton)
    if pretrained:
        model = _pretrained(architecture, args)
        args = {**args, "num_classes": model.num_classes}
    elif device is not None and torch.device(device).type == "meta":
        model = skeleton  # already built, and checked
    else:
        model = _timm_model(architecture, args, device)
    if blocks is not None:
        resize_blocks(model, blocks)
    set_record(model, ModelRecord(architecture, args, preset, blocks))
    known = pretrained or timm_weights
    set_data_config(model, known, **({} if known else PLAIN))
    return model


def set_num_classes(model: nn.Module, num_classes: int) -> None:
    """Give `model` a new, randomly initialised classifier for `num_classes` classes (timm's
    `reset_classifier`), and record the new count so the model saves and rebuilds with it."""
    model.reset_classifier(num_classes)
    record = get_record(model)
    if record.architecture is not None:
        set_record(model, model_args={**record.model_args, "num_classes": num_classes})
