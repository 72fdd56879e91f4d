"""Parameters and multiply-accumulates (attention matmuls included), per block and in total."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch.nn as nn

from .errors import ConfigError
from .models.adapter import BlockLayout, ViTLayout, vit_layout
from .models.blocks import BlockShape
from .structure import Structure


@dataclass
class BlockCount:
    index: int
    heads: int
    neurons: int
    params: int
    macs: int


@dataclass
class Count:
    """Per-image MACs and parameter counts; `other_*` are the parts outside the blocks."""

    blocks: list[BlockCount] = field(default_factory=list)
    other_params: int = 0
    other_macs: int = 0

    @property
    def params(self) -> int:
        return self.other_params + sum(b.params for b in self.blocks)

    @property
    def macs(self) -> int:
        return self.other_macs + sum(b.macs for b in self.blocks)

    @property
    def heads(self) -> int:
        return sum(b.heads for b in self.blocks)

    @property
    def neurons(self) -> int:
        return sum(b.neurons for b in self.blocks)

    def to_dict(self) -> dict:
        return {"params": self.params, "macs": self.macs, "heads": self.heads,
                "neurons": self.neurons, **asdict(self)}


def block_cost(block: BlockLayout, shape: BlockShape, dim: int, tokens: int) -> BlockCount:
    """Exact parameters and MACs of `block` at `shape` (its own, or a pruned one)."""
    attn_dim = shape.attn_dim
    params = (block.fixed_params
              + attn_dim * (3 * dim + (3 if block.qkv_bias else 0))   # qkv
              + attn_dim * dim                                         # proj weight
              + shape.hidden * (dim + (1 if block.fc1_bias else 0))    # fc1
              + shape.hidden * dim)                                    # fc2 weight
    macs = (tokens * dim * 3 * attn_dim          # qkv
            + 2 * tokens * tokens * attn_dim     # q @ k^T and attn @ v
            + tokens * attn_dim * dim            # proj
            + 2 * tokens * dim * shape.hidden)   # fc1 and fc2
    return BlockCount(block.index, shape.num_heads, shape.hidden, params, macs)


def _count(layout: ViTLayout, shapes: list[BlockShape]) -> Count:
    blocks = [block_cost(b, s, layout.embed_dim, layout.num_tokens) for b, s in zip(layout.blocks, shapes)]
    return Count(blocks, layout.extra_params, layout.extra_macs)


def count(obj: nn.Module | Structure) -> Count:
    """Params and MACs of a model (exact), or of the model a structure describes."""
    if isinstance(obj, Structure):
        if obj.layout is None:
            raise ConfigError("this structure carries no model layout; derive it from masks "
                              "(masks.structure()) to count it")
        return _count(obj.layout, obj.shape())
    layout = vit_layout(obj)
    return _count(layout, [b.shape for b in layout.blocks])
