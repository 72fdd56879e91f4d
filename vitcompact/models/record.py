"""`ModelRecord`: what vitcompact knows about a model beyond its modules, kept on the model.

One attribute, `model.vitcompact_cfg`, as timm keeps `model.pretrained_cfg`: how to rebuild the
model (architecture, arguments, preset), its compact block shapes and structure, the dense model's
accounting, whether its preprocessing is known, and its token merging setting. `save` writes it to
`config.json`, `load` and the builder set it, `compact` extends it, `merge_tokens` sets its merging;
nothing else sets attributes on a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch.nn as nn

from .blocks import CompactBlock
from .merge_config import TokenMergeConfig


RECORD_ATTR = "vitcompact_cfg"


@dataclass(frozen=True)
class ModelRecord:
    """A model's record; replaced as a whole (`set_record`), never changed in place."""

    architecture: str | None = None  # timm architecture; None: not built by vitcompact, cannot be saved
    model_args: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    blocks: tuple[CompactBlock, ...] | None = None  # each block's compact shape; None for a dense model
    structure: dict[str, Any] | None = None  # kept heads and neurons (Structure.to_dict()), when quasi-structured
    dense: dict[str, Any] | None = None      # accounting of the dense model (Count.to_dict()), for a compact one
    preprocessing_known: bool = False        # see `models.preprocess`
    token_merge: TokenMergeConfig | None = None  # set by `merge_tokens`; None: the model merges no tokens

    @property
    def is_compact(self) -> bool:
        return self.blocks is not None

    def source(self) -> dict[str, Any] | None:
        """How to rebuild the model, as config.json and the ONNX metadata write it; None when unknown."""
        if self.architecture is None:
            return None
        return {"architecture": self.architecture, "model_args": dict(self.model_args), "preset": self.preset}


def get_record(model: nn.Module) -> ModelRecord:
    """The model's record; an empty one for a model vitcompact did not build."""
    return getattr(model, RECORD_ATTR, None) or ModelRecord()


def set_record(model: nn.Module, record: ModelRecord | None = None, **changes: Any) -> ModelRecord:
    """Give `model` `record` (default: its current one) with `changes` to its fields."""
    record = replace(record if record is not None else get_record(model), **changes)
    # Own copies, so that no two models share (and one cannot change) the other's arguments.
    record = replace(record, model_args=dict(record.model_args),
                     blocks=tuple(record.blocks) if record.blocks is not None else None,
                     token_merge=replace(record.token_merge) if record.token_merge is not None else None)
    setattr(model, RECORD_ATTR, record)  # a plain attribute: copied by deepcopy, never in the state dict
    return record


def is_compact(model: nn.Module) -> bool:
    """Whether `model` is a compact model (built by `compact`, or loaded from a compact artifact)."""
    return get_record(model).is_compact
