"""Find heads and neurons in a timm VisionTransformer; refuse layouts we cannot prune exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from ..errors import UnsupportedModelError
from .blocks import BlockShape, ShapedBlock
from .layers import ConstantBranch


@dataclass(frozen=True)
class BlockLayout(ShapedBlock):
    """One transformer block as the pruning core sees it: its shape and what else it holds."""

    index: int
    shape: BlockShape
    qkv_bias: bool
    fc1_bias: bool
    fixed_params: int

    @property
    def name(self) -> str:
        return f"blocks.{self.index}"

    def weight_names(self) -> list[str]:
        """Names of the prunable weights this block still has (a removed branch has none)."""
        names = []
        if self.num_heads:
            names += [f"{self.name}.attn.qkv.weight", f"{self.name}.attn.proj.weight"]
        if self.hidden:
            names += [f"{self.name}.mlp.fc1.weight", f"{self.name}.mlp.fc2.weight"]
        return names

    def to_dict(self) -> dict[str, Any]:
        # Flat, in this order: the layout is stored in mask files and config.json as it always was.
        return {"index": self.index, "num_heads": self.num_heads, "head_dim": self.head_dim,
                "hidden": self.hidden, "qkv_bias": self.qkv_bias, "fc1_bias": self.fc1_bias,
                "fixed_params": self.fixed_params}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BlockLayout":
        return cls(d["index"], BlockShape(d["num_heads"], d["head_dim"], d["hidden"]), d["qkv_bias"],
                   d["fc1_bias"], d["fixed_params"])


@dataclass(frozen=True)
class ViTLayout:
    """Everything about a ViT that masks, structures and accounting need, without the weights."""

    embed_dim: int
    num_tokens: int
    extra_params: int
    extra_macs: int
    blocks: tuple[BlockLayout, ...]

    def weight_names(self) -> list[str]:
        return [n for b in self.blocks for n in b.weight_names()]

    def to_dict(self) -> dict[str, Any]:
        return {"embed_dim": self.embed_dim, "num_tokens": self.num_tokens, "extra_params": self.extra_params,
                "extra_macs": self.extra_macs, "blocks": [b.to_dict() for b in self.blocks]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ViTLayout":
        return cls(**{**d, "blocks": tuple(BlockLayout.from_dict(b) for b in d["blocks"])})


def _check_attention(name: str, attn: nn.Module) -> None:
    if isinstance(attn, ConstantBranch):
        return
    if type(attn) is not Attention:
        raise UnsupportedModelError(
            f"{name} is a {type(attn).__name__}: vitcompact handles timm's fused-qkv Attention only "
            "(separate q/k/v projections, rope or pooled attention are not supported)")
    if not isinstance(attn.qkv, nn.Linear) or not isinstance(attn.proj, nn.Linear):
        raise UnsupportedModelError(f"{name}: qkv and proj must be nn.Linear layers")
    if attn.gate is not None or not isinstance(attn.norm, nn.Identity):
        raise UnsupportedModelError(
            f"{name} uses a gate or scale-norm across heads, which couples heads; not supported")


def _check_mlp(name: str, mlp: nn.Module) -> None:
    if isinstance(mlp, ConstantBranch):
        return
    if type(mlp) is not Mlp:
        raise UnsupportedModelError(
            f"{name} is a {type(mlp).__name__}: vitcompact handles timm's two-layer Mlp only "
            "(gated MLPs such as SwiGLU are not supported)")
    if not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
        raise UnsupportedModelError(f"{name}: fc1 and fc2 must be nn.Linear layers")
    if not isinstance(mlp.norm, nn.Identity):
        raise UnsupportedModelError(f"{name} normalises across neurons (scale_mlp_norm); not supported")


def check_vit(model: nn.Module) -> VisionTransformer:
    """Raise UnsupportedModelError naming the first module we cannot handle."""
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"model is a {type(model).__name__}, not a timm VisionTransformer; vitcompact prunes "
            "ViT blocks with fused qkv attention and a two-layer MLP")
    for i, block in enumerate(model.blocks):
        if type(block) is not Block:
            raise UnsupportedModelError(
                f"blocks.{i} is a {type(block).__name__} (parallel or custom block); vitcompact "
                "handles timm pre-norm Block only")
        _check_attention(f"blocks.{i}.attn", block.attn)
        _check_mlp(f"blocks.{i}.mlp", block.mlp)
    return model


def _block_layout(index: int, block: nn.Module, head_dim_hint: int) -> BlockLayout:
    attn, mlp = block.attn, block.mlp
    if isinstance(attn, ConstantBranch):
        num_heads, head_dim, qkv_bias, attn_unit_params = 0, head_dim_hint, False, 0
    else:
        num_heads, head_dim = attn.num_heads, attn.head_dim
        qkv_bias = attn.qkv.bias is not None
        attn_unit_params = attn.qkv.weight.numel() + attn.proj.weight.numel()
        attn_unit_params += attn.qkv.bias.numel() if qkv_bias else 0
    if isinstance(mlp, ConstantBranch):
        hidden, fc1_bias, mlp_unit_params = 0, False, 0
    else:
        hidden, fc1_bias = mlp.fc1.out_features, mlp.fc1.bias is not None
        mlp_unit_params = mlp.fc1.weight.numel() + mlp.fc2.weight.numel()
        mlp_unit_params += mlp.fc1.bias.numel() if fc1_bias else 0
    total = sum(p.numel() for p in block.parameters())
    return BlockLayout(index, BlockShape(num_heads, head_dim, hidden), qkv_bias, fc1_bias,
                       total - attn_unit_params - mlp_unit_params)


def num_tokens(model: VisionTransformer) -> int:
    return model.patch_embed.num_patches + model.num_prefix_tokens


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """The image a ViT takes, as (channels, height, width), from its patch embedding."""
    height, width = model.patch_embed.img_size
    return model.patch_embed.proj.in_channels, int(height), int(width)


def vit_layout(model: nn.Module) -> ViTLayout:
    """Describe the blocks (heads, head_dim, neurons) of a supported ViT."""
    check_vit(model)
    head_dims = [b.attn.head_dim for b in model.blocks if not isinstance(b.attn, ConstantBranch)]
    head_dim_hint = head_dims[0] if head_dims else model.embed_dim
    blocks = tuple(_block_layout(i, b, head_dim_hint) for i, b in enumerate(model.blocks))
    block_params = sum(p.numel() for p in model.blocks.parameters())
    extra_params = sum(p.numel() for p in model.parameters()) - block_params
    pe = model.patch_embed.proj
    extra_macs = model.patch_embed.num_patches * pe.weight.numel()
    if isinstance(model.head, nn.Linear):
        extra_macs += model.head.weight.numel()
    return ViTLayout(model.embed_dim, num_tokens(model), extra_params, extra_macs, blocks)


def unit_weights(model: nn.Module, block: BlockLayout) -> dict[str, nn.Parameter]:
    """The prunable weight parameters of one block, by full name."""
    b = model.blocks[block.index]
    out = {}
    if block.num_heads:
        out[f"{block.name}.attn.qkv.weight"] = b.attn.qkv.weight
        out[f"{block.name}.attn.proj.weight"] = b.attn.proj.weight
    if block.hidden:
        out[f"{block.name}.mlp.fc1.weight"] = b.mlp.fc1.weight
        out[f"{block.name}.mlp.fc2.weight"] = b.mlp.fc2.weight
    return out


def prunable_weights(model: nn.Module, layout: ViTLayout | None = None) -> dict[str, nn.Parameter]:
    """All qkv/proj/fc1/fc2 weights of the model, by full parameter name."""
    layout = layout or vit_layout(model)
    return {n: p for b in layout.blocks for n, p in unit_weights(model, b).items()}
