"""Model adapters and presets."""

from .adapter import BlockLayout, ViTLayout, check_vit, input_size, prunable_weights, unit_weights, vit_layout
from .layers import ConstantBranch
from .presets import PRESETS, Preset, build_model, get_source, model_skeleton, set_source

__all__ = [
    "BlockLayout", "ViTLayout", "check_vit", "input_size", "prunable_weights", "unit_weights", "vit_layout",
    "ConstantBranch", "PRESETS", "Preset", "build_model", "get_source", "model_skeleton", "set_source",
]
