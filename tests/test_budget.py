"""Issue 13's core: the latency table's prediction, the budget allocator, whole-block removal."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import randomize_
from test_compact import assert_same_function, remove_heads, remove_neurons

import vitcompact as vc
from vitcompact.export import to_onnx, verify_onnx
from vitcompact.models.layers import ConstantBranch
from vitcompact.latency import LatencyBudget, LatencyTable, allocate


def table(depth: int = 2, heads=(0.0, 1.0, 2.0), widths=(0, 4, 8), mlp=(0.0, 1.0, 2.0), fixed: float = 1.0,
          base: float = 0.0) -> LatencyTable:
    t = LatencyTable({"model": "synthetic"}, depth, fixed, base, tuple(heads), tuple(widths), tuple(mlp), 0.0)
    return LatencyTable(t.key, depth, fixed, base, tuple(heads), tuple(widths), tuple(mlp), t.full_ms)


def test_prediction_adds_the_parts_and_interpolates_widths():
    t = table(depth=2, heads=(0.0, 1.5, 2.5), widths=(0, 4, 8), mlp=(0.0, 1.0, 3.0), fixed=0.5, base=0.25)
    assert t.block(2, 8) == 0.25 + 2.5 + 3.0
    assert t.block(1, 6) == 0.25 + 1.5 + 2.0  # halfway between 4 (1.0) and 8 (3.0)
    assert t.predict([(2, 8), (0, 0)]) == 0.5 + 5.75 + 0.25
    assert t.full_ms == 0.5 + 2 * 5.75 and t.floor_ms == 0.5 + 2 * 0.25
    assert LatencyTable.from_dict(t.to_dict()) == t
    with pytest.raises(vc.ConfigError, match="the latency table is for 2 blocks, the structure has 1"):
        t.predict([(2, 8)])


def test_allocator_meets_the_budget_and_keeps_the_most_important_units():
    t = table(depth=2, heads=(0.0, 1.0, 2.0, 3.0), widths=(0, 2, 4), mlp=(0.0, 1.0, 2.0), fixed=1.0)
    head_scores = [torch.tensor([5.0, 1.0, 3.0]), torch.tensor([1.0, 1.0, 1.0])]
    neuron_scores = [torch.tensor([4.0, 4.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])]
    budget = 7.0  # full: 1 + 2 * (3 + 2) = 11
    a = allocate(head_scores, neuron_scores, t, budget, round_to=2)
    assert a.predicted_ms <= budget
    kept = [(len(h), len(n)) for h, n in zip(a.heads, a.neurons)]
    assert t.predict(kept) == a.predicted_ms
    # Per block, the units kept are the best ones of that block.
    assert a.heads[0].tolist() == sorted(torch.argsort(head_scores[0], descending=True)[:len(a.heads[0])].tolist())
    assert a.neurons[0].tolist() in ([0, 1], [0, 1, 2, 3])
    # Removing more than needed is not done: one step less would be over the budget.
    assert a.predicted_ms + min(step[3] for step in a.steps) > budget


def test_allocator_prefers_the_cheaper_of_two_equally_important_units():
    # One block whose branches cost 4 ms each (so weigh alike); a head and a group of 4 neurons
    # each hold half their branch's importance: equally important. The last head saves 2 ms, the
    # top group of neurons 3 ms: removing one unit must remove the costlier, the neurons.
    t = table(depth=1, heads=(0.0, 2.0, 4.0), widths=(0, 4, 8), mlp=(0.0, 1.0, 4.0), fixed=0.0)
    a = allocate([torch.ones(2)], [torch.ones(8)], t, budget_ms=t.full_ms - 3.0, round_to=4)
    assert (len(a.heads[0]), len(a.neurons[0])) == (2, 4)
    # The same with the costs swapped: a head goes.
    t = table(depth=1, heads=(0.0, 1.0, 4.0), widths=(0, 4, 8), mlp=(0.0, 2.0, 4.0), fixed=0.0)
    a = allocate([torch.ones(2)], [torch.ones(8)], t, budget_ms=t.full_ms - 3.0, round_to=4)
    assert (len(a.heads[0]), len(a.neurons[0])) == (1, 8)


def test_branches_weigh_what_they_cost_so_an_expensive_branch_is_not_stripped():
    # Attention costs 3x the MLP per block. Weighting the branches alike, every head would go
    # before any neuron; weighted by cost, the units below their branch's average go first.
    t = table(depth=2, heads=(0.0, 3.0, 6.0), widths=(0, 1, 2), mlp=(0.0, 1.0, 2.0), fixed=0.0)
    heads = [torch.tensor([1.0, 1.0])] * 2
    neurons = [torch.tensor([3.0, 1.0])] * 2  # one neuron per block matters little
    a = allocate(heads, neurons, t, budget_ms=t.full_ms - 2.0)
    assert [len(h) for h in a.heads] == [2, 2] and [n.tolist() for n in a.neurons] == [[0], [0]]


def kept(a) -> list[tuple[int, int]]:
    return [(len(h), len(n)) for h, n in zip(a.heads, a.neurons)]


def test_whole_blocks_go_freely_last_or_never_as_block_removal_says():
    t = table(depth=3, heads=(0.0, 1.0, 2.0), widths=(0, 4, 8), mlp=(0.0, 1.0, 2.0), fixed=1.0, base=0.1)
    units = [torch.ones(2)] * 3, [torch.ones(8)] * 3
    # Every block and unit alike (ties go to the earlier block). Saving one block's worth (4 ms of
    # its branches): "free" removes block 0 whole; "last-resort" (the default) and "never" halve
    # two blocks' heads and widths instead.
    free = allocate(*units, t, budget_ms=t.full_ms - 4.0, round_to=4, block_removal="free")
    assert kept(free) == [(0, 0), (2, 8), (2, 8)] and free.predicted_ms == pytest.approx(t.full_ms - 4.0)
    assert kept(allocate(*units, t, budget_ms=t.full_ms - 4.0, round_to=4)) == [(1, 4), (1, 4), (2, 8)]
    assert kept(allocate(*units, t, budget_ms=t.full_ms - 4.0, round_to=4, block_removal="never")) == \
        [(1, 4), (1, 4), (2, 8)]
    # Past what widths can save (every block at 1 head, 4 neurons: 1 + 3 * 2.1 = 7.3 ms), the
    # last resort removes whole blocks, one at a time, and "never" refuses.
    assert kept(allocate(*units, t, budget_ms=7.3, round_to=4)) == [(1, 4)] * 3
    assert kept(allocate(*units, t, budget_ms=7.0, round_to=4)) == [(0, 0), (1, 4), (1, 4)]
    with pytest.raises(vc.ConfigError, match=r"^the budget 7.000 ms cannot be met by removing the prunable units "
                                             r"\(the least is 7.300 ms\); remove whole blocks \(block removal "
                                             r"last-resort\), or ask for less$"):
        allocate(*units, t, budget_ms=7.0, round_to=4, block_removal="never")
    with pytest.raises(vc.ConfigError, match=r"^unknown block removal 'sometimes'; choose one of: last-resort, "
                                             r"free, never$"):
        allocate(*units, t, budget_ms=7.0, block_removal="sometimes")
    with pytest.raises(vc.ConfigError, match=r"^unknown block removal 'x'"):
        LatencyBudget(t, 2.0, block_removal="x")
    for mode in ("last-resort", "free"):
        every = allocate(*units, t, budget_ms=t.floor_ms, round_to=4, block_removal=mode)
        assert kept(every) == [(0, 0)] * 3


def test_a_budget_below_the_fixed_cost_is_refused():
    t = table(depth=3, heads=(0.0, 1.0, 2.0), widths=(0, 4, 8), mlp=(0.0, 1.0, 2.0), fixed=1.0, base=0.1)
    with pytest.raises(vc.ConfigError, match=r"below the 1.300 ms the model takes with every block removed"):
        allocate([torch.ones(2)] * 3, [torch.ones(8)] * 3, t, budget_ms=1.2)
    with pytest.raises(vc.ConfigError, match=r"a 100x speed-up asks for 0.133 ms, below the 1.300 ms"):
        LatencyBudget(t, 100.0)
    assert LatencyBudget(t, 13.0, kind="ms").budget_ms == 13.0 and LatencyBudget(t, 2.0).budget_ms == t.full_ms / 2


def test_a_speedup_counts_from_the_measured_dense_model():
    t = table(depth=1, heads=(0.0, 1.0, 2.0), widths=(0, 4), mlp=(0.0, 2.0), fixed=1.0)  # predicts 5 ms whole
    measured = LatencyTable(t.key, 1, 1.0, 0.0, t.head_ms, t.mlp_widths, t.mlp_ms, dense_ms=4.8)
    assert LatencyBudget(measured, 2.0).budget_ms == 2.4 and LatencyBudget(t, 2.0).budget_ms == 2.5


def test_state_budgets_fall_geometrically_to_the_target():
    t = table(fixed=0.0)
    b = LatencyBudget(t, 4.0)
    assert [round(b.at_state(s, 2), 9) for s in (1, 2)] == [round(t.full_ms / 2, 9), round(t.full_ms / 4, 9)]


def test_regroup_under_a_budget_gives_masks_that_compact_to_the_predicted_structure():
    torch.manual_seed(0)
    model = randomize_(vc.create_model("vit-digits"))
    layout = vc.vit_layout(model)
    t = table(depth=len(layout.blocks), heads=(0.0, 1.0, 2.0, 3.0, 4.0), widths=(0, 32, 64, 96, 128),
              mlp=(0.0, 1.0, 2.0, 3.0, 4.0), fixed=2.0, base=0.05)
    config = vc.RegroupConfig(budget=LatencyBudget(t, 2.0), round_to=32)
    masks = vc.regroup(model, vc.PruneMasks.ones(model), config)
    structure = masks.structure()
    blocks = structure.shape()
    assert t.predict(blocks) <= t.full_ms / 2
    assert all(w % 32 == 0 for _, w in blocks)
    small = vc.compact(model, masks)
    masks.apply_(model)
    assert_same_function(model, small, model)


def test_a_whole_block_removed_is_a_constant_add_exact_and_exported(tmp_path):
    torch.manual_seed(0)
    model = randomize_(vc.create_model("vit-digits"))
    masks = vc.PruneMasks.ones(model)
    remove_heads(masks, 1, list(range(4)))
    remove_neurons(masks, 1, list(range(128)))
    small = vc.compact(model, masks)
    block = small.blocks[1]
    assert isinstance(block.attn, ConstantBranch) and isinstance(block.mlp, ConstantBranch)
    assert isinstance(block.norm1, nn.Identity) and isinstance(block.norm2, nn.Identity)
    assert not any(isinstance(m, nn.Linear) for m in block.modules())  # no matmul left in the block
    assert vc.count(small).blocks[1].macs == 0
    masks.apply_(model)
    assert_same_function(model, small, model)
    result = to_onnx(small, tmp_path / "m.onnx")
    assert verify_onnx(result.path, small).worst <= 1e-5


def test_units_removed_in_an_earlier_state_are_removed_first():
    # Block 0 lost every head in an earlier state (its scores are all 0): reaching the budget must
    # count that, not cut a live block's heads as well.
    t = table(depth=2, heads=(0.0, 1.0, 2.0), widths=(0, 4), mlp=(0.0, 1.0), fixed=0.0)
    a = allocate([torch.zeros(2), torch.ones(2)], [None, None], t, budget_ms=t.full_ms - 2.0)
    assert [len(h) for h in a.heads] == [0, 2]


def test_a_branch_is_never_emptied_alone_only_a_whole_block_goes():
    # The last head costs most (the branch's fixed work goes with it): removing it alone would be
    # cheap per unit of importance, and would leave a block with no token mixing.
    t = table(depth=3, heads=(0.0, 3.0, 4.0, 5.0), widths=(0, 4, 8, 12), mlp=(0.0, 2.0, 3.0, 4.0), fixed=1.0,
              base=0.1)
    g = torch.Generator().manual_seed(0)
    for fraction in (0.9, 0.7, 0.5, 0.3):
        heads = [torch.rand(3, generator=g) for _ in range(3)]
        neurons = [torch.rand(12, generator=g) for _ in range(3)]
        a = allocate(heads, neurons, t, budget_ms=t.floor_ms + fraction * (t.full_ms - t.floor_ms), round_to=4)
        for h, n in zip(a.heads, a.neurons):
            assert (len(h) == 0) == (len(n) == 0), (fraction, len(h), len(n))
