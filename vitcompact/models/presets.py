"""Named model presets and `build_model`, the one door for building a ViT (`build_pretrained` with
timm's hub weights; `vitcompact.create_model` adds a local checkpoint on top)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any
from urllib.error import URLError

import timm
import torch
import torch.nn as nn
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import LocalEntryNotFoundError
from timm.models import is_model_pretrained, split_model_name_tag

from ..errors import ConfigError, UnsupportedModelError, one_line
from ..registry import Registry
from .args import MAX_PARAMS, check_model_args

SOURCE_ATTR = "vitcompact_source"


@dataclass(frozen=True)
class Preset:
    """A plain timm VisionTransformer configuration: a timm architecture plus constructor args."""

    architecture: str
    model_args: dict[str, Any] = field(default_factory=dict)
    description: str = ""


PRESETS: Registry[Preset] = Registry("preset")

PRESETS.register("vit-cifar-tiny")(Preset(
    "vit_tiny_patch16_224",
    dict(img_size=32, patch_size=4, embed_dim=192, depth=9, num_heads=3, mlp_ratio=2.0, num_classes=10),
    "ViT-Tiny of the RSST research code: 32 px, patch 4, 192 wide, 9 blocks, 3 heads, MLP x2",
))
PRESETS.register("vit-cifar-small")(Preset(
    "vit_small_patch16_224",
    dict(img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, num_classes=10),
    "32 px, patch 4, 384 wide, 12 blocks, 6 heads, MLP x4",
))
PRESETS.register("vit-digits")(Preset(
    "vit_tiny_patch16_224",
    dict(img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
         num_classes=10),
    "for 8x8 digits: patch 2, 64 wide, 4 blocks, 4 heads of 16, MLP x2 (the demo model)",
))
PRESETS.register("vit-fashion-tiny")(Preset(
    "vit_tiny_patch16_224",
    dict(img_size=28, patch_size=4, in_chans=1, embed_dim=192, depth=9, num_heads=3, mlp_ratio=2.0,
         num_classes=10),
    "vit-cifar-tiny sized, one input channel, 28 px (Fashion-MNIST / MNIST)",
))


def _resolve(name: str, model_args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The timm architecture and the checked constructor arguments `name` stands for."""
    if name in PRESETS:
        preset = PRESETS.get(name)
        architecture, args = preset.architecture, {**preset.model_args, **model_args}
    else:
        architecture, args = name, dict(model_args)
        base, tag = split_model_name_tag(name)  # a timm name may carry a pretrained tag: `arch.tag`
        if base not in timm.list_models():
            known = ", ".join(PRESETS.names())
            raise ConfigError(f"unknown model {name!r}: not a preset ({known}) nor a timm model name")
        if tag and not is_model_pretrained(name):
            raise ConfigError(f"timm has no pretrained tag {tag!r} for {base}; see "
                              f"timm.list_pretrained('{base}*')")
    args.pop("pretrained", None)
    return architecture, check_model_args(args)


def _build(architecture: str, args: dict[str, Any], device: str | None = None) -> nn.Module:
    try:
        with torch.device(device) if device else contextlib.nullcontext():
            return timm.create_model(architecture, pretrained=False, **args)
    except (TypeError, ValueError, AssertionError) as e:  # timm's own checks of its arguments
        raise ConfigError(f"bad model argument for {architecture}: {e}") from None


def model_skeleton(name: str, **model_args: Any) -> nn.Module:
    """The model `create_model` would build, on the meta device: its shapes, no memory, no RNG.

    Refuses arguments that would build a model without patches or with more than `MAX_PARAMS`
    parameters.
    """
    architecture, args = _resolve(name, model_args)
    skeleton = _build(architecture, args, device="meta")
    patch_embed = getattr(skeleton, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "num_patches", 1) < 1:
        raise ConfigError(f"{name}: the image {tuple(patch_embed.img_size)} is smaller than one patch "
                          f"{tuple(patch_embed.patch_size)}; check img_size and patch_size")
    params = sum(p.numel() for p in skeleton.parameters())
    if params > MAX_PARAMS:
        raise ConfigError(f"{name} with these arguments would have {params:,} parameters, more than "
                          f"the {MAX_PARAMS:,} vitcompact builds; check the model arguments")
    set_source(skeleton, architecture, args, preset=name if name in PRESETS else None)
    return skeleton


def build_model(name: str, **model_args: Any) -> nn.Module:
    """A randomly initialised ViT from a preset name or any timm ViT name (`vitcompact.create_model`
    adds a checkpoint). Keyword arguments override the preset's; each is checked and the model's
    size is bounded (`model_skeleton`) before any memory is allocated."""
    source = get_source(model_skeleton(name, **model_args))
    model = _build(source["architecture"], source["model_args"])
    set_source(model, source["architecture"], source["model_args"], source["preset"])
    return model


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


def build_pretrained(name: str, **model_args: Any) -> nn.Module:
    """A timm ViT with timm's pretrained weights for `name` (downloaded, or from the hub's cache), as
    `timm.create_model(name, pretrained=True)`: a different `num_classes` gets a new classifier, a
    different `img_size` or `in_chans` adapted weights. The model rebuilds without the hub."""
    if name in PRESETS:
        raise ConfigError(f"{name} is a vitcompact preset, which has no pretrained weights on the hub; "
                          "pass a timm model name, or a local checkpoint (checkpoint_path / --checkpoint FILE)")
    source = get_source(model_skeleton(name, **model_args))
    architecture, args = source["architecture"], source["model_args"]
    if not is_model_pretrained(architecture):
        raise ConfigError(f"timm has no pretrained weights for {architecture}; pass a local checkpoint "
                          "(checkpoint_path / --checkpoint FILE)")
    try:
        model = timm.create_model(architecture, pretrained=True, **args)
    except OSError as e:  # huggingface_hub's and urllib's download errors are all OSErrors
        raise _download_error(name, e) from None
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:  # weights that do not fit the arguments
        raise ConfigError(f"the pretrained weights for {name} do not fit these model arguments: "
                          f"{one_line(e)}") from None
    set_source(model, architecture, {**args, "num_classes": model.num_classes})
    return model


def set_source(model: nn.Module, architecture: str, model_args: dict[str, Any], preset: str | None = None) -> None:
    """Remember how to rebuild `model` (timm architecture and constructor args) for saving."""
    setattr(model, SOURCE_ATTR, {"architecture": architecture, "model_args": dict(model_args), "preset": preset})


def get_source(model: nn.Module) -> dict[str, Any]:
    source = getattr(model, SOURCE_ATTR, None)
    if source is None:
        raise UnsupportedModelError(
            "model has no recorded architecture; build it with vitcompact.create_model or "
            "vitcompact.load so it can be saved and rebuilt")
    return source


def set_num_classes(model: nn.Module, num_classes: int) -> None:
    """Give `model` a new, randomly initialised classifier for `num_classes` classes (timm's
    `reset_classifier`), and record the new count so the model saves and rebuilds with it."""
    model.reset_classifier(num_classes)
    source = getattr(model, SOURCE_ATTR, None)
    if source is not None:
        source["model_args"]["num_classes"] = num_classes
