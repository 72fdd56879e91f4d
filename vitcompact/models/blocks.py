"""Block shapes: how many heads and MLP neurons a transformer block has, and resizing a block to one.

`BlockShape` is the one spelling of "heads and width per block": the layout of a model, the kept
part of a structure, the accounting and a compact block's modules all use it. `CompactBlock` adds
what rebuilding a compact block needs beyond its shape (whether a removed branch left a constant),
and is what an artifact's `config.json` lists per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch.nn as nn

from ..errors import MaskError
from .layers import ConstantBranch


@dataclass(frozen=True)
class BlockShape:
    """`num_heads` attention heads of `head_dim` each and an MLP `hidden` neurons wide."""

    num_heads: int
    head_dim: int
    hidden: int

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim

    def __iter__(self) -> Iterator[int]:
        # Unpacks as (heads, MLP width), the pair a latency table is indexed by: head_dim is the
        # same in every block of a model, so the table keeps it once.
        return iter((self.num_heads, self.hidden))


class ShapedBlock:
    """`num_heads`, `head_dim`, `hidden` and `attn_dim` read off the block's `shape`, for the types
    that describe a block around its shape (its layout, its kept structure)."""

    shape: BlockShape

    @property
    def num_heads(self) -> int:
        return self.shape.num_heads

    @property
    def head_dim(self) -> int:
        return self.shape.head_dim

    @property
    def hidden(self) -> int:
        return self.shape.hidden

    @property
    def attn_dim(self) -> int:
        return self.shape.attn_dim


@dataclass(frozen=True)
class CompactBlock:
    """One block of a compact model: enough to rebuild its modules before loading weights."""

    shape: BlockShape
    proj_bias: bool  # with no heads left: whether the constant attention branch is nonzero
    fc2_bias: bool   # with no neurons left: whether the constant MLP branch is nonzero

    def to_dict(self) -> dict[str, Any]:
        """The entry of `vitcompact.blocks` in config.json (head_dim is the dense model's)."""
        return {"num_heads": self.shape.num_heads, "hidden": self.shape.hidden,
                "proj_bias": self.proj_bias, "fc2_bias": self.fc2_bias}

    @classmethod
    def from_dict(cls, d: dict[str, Any], head_dim: int) -> "CompactBlock":
        return cls(BlockShape(int(d["num_heads"]), head_dim, int(d["hidden"])),
                   bool(d["proj_bias"]), bool(d["fc2_bias"]))


def _linear(in_f: int, out_f: int, bias: bool, like: nn.Linear) -> nn.Linear:
    return nn.Linear(in_f, out_f, bias=bias, device=like.weight.device, dtype=like.weight.dtype)


def resize_block(block: nn.Module, compact: CompactBlock) -> None:
    """Replace the block's attention and MLP modules with ones of the compact sizes (in place)."""
    shape, attn = compact.shape, block.attn
    if not isinstance(attn, ConstantBranch):
        dim = attn.qkv.in_features
        if shape.num_heads == 0:
            block.attn = ConstantBranch(dim, compact.proj_bias).to(attn.qkv.weight.device)
            block.norm1 = nn.Identity()  # the constant branch ignores its input
        else:
            attn_dim = shape.num_heads * attn.head_dim
            attn.qkv = _linear(dim, 3 * attn_dim, attn.qkv.bias is not None, attn.qkv)
            attn.proj = _linear(attn_dim, attn.proj.out_features, compact.proj_bias, attn.proj)
            attn.num_heads, attn.attn_dim = shape.num_heads, attn_dim
    mlp = block.mlp
    if not isinstance(mlp, ConstantBranch):
        dim = mlp.fc1.in_features
        if shape.hidden == 0:
            block.mlp = ConstantBranch(dim, compact.fc2_bias).to(mlp.fc1.weight.device)
            block.norm2 = nn.Identity()
        else:
            mlp.fc1 = _linear(dim, shape.hidden, mlp.fc1.bias is not None, mlp.fc1)
            mlp.fc2 = _linear(shape.hidden, mlp.fc2.out_features, compact.fc2_bias, mlp.fc2)


def resize_blocks(model: nn.Module, blocks: Sequence[CompactBlock]) -> nn.Module:
    """Give a freshly built dense model the compact shapes (weights are loaded afterwards)."""
    if len(blocks) != len(model.blocks):
        raise MaskError(f"{len(blocks)} compact blocks for a model with {len(model.blocks)} blocks")
    for block, compact in zip(model.blocks, blocks):
        resize_block(block, compact)
    return model
