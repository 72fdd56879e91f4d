"""Named model presets: a name for a timm architecture with its constructor arguments."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..registry import Registry


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


def resolve_name(name: str, model_args: dict[str, Any]) -> tuple[str, dict[str, Any], str | None]:
    """The timm architecture, constructor arguments and preset (None for a timm name) that `name`
    stands for; `model_args` override a preset's. The arguments are checked by the builder."""
    if name in PRESETS:
        preset = PRESETS.get(name)
        return preset.architecture, {**preset.model_args, **model_args}, name
    return name, dict(model_args), None
