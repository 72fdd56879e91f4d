"""Parameters and multiply-accumulates (attention matmuls included), per block and in total."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch.nn as nn

from .errors import ConfigError
from .models.adapter import BlockLayout, ViTLayout, vit_layout
from .models.blocks import BlockShape
from .models.token_merge import get_token_merge, merge_schedule, model_token_counts
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


def block_cost(block: BlockLayout, shape: BlockShape, dim: int, tokens: int,
               mlp_tokens: int | None = None) -> BlockCount:
    """Exact parameters and MACs of `block` at `shape` (its own, or a pruned one): attention on
    `tokens` tokens, the MLP on `mlp_tokens` (default `tokens`; fewer when the block merges tokens)."""
    attn_dim = shape.attn_dim
    mlp_tokens = tokens if mlp_tokens is None else mlp_tokens
    params = (block.fixed_params
              + attn_dim * (3 * dim + (3 if block.qkv_bias else 0))   # qkv
              + attn_dim * dim                                         # proj weight
              + shape.hidden * (dim + (1 if block.fc1_bias else 0))    # fc1
              + shape.hidden * dim)                                    # fc2 weight
    macs = (tokens * dim * 3 * attn_dim            # qkv
            + 2 * tokens * tokens * attn_dim       # q @ k^T and attn @ v
            + tokens * attn_dim * dim              # proj
            + 2 * mlp_tokens * dim * shape.hidden)  # fc1 and fc2
    return BlockCount(block.index, shape.num_heads, shape.hidden, params, macs)


def _count(layout: ViTLayout, shapes: list[BlockShape], tokens: list[tuple[int, int]] | None = None) -> Count:
    tokens = tokens or [(layout.num_tokens, layout.num_tokens)] * len(layout.blocks)
    blocks = [block_cost(b, s, layout.embed_dim, *t) for b, s, t in zip(layout.blocks, shapes, tokens)]
    return Count(blocks, layout.extra_params, layout.extra_macs)


def _block_tokens(model: nn.Module) -> list[tuple[int, int]] | None:
    """(attention, MLP) tokens of each block of a model that merges tokens; None when it merges none.
    The merge's own matching (a few MACs per token pair) is not counted."""
    config = get_token_merge(model)
    if config is None:
        return None
    counts = model_token_counts(model, config)
    return [(n, n - r) for n, r in zip(counts, merge_schedule(len(counts), config))]


def count(obj: nn.Module | Structure, merged: bool = True) -> Count:
    """Params and MACs of a model (exact), or of the model a structure describes.

    A model that merges tokens (`merge_tokens`) is counted on the tokens each block sees, unless
    `merged=False` (as if it merged none: the dense reference of a compact model)."""
    if isinstance(obj, Structure):
        if obj.layout is None:
            raise ConfigError("this structure carries no model layout; derive it from masks "
                              "(masks.structure()) to count it")
        return _count(obj.layout, obj.shape())
    layout = vit_layout(obj)
    return _count(layout, [b.shape for b in layout.blocks], _block_tokens(obj) if merged else None)
