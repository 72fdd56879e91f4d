"""Latency table: cache key, cache reuse, the measured table's shape and the variants it times.

These tests check correctness only; they time tiny models for a few runs and assert nothing
about speed beyond a loose sanity factor.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch

import vitcompact as vc
from studies import latency_model as latency_study
from vitcompact.latency import table as lm
from vitcompact.latency import LatencyTable

environment_module = importlib.import_module("vitcompact.latency.environment")
FAST = lm.TableTiming(warmup=1, rounds=3, runs_per_round=1, min_rounds=2, seconds_per_variant=0.2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return vc.create_model("vit-digits", depth=2, num_heads=2).eval()  # 2 heads of 32, MLP 128


def fake_table(key: dict, depth: int = 2) -> LatencyTable:
    return LatencyTable(key, depth, 0.1, 0.01, (0.0, 0.05, 0.1), (0, 64, 128), (0.0, 0.04, 0.08), 0.5)


def test_measured_widths_are_an_even_subset_of_the_grid_with_both_ends():
    assert lm.width_grid(100, 32) == [0, 32, 64, 96, 100]
    assert lm.measured_widths(100, 32) == [0, 32, 64, 96, 100]
    assert lm.measured_widths(1536, 1, 9) == [0, 192, 384, 576, 768, 960, 1152, 1344, 1536]
    assert lm.measured_widths(1536, 1) == lm.measured_widths(1536, 1, lm.DEFAULT_MLP_POINTS)
    assert lm.measured_widths(128, 16, 3) == [0, 64, 128]
    with pytest.raises(vc.ConfigError, match="mlp_points"):
        lm.measured_widths(128, 16, 1)


@pytest.mark.parametrize("change", ["backend", "batch", "threads", "round_to", "timm", "onnxruntime", "torch",
                                    "cpu_capability"])
def test_cache_key_changes_with_what_the_timing_depends_on(model, monkeypatch, change):
    args = dict(backend="ort-cpu", batch=1, threads=1, round_to=1)
    before = lm.cache_key(model, **args)
    if change in args:
        args[change] = {"backend": "torch", "batch": 8, "threads": 2, "round_to": 16}[change]
    elif change == "torch":
        monkeypatch.setattr(torch, "__version__", "0.0.1")
    elif change == "cpu_capability":
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "NO AVX")
    else:
        real = environment_module._version
        monkeypatch.setattr(environment_module, "_version", lambda p: "0.0.1" if p == change else real(p))
    after = lm.cache_key(model, **args)
    assert after != before
    assert lm.cache_path(after, "c") != lm.cache_path(before, "c")
    json.dumps(after)  # the key is stored as JSON


def test_cache_key_names_the_model_config(model):
    key = lm.cache_key(model, "ort-cpu", 1, 1)
    assert key["model"]["architecture"] == "vit_tiny_patch16_224"
    assert {k: key["model"][k] for k in ("depth", "num_heads", "head_dim", "hidden", "input_size")} == {
        "depth": 2, "num_heads": 2, "head_dim": 32, "hidden": 128, "input_size": [1, 8, 8]}
    assert {"timm", "torch", "onnxruntime", "onnx", "vitcompact", "cpu", "cpu_capability"} <= set(key["versions"])
    # The bench's exports: a table measured at another opset or graph is not reused.
    assert (key["opset"], key["graph"]) == (20, "token-matrix")


def test_cached_table_is_reused_and_a_stale_one_measured_again(model, monkeypatch, tmp_path):
    calls = []

    def measure(m, backend, batch, threads, round_to, mlp_points, progress=None):
        calls.append((backend, batch, threads))
        return fake_table(lm.cache_key(m, backend, batch, threads, round_to, mlp_points))
    monkeypatch.setattr(lm, "measure_table", measure)
    first = lm.latency_table(model, "ort-cpu", 1, 1, cache_dir=tmp_path)
    again = lm.latency_table(model, "ort-cpu", 1, 1, cache_dir=tmp_path)
    assert len(calls) == 1 and again == first
    path = lm.cache_path(lm.cache_key(model, "ort-cpu", 1, 1), tmp_path)
    stored = json.loads(path.read_text())
    assert stored["key"] == first.key and LatencyTable.from_dict(stored["table"]) == first

    lm.latency_table(model, "ort-cpu", 8, 1, cache_dir=tmp_path)  # another batch: another table
    assert len(calls) == 2
    stored["key"]["versions"]["onnxruntime"] = "0.0.1"  # a file whose stored key no longer matches
    path.write_text(json.dumps(stored))
    lm.latency_table(model, "ort-cpu", 1, 1, cache_dir=tmp_path)
    assert len(calls) == 3 and json.loads(path.read_text())["key"] == first.key
    lm.latency_table(model, "ort-cpu", 1, 1, cache_dir=tmp_path, refresh=True)
    assert len(calls) == 4
    real = environment_module._version
    monkeypatch.setattr(environment_module, "_version", lambda p: "9.9" if p == "timm" else real(p))
    lm.latency_table(model, "ort-cpu", 1, 1, cache_dir=tmp_path)  # timm upgraded
    assert len(calls) == 5


def test_cache_folder_follows_the_environment_variable(model, monkeypatch, tmp_path):
    monkeypatch.setattr(lm, "measure_table", lambda m, *a, **k: fake_table(lm.cache_key(m, *a[:5])))
    monkeypatch.setenv("VITCOMPACT_CACHE", str(tmp_path))
    lm.latency_table(model)
    assert [p.parent for p in tmp_path.rglob("*.json")] == [tmp_path / "latency"]


def test_variant_masks_keep_the_first_units_and_compact_to_those_shapes(model):
    masks = lm.first_units_masks(model, [(1, 0), (0, 64)])
    assert masks.structure().blocks[0].heads == [0] and masks.structure().blocks[1].neurons == list(range(64))
    small = vc.compact(model, masks)
    assert small.blocks[0].attn.num_heads == 1 and isinstance(small.blocks[0].mlp, vc.models.layers.ConstantBranch)
    assert small.blocks[1].mlp.fc1.out_features == 64


def test_measure_table_has_the_model_shape(model):
    table = lm.measure_table(model, "ort-cpu", batch=1, threads=1, round_to=16, mlp_points=3, timing=FAST)
    assert table.depth == 2 and table.num_heads == 2 and len(table.head_ms) == 3
    assert table.mlp_widths == (0, 64, 128)
    assert table.key == lm.cache_key(model, "ort-cpu", 1, 1, 16, 3)
    numbers = [table.fixed_ms, table.base_ms, table.dense_ms, *table.head_ms, *table.mlp_ms]
    assert all(t >= 0 for t in numbers) and table.dense_ms > 0 and table.fixed_ms > 0
    assert table.dense_ms / 3 < table.full_ms < table.dense_ms * 3


def test_validation_and_speedups_run_end_to_end(model):
    table = lm.measure_table(model, "torch", round_to=64, timing=FAST)
    report = latency_study.validate_table(model, table, "torch", structures=2, timing=FAST)
    assert len(report["structures"]) == 2 and report["median_abs_error"] >= 0
    [row] = latency_study.check_speedups(model, table, [1.2], "torch", round_to=64, timing=FAST)
    assert row["predicted"] >= 1.2 - 1e-9 and row["measured"] > 0


def test_refuses_a_compact_or_irregular_model(model):
    small = vc.compact(model, lm.first_units_masks(model, [(1, 128), (2, 128)]))
    with pytest.raises(vc.ConfigError, match="dense model"):
        lm.measure_table(small)
    with pytest.raises(vc.ConfigError, match="unknown bench backend"):
        lm.cache_key(model, "no-such-backend", 1, 1)
