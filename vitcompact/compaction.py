"""Physical compaction: rebuild each block with only its kept heads and neurons.

The result is still a timm `VisionTransformer`; its function equals the masked model's. A removed
unit whose incoming weights are masked but whose outgoing weights are not still adds a constant
(its bias through the outgoing weights); that constant is folded into the next bias.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from .accounting import count
from .errors import MaskError
from .models.adapter import BlockLayout, vit_layout
from .models.layers import ConstantBranch
from .models.presets import SOURCE_ATTR
from .pruning.masks import PruneMasks, UnitState, head_view

COMPACT_ATTR = "vitcompact_compact"


@dataclass
class BlockSpec:
    """Shape of one compact block: enough to rebuild its modules before loading weights."""

    num_heads: int
    hidden: int
    proj_bias: bool  # with num_heads == 0: whether the constant attention branch is nonzero
    fc2_bias: bool   # with hidden == 0: whether the constant MLP branch is nonzero


@dataclass
class CompactInfo:
    """What a compact model carries beside its weights, written to and read from the artifact's
    config.json: each block's shapes, the structure kept (None when the masks were not
    quasi-structured) and the dense model's accounting (what `inspect` compares with)."""

    blocks: list[BlockSpec]
    structure: dict[str, Any] | None
    dense: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": [asdict(b) for b in self.blocks], "structure": self.structure, "dense": self.dense}


def compact_info(model: nn.Module) -> CompactInfo | None:
    """The model's CompactInfo; None for a dense model."""
    return getattr(model, COMPACT_ATTR, None)


def set_compact_info(model: nn.Module, info: CompactInfo) -> None:
    setattr(model, COMPACT_ATTR, info)


def _linear(in_f: int, out_f: int, bias: bool, like: nn.Linear) -> nn.Linear:
    return nn.Linear(in_f, out_f, bias=bias, device=like.weight.device, dtype=like.weight.dtype)


def resize_block(block: nn.Module, spec: BlockSpec) -> None:
    """Replace the block's attention and MLP modules with ones of the spec's sizes (in place)."""
    attn = block.attn
    if not isinstance(attn, ConstantBranch):
        dim = attn.qkv.in_features
        if spec.num_heads == 0:
            block.attn = ConstantBranch(dim, spec.proj_bias).to(attn.qkv.weight.device)
            block.norm1 = nn.Identity()  # the constant branch ignores its input
        else:
            attn_dim = spec.num_heads * attn.head_dim
            attn.qkv = _linear(dim, 3 * attn_dim, attn.qkv.bias is not None, attn.qkv)
            attn.proj = _linear(attn_dim, attn.proj.out_features, spec.proj_bias, attn.proj)
            attn.num_heads, attn.attn_dim = spec.num_heads, attn_dim
    mlp = block.mlp
    if not isinstance(mlp, ConstantBranch):
        dim = mlp.fc1.in_features
        if spec.hidden == 0:
            block.mlp = ConstantBranch(dim, spec.fc2_bias).to(mlp.fc1.weight.device)
            block.norm2 = nn.Identity()
        else:
            mlp.fc1 = _linear(dim, spec.hidden, mlp.fc1.bias is not None, mlp.fc1)
            mlp.fc2 = _linear(spec.hidden, mlp.fc2.out_features, spec.fc2_bias, mlp.fc2)


def apply_block_specs(model: nn.Module, specs: list[BlockSpec]) -> nn.Module:
    """Give a freshly built dense model the compact shapes (weights are loaded afterwards)."""
    if len(specs) != len(model.blocks):
        raise MaskError(f"{len(specs)} block specs for a model with {len(model.blocks)} blocks")
    for block, spec in zip(model.blocks, specs):
        resize_block(block, spec)
    return model


def _check_units(block: BlockLayout, unit: str, state: UnitState) -> None:
    mixed = state.mixed
    if bool(mixed.any()):
        i = int(mixed.nonzero()[0])
        part = "incoming" if not bool(state.in_ones[i] | state.in_zeros[i]) else "outgoing"
        where = {"head": ("qkv rows", "proj columns"), "neuron": ("fc1 row", "fc2 column")}[unit]
        raise MaskError(f"masks are not quasi-structured: block {block.index} {unit} {i} is partly "
                        f"masked in its {where[0] if part == 'incoming' else where[1]}")


@torch.no_grad()
def _compact_attention(block: nn.Module, layout: BlockLayout, state: UnitState,
                       masks: dict[str, torch.Tensor]) -> tuple[int, bool, dict[str, torch.Tensor]]:
    attn = block.attn
    qkv_w = attn.qkv.weight * masks["qkv"].to(attn.qkv.weight.dtype)
    proj_w = attn.proj.weight * masks["proj"].to(attn.proj.weight.dtype)
    kept = state.kept.nonzero().flatten()
    # A head with masked qkv rows but live proj columns attends uniformly over constant values:
    # its output is its v bias, which reaches the residual through proj.
    folded = (state.in_zeros & state.out_ones & ~state.kept).nonzero().flatten()
    const = torch.zeros(attn.proj.out_features, dtype=proj_w.dtype, device=proj_w.device)
    if attn.proj.bias is not None:
        const += attn.proj.bias
    if attn.qkv.bias is not None and folded.numel():
        v_bias = head_view("qkv.weight", attn.qkv.bias.view(-1, 1), layout)[2, :, :, 0]
        proj_heads = head_view("proj.weight", proj_w, layout)
        const += torch.einsum("dhk,hk->d", proj_heads[:, folded], v_bias[folded])
    weights = {}
    if kept.numel():
        q = head_view("qkv.weight", qkv_w, layout)[:, kept].reshape(-1, qkv_w.shape[1])
        weights["attn.qkv.weight"] = q
        if attn.qkv.bias is not None:
            weights["attn.qkv.bias"] = head_view("qkv.weight", attn.qkv.bias.view(-1, 1), layout)[:, kept].reshape(-1)
        weights["attn.proj.weight"] = head_view("proj.weight", proj_w, layout)[:, kept].reshape(proj_w.shape[0], -1)
    return _place_constant("attn", "proj", kept.numel(), attn.proj.bias is not None, const, weights)


@torch.no_grad()
def _compact_mlp(block: nn.Module, state: UnitState,
                 masks: dict[str, torch.Tensor]) -> tuple[int, bool, dict[str, torch.Tensor]]:
    mlp = block.mlp
    fc1_w = mlp.fc1.weight * masks["fc1"].to(mlp.fc1.weight.dtype)
    fc2_w = mlp.fc2.weight * masks["fc2"].to(mlp.fc2.weight.dtype)
    kept = state.kept.nonzero().flatten()
    # A neuron with a masked fc1 row outputs act(its bias) for every token.
    folded = (state.in_zeros & state.out_ones & ~state.kept).nonzero().flatten()
    const = torch.zeros(mlp.fc2.out_features, dtype=fc2_w.dtype, device=fc2_w.device)
    if mlp.fc2.bias is not None:
        const += mlp.fc2.bias
    if mlp.fc1.bias is not None and folded.numel():
        const += fc2_w[:, folded] @ mlp.act(mlp.fc1.bias[folded])
    weights = {}
    if kept.numel():
        weights["mlp.fc1.weight"] = fc1_w[kept]
        if mlp.fc1.bias is not None:
            weights["mlp.fc1.bias"] = mlp.fc1.bias[kept]
        weights["mlp.fc2.weight"] = fc2_w[:, kept]
    return _place_constant("mlp", "fc2", kept.numel(), mlp.fc2.bias is not None, const, weights)


def _place_constant(branch: str, out_layer: str, kept: int, had_bias: bool, const: torch.Tensor,
                    weights: dict[str, torch.Tensor]) -> tuple[int, bool, dict[str, torch.Tensor]]:
    """Put a branch's constant output where the compact block keeps it: in the bias of its output
    layer, or, with no unit left, in the constant branch (none at all when it is zero)."""
    if kept:
        has_bias = had_bias or bool(const.any())
        key = f"{branch}.{out_layer}.bias"
    else:
        has_bias = bool(const.any())
        key = f"{branch}.value"
    if has_bias:
        weights[key] = const
    return kept, has_bias, weights


@torch.no_grad()
def compact(model: nn.Module, masks: PruneMasks | None = None) -> nn.Module:
    """A physically smaller copy of `model` whose function equals the masked model's.

    `masks=None` reads the masks from the zero pattern of the weights (an already-masked model).
    """
    if masks is None:
        masks = PruneMasks.from_weights(model)
    masks.check_model(model)
    layout = masks.layout
    specs, new_weights = [], {}
    states = [masks.unit_states(block) for block in layout.blocks]
    for block, pair in zip(layout.blocks, states):  # refuse before building anything
        for unit, state in zip(("head", "neuron"), pair):
            if state is not None:
                _check_units(block, unit, state)
    for block, (heads, neurons) in zip(layout.blocks, states):
        b = model.blocks[block.index]
        n = block.name
        num_heads, proj_bias = 0, isinstance(b.attn, ConstantBranch) and b.attn.value is not None
        hidden, fc2_bias = 0, isinstance(b.mlp, ConstantBranch) and b.mlp.value is not None
        if heads is not None:
            num_heads, proj_bias, w = _compact_attention(
                b, block, heads, {"qkv": masks[f"{n}.attn.qkv.weight"], "proj": masks[f"{n}.attn.proj.weight"]})
            new_weights.update({f"{n}.{k}": v for k, v in w.items()})
        if neurons is not None:
            hidden, fc2_bias, w = _compact_mlp(
                b, neurons, {"fc1": masks[f"{n}.mlp.fc1.weight"], "fc2": masks[f"{n}.mlp.fc2.weight"]})
            new_weights.update({f"{n}.{k}": v for k, v in w.items()})
        specs.append(BlockSpec(num_heads, hidden, proj_bias, fc2_bias))
    small = copy.deepcopy(model)
    apply_block_specs(small, specs)
    state = small.state_dict()
    for name, value in new_weights.items():
        state[name] = value.clone()
    small.load_state_dict(state, strict=True)
    quasi = all(s is None or bool(s.whole.all()) for pair in states for s in pair)
    structure = masks.structure() if quasi else None
    previous = compact_info(model)
    set_compact_info(small, CompactInfo(specs, structure.to_dict() if structure is not None else None,
                                        previous.dense if previous else count(model).to_dict()))
    if hasattr(model, SOURCE_ATTR):
        setattr(small, SOURCE_ATTR, copy.deepcopy(getattr(model, SOURCE_ATTR)))
    vit_layout(small)
    return small


def block_specs(model: nn.Module) -> list[BlockSpec] | None:
    info = compact_info(model)
    return list(info.blocks) if info else None
