"""Physical compaction: smaller modules, the same function as the masked model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, input_for, make_family
from timm.models.vision_transformer import VisionTransformer

import vitcompact as vc
from vitcompact.models import ConstantBranch
from vitcompact.pruning import PruneMasks


def remove_heads(masks: PruneMasks, block: int, heads: list[int], outgoing: bool = True) -> None:
    b = masks.layout.blocks[block]
    q = masks[f"blocks.{block}.attn.qkv.weight"].view(3, b.num_heads, b.head_dim, -1)
    p = masks[f"blocks.{block}.attn.proj.weight"].view(-1, b.num_heads, b.head_dim)
    for h in heads:
        q[:, h] = False
        if outgoing:
            p[:, h] = False


def remove_neurons(masks: PruneMasks, block: int, neurons: list[int], outgoing: bool = True) -> None:
    for j in neurons:
        masks[f"blocks.{block}.mlp.fc1.weight"][j] = False
        if outgoing:
            masks[f"blocks.{block}.mlp.fc2.weight"][:, j] = False


def scenario_masks(model, scenario: str) -> PruneMasks:
    masks = PruneMasks.ones(model)
    layout = masks.layout
    if scenario == "random":
        g = torch.Generator().manual_seed(3)
        for b in layout.blocks:
            remove_heads(masks, b.index, torch.randperm(b.num_heads, generator=g)[: b.num_heads // 2].tolist())
            remove_neurons(masks, b.index, torch.randperm(b.hidden, generator=g)[: b.hidden // 3].tolist())
    elif scenario == "no_heads":
        remove_heads(masks, 0, list(range(layout.blocks[0].num_heads)))
    elif scenario == "no_neurons":
        remove_neurons(masks, 1, list(range(layout.blocks[1].hidden)))
    elif scenario == "no_heads_no_neurons":
        remove_heads(masks, 1, list(range(layout.blocks[1].num_heads)))
        remove_neurons(masks, 1, list(range(layout.blocks[1].hidden)))
    return masks


def assert_same_function(reference, small, model_for_input) -> None:
    for batch in (1, 4):
        x = input_for(model_for_input, batch, seed=batch)
        with torch.no_grad():
            expected, got = reference(x), small(x)
        tol = 1e-5 * max(1.0, float(expected.abs().max()))
        assert float((expected - got).abs().max()) <= tol


@pytest.mark.parametrize("scenario", ["random", "no_heads", "no_neurons", "no_heads_no_neurons", "none"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_compact_equals_masked_model(family, scenario):
    model = make_family(family)
    masks = scenario_masks(model, scenario)
    masked = masks.apply_(copy.deepcopy(model)).eval()
    small = vc.compact(model, masks).eval()
    assert isinstance(small, VisionTransformer)
    assert_same_function(masked, small, model)
    structure = masks.structure()
    for block, kept in zip(small.blocks, structure.blocks):
        if kept.heads:
            assert block.attn.num_heads == len(kept.heads)
            assert block.attn.qkv.weight.shape == (3 * len(kept.heads) * kept.head_dim, model.embed_dim)
        else:
            assert isinstance(block.attn, ConstantBranch)
        if kept.neurons:
            assert block.mlp.fc1.out_features == len(kept.neurons)
        else:
            assert isinstance(block.mlp, ConstantBranch)
    assert vc.count(small).params == sum(p.numel() for p in small.parameters())
    if scenario == "none":
        assert vc.count(small).params == vc.count(model).params


def test_compact_of_vit_cifar_tiny_reference_structure():
    torch.manual_seed(0)
    model = vc.create_model("vit-cifar-tiny").eval()
    masks = vc.regroup(model, vc.magnitude_prune(model, 0.3), vc.RegroupConfig(head_ratio=0.3, mlp_ratio=0.3))
    small = vc.compact(model, masks)
    assert [b.attn.num_heads for b in small.blocks] == [2] * 9
    assert [b.mlp.fc1.out_features for b in small.blocks] == [268] * 9
    assert_same_function(masks.apply_(copy.deepcopy(model)).eval(), small.eval(), model)


def test_incoming_only_masks_fold_constants_into_the_next_bias():
    model = make_family("deit_small")  # qkv bias on, so removed heads leave a v-bias constant
    masks = PruneMasks.ones(model)
    remove_heads(masks, 0, [0, 2, 4], outgoing=False)
    remove_neurons(masks, 0, list(range(0, 1536, 2)), outgoing=False)
    remove_heads(masks, 1, list(range(6)), outgoing=False)
    remove_neurons(masks, 1, list(range(1536)), outgoing=False)
    masked = masks.apply_(copy.deepcopy(model)).eval()
    small = vc.compact(model, masks).eval()
    assert small.blocks[0].attn.num_heads == 3 and small.blocks[0].mlp.fc1.out_features == 768
    assert isinstance(small.blocks[1].attn, ConstantBranch) and small.blocks[1].attn.value is not None
    assert isinstance(small.blocks[1].mlp, ConstantBranch) and small.blocks[1].mlp.value is not None
    assert not torch.equal(small.blocks[0].attn.proj.bias, model.blocks[0].attn.proj.bias)
    assert_same_function(masked, small, model)


def test_removed_branch_with_zero_constant_has_no_parameters():
    torch.manual_seed(0)
    model = vc.create_model("vit-digits", depth=2).eval()  # timm initialises biases to zero
    masks = PruneMasks.ones(model)
    remove_heads(masks, 0, list(range(4)))
    remove_neurons(masks, 0, list(range(128)))
    small = vc.compact(model, masks)
    assert small.blocks[0].attn.value is None and small.blocks[0].mlp.value is None
    assert sum(p.numel() for p in small.blocks[0].parameters()) == 0
    assert_same_function(masks.apply_(copy.deepcopy(model)).eval(), small.eval(), model)


def test_compacting_twice_keeps_the_function():
    model = make_family("vit_tiny")
    first = scenario_masks(model, "no_heads")
    small = vc.compact(model, first)
    again = vc.regroup(small, PruneMasks.ones(small), vc.RegroupConfig(head_ratio=0.5, mlp_ratio=0.5))
    smaller = vc.compact(small, again).eval()
    assert vc.get_record(smaller).dense["params"] == vc.count(model).params
    assert_same_function(again.apply_(copy.deepcopy(small)).eval(), smaller, model)


def test_masks_that_are_not_quasi_structured_are_refused():
    model = make_family("vit_tiny")
    masks = PruneMasks.ones(model)
    masks["blocks.1.attn.qkv.weight"][192 + 64 + 5, 5] = False  # k rows start at 192; head 1 is 64 rows in
    with pytest.raises(vc.MaskError, match="block 1 head 1 is partly masked in its qkv rows"):
        vc.compact(model, masks)
    masks = PruneMasks.ones(model)
    masks["blocks.0.mlp.fc2.weight"][3, 17] = False
    with pytest.raises(vc.MaskError, match="block 0 neuron 17 is partly masked in its fc2 column"):
        vc.compact(model, masks)


def test_compact_reads_masks_from_zero_weights():
    model = make_family("vit_small")
    masks = scenario_masks(model, "random")
    masked = masks.apply_(copy.deepcopy(model)).eval()
    small = vc.compact(masked).eval()
    assert [b.attn.num_heads for b in small.blocks] == [3, 3]
    assert_same_function(masked, small, model)
