"""The pruning core: magnitude pruning, criteria, selection, regroup, masks, accounting."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import calibration, input_for, make_family

import vitcompact as vc
from vitcompact.pruning import CRITERIA, PruneMasks, select_units, structured_prune
from vitcompact.masks import head_view


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return vc.create_model("vit-digits", depth=3).eval()


def unit_values(masks: PruneMasks):
    """Independently gather each unit's mask values (q, k, v rows and proj columns / fc1 row and fc2 column)."""
    for block in masks.layout.blocks:
        n, hd, a = block.name, block.head_dim, block.attn_dim
        qkv, proj = masks[f"{n}.attn.qkv.weight"], masks[f"{n}.attn.proj.weight"]
        for h in range(block.num_heads):
            rows = [qkv[part * a + h * hd: part * a + (h + 1) * hd] for part in range(3)]
            yield "head", block.index, h, torch.cat([r.flatten() for r in rows] + [proj[:, h * hd:(h + 1) * hd].flatten()])
        fc1, fc2 = masks[f"{n}.mlp.fc1.weight"], masks[f"{n}.mlp.fc2.weight"]
        for j in range(block.hidden):
            yield "neuron", block.index, j, torch.cat([fc1[j], fc2[:, j]])


@pytest.mark.parametrize("criteria,target,mode", list(itertools.product(
    ["remain", "magnitude", "l1", "l2", "saliency"], ["head", "mlp", "both"], ["layer-wise", "global"])))
def test_regroup_is_quasi_structured(criteria, target, mode):
    model = tiny_model()
    element = vc.magnitude_prune(model, 0.4)
    masks = vc.regroup(model, element, vc.RegroupConfig(target=target, head_ratio=0.5, mlp_ratio=0.3,
                       criteria=criteria, mode=mode), data=calibration(model))
    for kind, block, unit, values in unit_values(masks):
        assert bool(values.all()) or not bool(values.any()), f"{kind} {unit} of block {block} is mixed"
    structure = masks.structure()
    heads = [len(b.heads) for b in structure.blocks]
    neurons = [len(b.neurons) for b in structure.blocks]
    if target == "mlp":
        assert heads == [4, 4, 4]
    elif mode == "layer-wise":
        assert heads == [2, 2, 2]
    else:
        assert sum(heads) == 6 and min(heads) >= 1
    if target == "head":
        assert neurons == [128, 128, 128]
    elif mode == "layer-wise":
        assert neurons == [89, 89, 89]  # floor(128 * 0.7)
    else:
        assert sum(neurons) == 268 and min(neurons) >= 1  # floor(384 * 0.7)


def test_reference_accounting_vit_cifar_tiny():
    torch.manual_seed(0)
    model = vc.create_model("vit-cifar-tiny")
    masks = vc.regroup(model, vc.magnitude_prune(model, 0.3), vc.RegroupConfig(target="both", head_ratio=0.3,
                       mlp_ratio=0.3, criteria="magnitude", mode="layer-wise"))
    s = masks.sparsity()
    assert s["attention"] == {"total": 1_327_104, "pruned": 442_368}
    assert s["mlp"] == {"total": 1_327_104, "pruned": 400_896}
    assert s["all"] == {"total": 2_654_208, "pruned": 843_264}
    assert round(100 * s["attention"]["pruned"] / s["attention"]["total"], 2) == 33.33
    assert round(100 * s["mlp"]["pruned"] / s["mlp"]["total"], 2) == 30.21
    assert round(100 * s["all"]["pruned"] / s["all"]["total"], 2) == 31.77
    assert round(s["all"]["total"] / (s["all"]["total"] - s["all"]["pruned"]), 2) == 1.47
    structure = masks.structure()
    assert (structure.kept_heads, structure.total_heads) == (18, 27)
    assert (structure.kept_neurons, structure.total_neurons) == (2412, 3456)


def test_head_only_leaves_mlp_untouched_and_mlp_only_leaves_attention():
    model = tiny_model()
    element = vc.magnitude_prune(model, 0.5)
    for target, untouched, touched in (("head", ".mlp.", ".attn."), ("mlp", ".attn.", ".mlp.")):
        masks = vc.regroup(model, element, vc.RegroupConfig(target=target, head_ratio=0.5, mlp_ratio=0.5))
        pruned = masks.apply_(copy.deepcopy(model))
        before, after = dict(model.named_parameters()), dict(pruned.named_parameters())
        for name in masks.masks:
            if untouched in name:
                assert torch.equal(before[name], after[name]), name
                assert bool(masks[name].all())
        assert any(not torch.equal(before[n], after[n]) for n in masks.masks if touched in n)


def test_magnitude_prune_compounds_and_touches_only_prunable_weights():
    model = tiny_model()
    total = sum(m.numel() for m in PruneMasks.ones(model).masks.values())
    first = vc.magnitude_prune(model, 0.5)
    assert first.sparsity()["all"]["pruned"] == round(0.5 * total)
    second = vc.magnitude_prune(model, 0.5, masks=first)
    survivors = total - round(0.5 * total)
    assert second.sparsity()["all"]["pruned"] == round(0.5 * total) + round(0.5 * survivors)
    # what the first call removed stays removed
    assert all(bool((~second[n] | first[n]).all()) for n in first.masks)
    assert set(first.masks) == {f"blocks.{b}.{w}.weight" for b in range(3)
                                for w in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    # the kept weights are exactly the larger ones
    w = torch.cat([dict(model.named_parameters())[n].detach().abs().flatten() for n in first.masks])
    m = torch.cat([first[n].flatten() for n in first.masks])
    assert w[m].min() >= w[~m].max()


def test_magnitude_prune_layer_wise_prunes_each_tensor():
    model = tiny_model()
    masks = vc.magnitude_prune(model, 0.25, scope="layer-wise")
    for name, m in masks.masks.items():
        assert int((~m).sum()) == round(0.25 * m.numel()), name


def test_global_selection_ranks_across_blocks_and_respects_min_keep():
    scores = [torch.tensor([10.0, 9.0, 8.0, 7.0]), torch.tensor([1.0, 0.1, 0.1, 0.1]),
              torch.tensor([5.0, 5.0, 5.0, 5.0])]
    kept = select_units(scores, ratio=0.5, mode="global", min_keep=1)
    # per-layer normalised: block 1's first unit (1.0 / 0.325) beats every other unit
    assert [k.tolist() for k in kept] == [[0, 1], [0], [0, 1, 2]]
    kept = select_units(scores, ratio=0.75, mode="global", min_keep=0)
    assert [k.tolist() for k in kept] == [[0, 1], [0], []]  # block 2 loses every unit
    kept = select_units(scores, ratio=0.75, mode="global", min_keep=1)
    assert [len(k) for k in kept] == [1, 1, 1]
    kept = select_units(scores, ratio=0.5, mode="layer-wise", min_keep=3)
    assert [len(k) for k in kept] == [3, 3, 3]


def test_global_selection_ranks_one_scale_scores_as_they_are():
    """Scores on one scale in every block (Fisher's: the loss's growth) are not normalised per
    block: the slot goes to block 0's 10, not to block 1's 0.9 (1.35 times its block's mean)."""
    scores = [torch.tensor([10.0, 10.0, 10.0]), torch.tensor([1.0, 0.9, 0.1])]
    normalised = select_units(scores, ratio=0.5, mode="global", min_keep=1)
    as_they_are = select_units(scores, ratio=0.5, mode="global", min_keep=1, one_scale=True)
    assert [k.tolist() for k in normalised] == [[0], [0, 1]]
    assert [k.tolist() for k in as_they_are] == [[0, 1], [0]]
    assert [k.tolist() for k in select_units(scores, 0.5, "layer-wise", one_scale=True)] == [[0], [0]]  # unchanged
    from vitcompact.pruning.criteria import on_one_scale
    assert [on_one_scale(c) for c in ("fisher", "activation", "magnitude")] == [True, False, False]
    assert on_one_scale(lambda model, masks, ctx: []) is False  # a callable that does not say


def test_global_regroup_ranks_heads_across_blocks():
    model = tiny_model()
    with torch.no_grad():  # block 1: one dominant head, three weak ones (relative to its own mean)
        for p, view in ((model.blocks[1].attn.qkv.weight, (3, 4, 16, 64)), (model.blocks[1].attn.proj.weight, (64, 4, 16))):
            v = p.view(*view)
            v[:, 1:].mul_(0.01)  # heads are dim 1 in both views
    masks = vc.regroup(model, PruneMasks.ones(model), vc.RegroupConfig(target="head", head_ratio=0.5, mode="global", min_keep=1))
    blocks = masks.structure().blocks
    assert sum(len(b.heads) for b in blocks) == 6
    assert blocks[1].heads == [0]
    masks = vc.regroup(model, PruneMasks.ones(model), vc.RegroupConfig(target="head", head_ratio=0.9, mode="global", min_keep=0))
    assert [b.heads for b in masks.structure().blocks] == [[], [0], []]
    masks = vc.regroup(model, PruneMasks.ones(model), vc.RegroupConfig(target="head", head_ratio=0.9, mode="global", min_keep=1))
    assert [len(b.heads) for b in masks.structure().blocks] == [1, 1, 1]


def test_round_to_rounds_kept_mlp_width_up():
    model = tiny_model()
    masks = vc.regroup(model, PruneMasks.ones(model), vc.RegroupConfig(target="mlp", mlp_ratio=0.3, round_to=16))
    assert [len(b.neurons) for b in masks.structure().blocks] == [96, 96, 96]  # 89 -> 96


@pytest.mark.parametrize("criteria", ["l1", "l2", "saliency"])
def test_data_driven_criteria_depend_on_calibration_data(criteria):
    model = tiny_model()
    masks = vc.magnitude_prune(model, 0.3)
    fn = CRITERIA.get(criteria)
    a = fn(model, masks, vc.ScoreContext(calibration(model, seed=1)))
    b = fn(model, masks, vc.ScoreContext(calibration(model, seed=7)))
    assert not torch.allclose(a[0][0], b[0][0])
    assert not torch.allclose(a[0][1], b[0][1])


def test_magnitude_criterion_ignores_data_and_uses_masked_weights():
    model = tiny_model()
    masks = vc.magnitude_prune(model, 0.3)
    fn = CRITERIA.get("magnitude")
    a = fn(model, masks, vc.ScoreContext(calibration(model, seed=1)))
    b = fn(model, masks, vc.ScoreContext(calibration(model, seed=7)))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    block = masks.layout.blocks[0]
    w = model.blocks[0].mlp.fc1.weight.detach() * masks["blocks.0.mlp.fc1.weight"]
    w2 = model.blocks[0].mlp.fc2.weight.detach() * masks["blocks.0.mlp.fc2.weight"]
    assert torch.allclose(a[0][1], w.abs().sum(1) + w2.abs().sum(0))
    q = head_view("qkv.weight", model.blocks[0].attn.qkv.weight.detach() * masks["blocks.0.attn.qkv.weight"], block)
    assert torch.allclose(a[0][0][:1], q[:, 0].abs().sum()[None] + (
        model.blocks[0].attn.proj.weight.detach() * masks["blocks.0.attn.proj.weight"])[:, :16].abs().sum()[None])


def test_saliency_is_first_order_taylor_of_the_masked_model():
    model = tiny_model()
    masks = vc.magnitude_prune(model, 0.3)
    data = calibration(model, batches=1)
    scores = CRITERIA.get("saliency")(model, masks, vc.ScoreContext(data))
    masked = masks.apply_(copy.deepcopy(model)).eval()
    F.cross_entropy(masked(data[0][0]), data[0][1]).backward()
    fc1, fc2 = masked.blocks[1].mlp.fc1.weight, masked.blocks[1].mlp.fc2.weight
    expected = (fc1 * fc1.grad).abs().sum(1) + (fc2 * fc2.grad).abs().sum(0)
    assert torch.allclose(scores[1][1], expected.detach(), rtol=1e-5, atol=1e-10)
    magnitude = CRITERIA.get("magnitude")(model, masks, vc.ScoreContext())
    assert not torch.equal(torch.argsort(scores[1][1]), torch.argsort(magnitude[1][1]))


def test_remain_counts_surviving_weights():
    model = tiny_model()
    masks = vc.magnitude_prune(model, 0.5)
    scores = CRITERIA.get("remain")(model, masks, vc.ScoreContext())
    j = 5
    expected = masks["blocks.2.mlp.fc1.weight"][j].sum() + masks["blocks.2.mlp.fc2.weight"][:, j].sum()
    assert scores[2][1][j] == expected


def test_pruned_unit_cannot_come_back_through_stale_values():
    model = tiny_model()
    first = vc.regroup(model, PruneMasks.ones(model), vc.RegroupConfig(target="head", head_ratio=0.5))
    removed = first.structure().blocks[0].removed_heads
    second = vc.regroup(model, first, vc.RegroupConfig(target="head", head_ratio=0.5, criteria="l1"), data=calibration(model))
    assert second.structure().blocks[0].removed_heads == removed


def test_structured_prune_rewinds_a_copy_of_the_initial_weights():
    model = tiny_model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    masks = structured_prune(model, vc.magnitude_prune(model, 0.3), "magnitude", 0.5, 0.5, rewind_to=init)
    for name, value in model.state_dict().items():
        expected = init[name] * masks[name] if name in masks.masks else init[name]
        assert torch.equal(value, expected), name
    # Copies, not aliases: training the model on must leave the snapshot it rewound to as it was,
    # and editing the snapshot must leave the model as it is.
    snapshot = {k: v.clone() for k, v in init.items()}
    rewound = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(3.0)
    assert all(torch.equal(init[k], snapshot[k]) for k in init)
    for value in init.values():
        value.mul_(-1.0)
    for name, value in model.named_parameters():
        assert torch.equal(value, rewound[name] + 3.0), name
    # Without rewind_to it only returns the masks: the weights stay as they are.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    only = structured_prune(model, vc.magnitude_prune(model, 0.3), "magnitude", 0.5, 0.5)
    assert only.is_quasi_structured()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_masks_and_structure_round_trip(tmp_path):
    model = tiny_model()
    masks = vc.regroup(model, vc.magnitude_prune(model, 0.3), vc.RegroupConfig(head_ratio=0.5, mlp_ratio=0.3))
    masks.save(tmp_path / "masks.safetensors")
    assert PruneMasks.load(tmp_path / "masks.safetensors") == masks
    masks.structure().save(tmp_path / "structure.json")
    loaded = vc.Structure.load(tmp_path / "structure.json")
    assert loaded.to_dict() == masks.structure().to_dict()


def test_count_model_and_structure():
    model = tiny_model()
    c = vc.count(model)
    assert c.params == sum(p.numel() for p in model.parameters())
    n, d = 17, 64
    attn = n * d * 3 * 64 + 2 * n * n * 64 + n * 64 * d
    assert c.blocks[0].macs == attn + 2 * n * d * 128
    masks = vc.regroup(model, PruneMasks.ones(model), vc.RegroupConfig(head_ratio=0.5, mlp_ratio=0.5))
    small = vc.compact(model, masks)
    by_structure, by_model = vc.count(masks.structure()), vc.count(small)
    assert (by_structure.params, by_structure.macs) == (by_model.params, by_model.macs)
    assert by_model.params == sum(p.numel() for p in small.parameters())
    assert by_model.blocks[0].macs == n * d * 3 * 32 + 2 * n * n * 32 + n * 32 * d + 2 * n * d * 64


@pytest.mark.parametrize("family", ["vit_tiny", "vit_small", "deit_small", "deit_distilled", "reg4",
                                    "layerscale", "qk_norm", "gap_no_cls"])
def test_adapter_families(family):
    model = make_family(family)
    layout = vc.vit_layout(model)
    attn = model.blocks[0].attn
    assert [b.num_heads for b in layout.blocks] == [attn.num_heads] * 2
    assert layout.blocks[0].head_dim == attn.head_dim
    assert layout.blocks[0].hidden == model.blocks[0].mlp.fc1.out_features
    assert layout.num_tokens == 16 + model.num_prefix_tokens
    masks = vc.regroup(model, vc.magnitude_prune(model, 0.3), vc.RegroupConfig(head_ratio=0.5, mlp_ratio=0.5,
                       criteria="l2"), data=calibration(model))
    assert masks.structure().kept_heads == 2 * max(1, attn.num_heads // 2)


def test_unsupported_models_are_refused_by_name():
    import timm
    with pytest.raises(vc.UnsupportedModelError, match="model is a ResNet, not a timm VisionTransformer"):
        vc.vit_layout(timm.create_model("resnet18", pretrained=False))
    parallel = timm.create_model("vit_small_patch16_18x2_224", pretrained=False, img_size=32, depth=2)
    with pytest.raises(vc.UnsupportedModelError, match=r"blocks.0 is a ParallelThingsBlock"):
        vc.vit_layout(parallel)

    class SeparateQKV(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(dim, dim) for _ in range(3))

    model = tiny_model()
    model.blocks[1].attn = SeparateQKV(64)
    with pytest.raises(vc.UnsupportedModelError, match=r"blocks.1.attn is a SeparateQKV"):
        vc.magnitude_prune(model, 0.3)


def test_bad_inputs_give_clear_errors():
    model = tiny_model()
    ones = PruneMasks.ones(model)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(vc.ConfigError, match=rf"rate must be in \[0, 1\), got {bad}"):
            vc.magnitude_prune(model, bad)
        with pytest.raises(vc.ConfigError, match=rf"head_ratio must be in \[0, 1\), got {bad}"):
            vc.regroup(model, ones, vc.RegroupConfig(head_ratio=bad))
        with pytest.raises(vc.ConfigError, match=rf"mlp_ratio must be in \[0, 1\), got {bad}"):
            vc.regroup(model, ones, vc.RegroupConfig(mlp_ratio=bad))
    with pytest.raises(vc.ConfigError, match="unknown criterion 'taylor'; choose one of: activation, fisher, l1, l2, magnitude, reconstruction, remain, saliency"):
        vc.regroup(model, ones, vc.RegroupConfig(criteria="taylor"))
    with pytest.raises(vc.ConfigError, match="unknown target 'neurons'; choose one of: head, mlp, both"):
        vc.regroup(model, ones, vc.RegroupConfig(target="neurons"))
    with pytest.raises(vc.ConfigError, match="unknown selection mode 'per-block'"):
        vc.regroup(model, ones, vc.RegroupConfig(mode="per-block"))
    with pytest.raises(vc.ConfigError, match="unknown model 'vit-huge-nope'"):
        vc.create_model("vit-huge-nope")
    with pytest.raises(vc.ConfigError, match="criterion 'l1' needs calibration data"):
        vc.regroup(model, ones, vc.RegroupConfig(criteria="l1"))
    other = vc.create_model("vit-digits", depth=2)
    with pytest.raises(vc.MaskError, match="masks do not match the model: missing"):
        vc.regroup(other, ones)
    wider = vc.create_model("vit-digits", depth=3, mlp_ratio=3.0)
    with pytest.raises(vc.MaskError, match=r"mask blocks.0.mlp.fc1.weight has shape \(128, 64\) but the model's weight has shape \(192, 64\)"):
        vc.magnitude_prune(wider, 0.3, masks=ones)


def test_structure_refuses_element_masks():
    model = tiny_model()
    with pytest.raises(vc.MaskError, match="masks are not quasi-structured: block 0 head 0 is partly masked"):
        vc.magnitude_prune(model, 0.3).structure()


def test_input_for_matches_model():
    model = tiny_model()
    assert model(input_for(model, 2)).shape == (2, 10)
