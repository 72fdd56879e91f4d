"""Physical compaction: rebuild each block with only its kept heads and neurons.

The result is still a timm `VisionTransformer`; its function equals the masked model's. A removed
unit whose incoming weights are masked but whose outgoing weights are not still adds a constant
(its bias through the outgoing weights); that constant is folded into the next bias.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .accounting import count
from .errors import MaskError
from .models.adapter import BlockLayout, vit_layout
from .models.blocks import BlockShape, CompactBlock, resize_blocks
from .models.layers import ConstantBranch
from .models.record import get_record, set_record
from .masks import PruneMasks, UnitState, head_view


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
    The copy's record (`get_record`) gains its compact blocks, the structure kept (when the masks
    are quasi-structured) and the dense model's accounting (without token merging); a model that
    merges tokens gives a copy that merges them alike.
    """
    if masks is None:
        masks = PruneMasks.from_weights(model)
    masks.check_model(model)
    layout = masks.layout
    blocks, new_weights = [], {}
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
        blocks.append(CompactBlock(BlockShape(num_heads, block.head_dim, hidden), proj_bias, fc2_bias))
    small = copy.deepcopy(model)  # the record comes along: architecture, arguments, preprocessing
    resize_blocks(small, blocks)
    state = small.state_dict()
    for name, value in new_weights.items():
        state[name] = value.clone()
    small.load_state_dict(state, strict=True)
    quasi = all(s is None or bool(s.whole.all()) for pair in states for s in pair)
    structure = masks.structure() if quasi else None
    record = get_record(model)
    set_record(small, blocks=tuple(blocks), structure=structure.to_dict() if structure is not None else None,
               dense=record.dense if record.is_compact else count(model, merged=False).to_dict())
    vit_layout(small)
    return small
