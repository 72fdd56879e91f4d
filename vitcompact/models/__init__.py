"""Models: adapters, block shapes, the record a model carries, presets and the one builder."""

from .adapter import BlockLayout, ViTLayout, check_vit, input_size, prunable_weights, unit_weights, vit_layout
from .blocks import BlockShape, CompactBlock, resize_blocks
from .layers import ConstantBranch
from .record import ModelRecord, get_record, is_compact, set_record
from .presets import PRESETS, Preset, resolve_name
from .builder import build_model, set_num_classes

__all__ = [
    "BlockLayout", "ViTLayout", "check_vit", "input_size", "prunable_weights", "unit_weights", "vit_layout",
    "BlockShape", "CompactBlock", "resize_blocks", "ConstantBranch", "ModelRecord", "get_record", "is_compact",
    "set_record", "PRESETS", "Preset", "resolve_name", "build_model", "set_num_classes",
]
