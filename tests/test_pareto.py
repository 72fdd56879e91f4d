"""The Pareto study end to end on digits: files, run rows, structures, shared measurements.

Correctness only: a dense model trained for one epoch and a one-epoch pruning budget, so nothing
is asserted about accuracy or speed.
"""

from __future__ import annotations

import json
import math

import pytest

from studies import pareto

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAINING = ("rsst", "refill", "oneshot")
METHODS = TRAINING + ("magnitude",)
# vit-digits: 4 blocks of 4 heads and 128 MLP neurons.
BLOCKS, HEADS, NEURONS, RATIO = 4, 4, 128, 0.5


def layer_wise_keep(n: int, ratio: float, min_keep: int = 1) -> int:
    return max(min_keep, math.floor(n * (1 - ratio)))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("pareto")
    report = pareto.main([
        "--data", "digits", "--model", "vit-digits", "--dense-epochs", "1", "--limit", "256",
        "--test-limit", "120", "--batch-size", "64", "--methods", ",".join(METHODS),
        "--ratios", f"{RATIO}/{RATIO}", "--global-at", f"{RATIO}/{RATIO}", "--distill-at", f"{RATIO}/{RATIO}",
        "--seeds", "0", "--states", "1", "--epochs-per-state", "1", "--finetune-epochs", "0",
        "--bench-seconds", "0.5", "--bench-min-rounds", "1", "--out", str(out)])
    return out, report


def test_writes_json_markdown_and_png(study):
    out, report = study
    assert (out / "pareto.png").read_bytes().startswith(PNG_SIGNATURE)
    assert json.loads((out / "pareto.json").read_text())["runs"] == report["runs"]
    markdown = (out / "pareto.md").read_text()
    for series in {r["series"] for r in report["runs"]}:
        assert pareto.series_label(series) in markdown
    assert report["budget"]["epochs"] == 1
    assert report["budget"]["train_images"] == 256 and report["budget"]["test_images"] == 120


def test_one_row_per_method_ratio_variant_and_seed(study):
    _, report = study
    seeds = 1
    expected = (len(TRAINING) * seeds + 1) + len(TRAINING) * seeds + len(TRAINING) * seeds
    rows = report["runs"]
    assert len(rows) == expected
    assert sorted(r["series"] for r in rows) == sorted(
        list(METHODS) + [f"{m}-global" for m in TRAINING] + [f"{m}-distill" for m in TRAINING])
    assert [r["seed"] for r in rows if r["method"] == "magnitude"] == [None]
    assert all(r["mode"] == "global" for r in rows if r["series"].endswith("-global"))
    assert all(r["distill"] for r in rows if r["series"].endswith("-distill"))
    assert all(0.0 <= r["test_top1"] <= 1.0 and r["ideal_speedup"] > 1.0 for r in rows)


def test_kept_units_follow_the_selection_rule(study):
    _, report = study
    for r in report["runs"]:
        if r["mode"] == "layer-wise":
            assert r["heads_per_block"] == [layer_wise_keep(HEADS, RATIO)] * BLOCKS == [2] * BLOCKS
            assert r["neurons_per_block"] == [layer_wise_keep(NEURONS, RATIO)] * BLOCKS == [64] * BLOCKS
        else:
            assert r["kept_heads"] == math.floor(BLOCKS * HEADS * (1 - RATIO))
            assert r["kept_neurons"] == math.floor(BLOCKS * NEURONS * (1 - RATIO))
            assert min(r["heads_per_block"]) >= 1 and min(r["neurons_per_block"]) >= 1
        assert r["kept_heads"] == sum(r["heads_per_block"])
        assert r["kept_neurons"] == sum(r["neurons_per_block"])


def test_same_layer_wise_shape_shares_one_measurement(study):
    _, report = study
    layer_wise = [r for r in report["runs"] if r["mode"] == "layer-wise"]
    assert len({r["measurement"] for r in layer_wise}) == 1
    assert len({r["measured_speedup"] for r in layer_wise}) == 1
    shared = report["measurements"][layer_wise[0]["measurement"]]
    assert len(shared["runs"]) == len(layer_wise)
    assert shared["heads_per_block"] == layer_wise[0]["heads_per_block"]
    shapes = {(tuple(m["heads_per_block"]), tuple(m["neurons_per_block"])) for m in report["measurements"]}
    assert len(shapes) == len(report["measurements"])  # each distinct shape timed once


def test_aggregates_cover_every_series_with_spread(study):
    _, report = study
    assert {a["series"] for a in report["aggregates"]} == {r["series"] for r in report["runs"]}
    for a in report["aggregates"]:
        assert a["min"] <= a["mean"] <= a["max"] and a["std"] == 0.0


def _aggregate(series: str, ratio: float, by_seed: dict[int, float]) -> dict:
    top1 = list(by_seed.values())
    return {"series": series, "head_ratio": ratio, "mlp_ratio": ratio, "seeds": list(by_seed),
            "test_top1": top1, "mean": sum(top1) / len(top1)}


@pytest.mark.parametrize("rsst, met", [({0: 0.86, 1: 0.85}, True),    # +1.5 pt, ahead on both seeds
                                       ({0: 0.90, 1: 0.80}, False),   # +1.0 pt mean, behind on seed 1
                                       ({0: 0.845, 1: 0.845}, False)])  # ahead on both, +0.5 pt only
def test_rsst_vs_oneshot_target_needs_margin_and_every_seed(rsst, met):
    aggregates = [_aggregate("rsst", 0.7, rsst), _aggregate("oneshot", 0.7, {0: 0.84, 1: 0.84})]
    targets = pareto.check_targets(aggregates, dense_top1=0.9)
    assert targets["rsst_beats_oneshot_at_0.7/0.7"]["met"] is met
    assert targets["rsst_near_dense_at_0.3/0.3"] is None


def test_rsst_near_dense_target():
    near = pareto.check_targets([_aggregate("rsst", 0.3, {0: 0.896})], dense_top1=0.9)
    far = pareto.check_targets([_aggregate("rsst", 0.3, {0: 0.894})], dense_top1=0.9)
    assert near["rsst_near_dense_at_0.3/0.3"]["met"] and not far["rsst_near_dense_at_0.3/0.3"]["met"]


def test_rsst_ablation_reports_validation_only_for_every_variant_and_seed(tmp_path):
    from studies import rsst_ablation

    report = rsst_ablation.main(["--dense-epochs", "1", "--limit", "200", "--ratios", "0.5/0.5,0.7/0.7",
                                 "--seeds", "0,1", "--variants", "one-shot",
                                 "--overrides", '{"short fade": {"method": "rsst", "states": 1, '
                                 '"epochs_per_state": 1, "finetune_epochs": 0}}', "--out", str(tmp_path)])
    assert [(r["ratio"], r["variant"]) for r in report["rows"]] == [
        ("0.5/0.5", "one-shot"), ("0.5/0.5", "short fade"), ("0.7/0.7", "one-shot"), ("0.7/0.7", "short fade")]
    for row in report["rows"]:
        assert len(row["val_top1"]) == 2 and row["mean"] == pytest.approx(sum(row["val_top1"]) / 2)
    table = (tmp_path / "ablation.md").read_text()
    assert "| 0.7/0.7 | short fade |" in table and "test" not in table


def test_refit_series_and_their_targets(tmp_path):
    """Issue 26's Fashion-MNIST study runs through this file: refit (no training) and refit + one
    epoch beside magnitude, with the three refit targets judged from their own points."""
    report = pareto.main([
        "--data", "digits", "--model", "vit-digits", "--dense-epochs", "1", "--limit", "256",
        "--test-limit", "120", "--batch-size", "64", "--methods", "magnitude,refit,refit-ft",
        "--ratios", "0.3/0.3,0.5/0.5", "--global-at", "none", "--distill-at", "none", "--seeds", "0",
        "--refit-finetune", "1", "--calib-images", "64", "--states", "1", "--epochs-per-state", "1",
        "--finetune-epochs", "0", "--bench-seconds", "0.3", "--bench-min-rounds", "1", "--out", str(tmp_path)])
    rows = report["runs"]
    assert sorted((r["series"], r["head_ratio"], r["seed"]) for r in rows if r["method"] != "magnitude") == sorted(
        (m, ratio, seed) for m in ("refit", "refit-ft") for ratio in (0.3, 0.5) for seed in (0,))
    # Magnitude keeps floor(n (1 - r)) heads and neurons in every block (layer-wise); refit, at its
    # own defaults (global), keeps floor(N (1 - r)) of all N together, at least one in a block.
    for r in rows:
        heads, neurons = r["heads_per_block"], r["neurons_per_block"]
        if r["method"] == "magnitude":
            assert heads == [layer_wise_keep(HEADS, r["head_ratio"])] * BLOCKS
            assert neurons == [layer_wise_keep(NEURONS, r["mlp_ratio"])] * BLOCKS
        else:
            assert sum(heads) == layer_wise_keep(BLOCKS * HEADS, r["head_ratio"]) and min(heads) >= 1
            assert sum(neurons) == layer_wise_keep(BLOCKS * NEURONS, r["mlp_ratio"]) and min(neurons) >= 1
    targets = report["targets"]
    near, above, near_ft = (targets[k] for k in ("refit_near_dense_at_0.3/0.3", "refit_above_magnitude_at_0.5/0.5",
                                                 "refit_ft_near_dense_at_0.3/0.3"))
    refit_low = pareto.find(report["aggregates"], "refit", (0.3, 0.3))["mean"]
    assert near["mean"] == refit_low and near["met"] == (refit_low >= report["dense"]["test_top1"] - 0.03 - 1e-9)
    magnitude = pareto.find(report["aggregates"], "magnitude", (0.5, 0.5))["mean"]
    assert above["margin_pt"] == pytest.approx(100 * (pareto.find(report["aggregates"], "refit", (0.5, 0.5))["mean"]
                                                      - magnitude))
    assert near_ft["series"] == "refit-ft" and near_ft["needs_pt"] == pytest.approx(0.5)
    markdown = (tmp_path / "pareto.md").read_text()
    assert "| refit (no training) | 0.3/0.3 |" in markdown and "| refit + fine-tune | 0.5/0.5 |" in markdown
    assert "refit_above_magnitude_at_0.5/0.5: " in markdown
