"""Issue 28: the latency table's token-count axis, and budgets that choose the token merging r."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from conftest import one_line_error
from typer.testing import CliRunner

import vitcompact as vc
from vitcompact.cli.app import app
from vitcompact.latency import BudgetRequest, LatencyBudget, LatencyTable, allocate
from vitcompact.latency import budget as latency_budget
from vitcompact.latency import report as latency_report
from vitcompact.latency import table as lm
from vitcompact.latency import tokens as tokens_module
from vitcompact.latency.stats import SpeedUp
from vitcompact.latency.tokens import TokenAxis, TokenSlice, merging, token_grid
from vitcompact.pruning import loop as prune_loop
from vitcompact.pruning.regroup import regroup_with_allocation

# 90 runs a variant (still under a second each; exporting it takes seconds): with 18, the 5 % check
# below failed about half the time on a busy machine.
FAST = lm.TableTiming(warmup=2, rounds=30, runs_per_round=3, min_rounds=3, seconds_per_variant=0.3)


def pieces(count: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Heads 0..2 and MLP widths 0, 4, 8 of a block, every piece linear in the token count (dense: 9)."""
    return (0.0, count / 9, 2 * count / 9), (0.0, 1.5 * count / 9, 3 * count / 9)


def token_table() -> LatencyTable:
    """2 blocks of 2 heads (1 ms each at 9 tokens) and 8 neurons (3 ms at 9 tokens), fixed 1 ms,
    9 tokens (1 prefix); measured at 5 and 7 tokens too, merging costing 0.2 ms at r=1, 0.3 at r=2."""
    slices = tuple(TokenSlice(c, 0.0, *pieces(c)) for c in (5, 7))
    heads, mlp = pieces(9)
    return LatencyTable({"model": "synthetic"}, 2, 1.0, 0.0, heads, (0, 4, 8), mlp, 11.0,
                        TokenAxis(9, 1, slices, (1, 2), (0.2, 0.3)))


def kept(a) -> list[tuple[int, int]]:
    return [(len(h), len(n)) for h, n in zip(a.heads, a.neurons)]


def test_the_table_predicts_each_block_at_its_token_counts():
    t = token_table()
    # r=2: block 0's attention sees 9 tokens, its MLP 7; block 1's 7 and 5 (token_counts).
    assert t.block_tokens(2) == [(9, 7), (7, 5)] and t.block_tokens(0) == [None, None]
    assert t.predict([(1, 4), (1, 4)], 2) == pytest.approx(1.0 + (1 + 1.5 * 7 / 9) + (7 / 9 + 1.5 * 5 / 9) + 0.3)
    # 8 tokens lie between the measured 7 and 9: linear in between.
    assert t.block(2, 8, (8, 8)) == pytest.approx(2 * 8 / 9 + 3 * 8 / 9)
    assert t.predict([(2, 8)] * 2) == t.full_ms == 11.0
    assert LatencyTable.from_dict(t.to_dict()) == t
    with pytest.raises(vc.ConfigError, match=r"^the latency table measured token merging up to r=2, not r=3$"):
        t.token_axis.merge_cost(3)
    plain = LatencyTable(t.key, 2, 1.0, 0.0, t.head_ms, t.mlp_widths, t.mlp_ms, 11.0)
    with pytest.raises(vc.ConfigError, match=r"^this latency table has no token axis; measure it with budget axes "
                                             r"heads,mlp,tokens$"):
        plain.predict([(2, 8)] * 2, 1)
    with pytest.raises(vc.ConfigError, match=r"^a budget that merges tokens needs a latency table with a token axis"):
        LatencyBudget(plain, 2.0, tokens=True)


def test_the_allocator_merges_tokens_where_that_keeps_more_than_removing_a_block():
    t = token_table()  # attention weighs 1/(1+1.5) of a block: a head holds 0.2, 4 neurons 0.3
    heads, neurons = [torch.ones(2)] * 2, [torch.ones(8)] * 2
    budget = LatencyBudget(t, 5.5, kind="ms", tokens=True)
    assert budget.merge_r == (0, 1, 2)
    # Without merging, every block at 1 head and 4 neurons takes 6 ms: 5.5 ms needs a whole block
    # removed (last resort), losing 1.5. At r=2 the same widths take 5.078 ms: 1.0 lost to the
    # units removed, 0.244 to merging (each branch's kept importance times the share of the 9
    # tokens it no longer sees). At r=1 (5.589 ms) a block must go too.
    a = allocate(heads, neurons, t, budget.budget_ms, round_to=4, merge_r=budget.merge_r)
    assert (a.r, kept(a)) == (2, [(1, 4), (1, 4)])
    assert a.predicted_ms == pytest.approx(1.0 + (1 + 1.5 * 7 / 9) + (7 / 9 + 1.5 * 5 / 9) + 0.3)
    assert a.merge_lost == pytest.approx(0.3 * 2 / 9 + 0.2 * 2 / 9 + 0.3 * 4 / 9)
    assert a.lost == pytest.approx(1.0 + a.merge_lost)
    plain = allocate(heads, neurons, t, 5.5, round_to=4)
    assert (plain.r, kept(plain)) == (0, [(0, 0), (1, 4)]) and plain.lost == pytest.approx(1.5)
    # 6 ms is met by widths alone (lost 1.0); merging would lose more: no merging.
    a = allocate(heads, neurons, t, 6.0, round_to=4, merge_r=budget.merge_r)
    assert (a.r, kept(a)) == (0, [(1, 4), (1, 4)])


def test_a_budget_may_choose_r_and_regroup_reports_it():
    torch.manual_seed(0)
    model = vc.create_model("vit-digits", depth=2, num_heads=2)  # 17 tokens: r up to 5
    grid, counts = token_grid(17, 2, 1)
    assert (grid, counts) == ([1, 2, 4, 5], [7, 10, 14, 17])
    slices = tuple(TokenSlice(c, 0.0, (0.0, c / 17, 2 * c / 17), (0.0, 3 * c / 17)) for c in counts[:-1])
    t = LatencyTable({"model": "synthetic"}, 2, 1.0, 0.0, (0.0, 1.0, 2.0), (0, 128), (0.0, 3.0), 11.0,
                     TokenAxis(17, 1, slices, tuple(grid), (0.1,) * 4))
    config = vc.RegroupConfig(budget=LatencyBudget(t, 1.5, tokens=True), round_to=128, target="head")
    masks, allocation = regroup_with_allocation(model, vc.PruneMasks.ones(model), config)
    # Heads alone (the MLP is not pruned) cannot reach 1.5x: merging must make up the rest.
    assert allocation.r in grid and t.predict(masks.structure().shape(), allocation.r) <= t.full_ms / 1.5 + 1e-9
    assert t.predict(masks.structure().shape()) > t.full_ms / 1.5


@pytest.mark.parametrize("axes", ["heads", "heads,mlp,depth", "heads,mlp,mlp", "", 3])
def test_bad_budget_axes_are_refused(axes):
    with pytest.raises(vc.ConfigError, match=r"^budget axes must be heads,mlp or heads,mlp,tokens \(tokens: the budget "
                                             r"chooses the token merging r\), got "):
        BudgetRequest(target_speedup=2.0, axes=axes)


def test_budget_axes_are_one_spelling_and_a_cli_option(tmp_path):
    assert BudgetRequest(target_speedup=2.0).axes == "heads,mlp"
    request = BudgetRequest(target_speedup=2.0, axes=" tokens, heads,mlp")
    assert request.axes == "heads,mlp,tokens" and request.merges_tokens
    runner = CliRunner()
    for command in ("prune", "pipeline"):
        assert "--budget-axes" in runner.invoke(app, [command, "--help"], terminal_width=200).output
    out = tmp_path / "run"
    one_line_error(runner.invoke(app, ["prune", "vit-digits", "--data", "digits", "--target-speedup", "2",
                                       "--budget-axes", "heads,depth", "--out", str(out)]),
                   "budget axes must be heads,mlp or heads,mlp,tokens")
    assert not out.exists()
    with pytest.raises(vc.ConfigError, match="chooses the token merging r itself; drop token_merge"):
        vc.OneShotConfig(budget=request, token_merge=vc.TokenMergeConfig(r=2))


@pytest.mark.slow
def test_predicted_latency_with_merging_is_within_5_percent_of_the_measured(monkeypatch):
    # A small token axis (r in {2, 5}, measured at 7 and 17 tokens) keeps the timed models few.
    monkeypatch.setattr(tokens_module, "MERGE_POINTS", 2)
    monkeypatch.setattr(tokens_module, "TOKEN_POINTS", 2)
    torch.manual_seed(0)
    model = vc.create_model("vit-digits", depth=2, num_heads=2).eval()
    source, blocks, r = lm.timing_copy(model), [(1, 128), (2, 128)], 5
    # A model this small runs in a third of a millisecond, and another test worker's load can shift
    # the table's measurements against the check's: in CI one check strayed 9 %, and later the median
    # of three checks 10 %. So table and check are taken again, up to three times, until one pair
    # agrees; a prediction that is wrong fails all three.
    attempts = []
    for _ in range(3):
        table = lm.measure_table(model, "ort-cpu", batch=8, threads=1, round_to=64, mlp_points=2, timing=FAST,
                                 tokens=True)
        assert table.key["tokens"]["counts"] == [7, 17] and table.tokens.merge_r == (2, 5)
        # r=5: block 0's attention sees 17 tokens, its MLP and block 1's attention 12 (interpolated), block 1's MLP 7.
        measured = []
        for _ in range(3):
            with lm.Interleaved(source, "ort-cpu", 8, 1, FAST, 0) as timer:
                index = timer.time(merging(vc.compact(source, lm.first_units_masks(source, blocks)), r), "structure")
                measured.append(timer.ms(index) * table.dense_ms / timer.dense_ms)  # at the table's machine speed
        attempts.append((table.predict(blocks, r), statistics.median(measured)))
        if abs(attempts[-1][0] / attempts[-1][1] - 1) < 0.05:
            break
    assert abs(attempts[-1][0] / attempts[-1][1] - 1) < 0.05, attempts


def digits_token_table() -> LatencyTable:
    """vit-digits (4 blocks of 4 heads and 128 neurons, 17 tokens): every piece linear in the tokens,
    measured at the counts and r its key names."""
    key = {"model": "vit-digits", "synthetic": True}

    def heads(c: int) -> tuple[float, ...]:
        return tuple(0.1 * h * c / 17 for h in range(5))

    def mlp(c: int) -> tuple[float, ...]:
        return tuple(0.1 * w / 32 * c / 17 for w in (0, 32, 64, 96, 128))
    grid, counts = token_grid(17, 4, 1)
    axis = TokenAxis(17, 1, tuple(TokenSlice(c, 0.0, heads(c), mlp(c)) for c in counts[:-1]), tuple(grid),
                     (0.05,) * len(grid))
    return LatencyTable(key, 4, 0.2, 0.0, heads(17), (0, 32, 64, 96, 128), mlp(17), 3.4, axis)


def test_prune_applies_the_r_its_budget_chose_and_fine_tunes_with_it(tmp_path, monkeypatch):
    table = digits_token_table()
    monkeypatch.setattr(latency_budget, "latency_table", lambda *a, **k: table)
    merges = []  # what the pruning loop asks the model to merge, in order
    real_merge = prune_loop.merge_tokens
    monkeypatch.setattr(prune_loop, "merge_tokens", lambda model, config: (merges.append(config),
                                                                           real_merge(model, config))[1])
    measured = []  # the models the budget report times (timing itself: test_budget_cli.py)

    def measure_speedup(dense, compact, *args, **kwargs):
        measured.append((vc.get_record(dense).token_merge, vc.get_record(compact).token_merge))
        return 1.0, 0.5, SpeedUp(2.0, 1.9, 2.1, 0.95)
    monkeypatch.setattr(latency_report, "measure_speedup", measure_speedup)
    out = tmp_path / "run"
    # 4x: 0.85 ms. Every block at 1 head and 32 neurons takes 1.0 ms without merging, 0.77 ms at r=3;
    # no block may go, so only merging meets it.
    result = CliRunner().invoke(app, ["prune", "vit-digits", "--data", "digits", "--method", "oneshot",
                                      "--finetune-epochs", "1", "--round-to", "32", "--target-speedup", "4",
                                      "--budget-axes", "heads,mlp,tokens", "--block-removal", "never",
                                      "--finetune-token-merge", "--allow-missed-budget", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "latency_budget.json").read_text())
    r = report["token_merge"]["r"]
    # fine-tuned on the budget's r, then measured without and with it
    assert merges == [vc.TokenMergeConfig(r=r), None, vc.TokenMergeConfig(r=r)]
    assert measured == [(None, vc.TokenMergeConfig(r=r))]  # dense against the compact model merging r
    assert report["measured"]["speedup"] == 2.0
    assert json.loads((out / "result.json").read_text())["token_merge"]["finetuned_with_merging"] is True
    assert r in table.tokens.merge_r and report["request"]["axes"] == "heads,mlp,tokens"
    assert report["predicted"]["ms"] <= table.reference_ms / 4 + 1e-9
    assert vc.get_record(vc.load(out)).token_merge == vc.TokenMergeConfig(r=r)
    assert json.loads(result.stdout)["token_merge"]["r"] == r
