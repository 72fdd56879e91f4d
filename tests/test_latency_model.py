"""Latency table: cache key, cache reuse, the measured table's shape and the variants it times.

These tests check correctness only; they time tiny models for a few runs and assert nothing
about speed beyond a loose sanity factor.
"""

from __future__ import annotations

import errno
import importlib
import json
import os

import pytest
import torch

import vitcompact as vc
from studies import latency_model as latency_study
from vitcompact.latency import table as lm
from vitcompact.latency import LatencyTable

environment_module = importlib.import_module("vitcompact.latency.environment")
# A few ms per variant (exporting it takes seconds); 20 runs each, so that one slow run on a busy
# machine does not make a whole table implausible (`table_problem`).
FAST = lm.TableTiming(warmup=2, rounds=10, runs_per_round=2, min_rounds=2, seconds_per_variant=0.2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return vc.create_model("vit-digits", depth=2, num_heads=2).eval()  # 2 heads of 32, MLP 128


def fake_table(key: dict, depth: int = 2) -> LatencyTable:
    """A plausible table of the fixture's model at the widths `key` measures."""
    widths = tuple(key.get("mlp_widths", (0, 64, 128)))
    return LatencyTable(key, depth, 0.1, 0.01, (0.0, 0.05, 0.1), widths, tuple(0.08 * w / 128 for w in widths), 0.5)


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

    def measure(m, backend, batch, threads, round_to, mlp_points, progress=None, **_):
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


def _tampered(table: LatencyTable, **fields) -> dict:
    return {**table.to_dict(), **fields}


# A cached table is trusted only while it can be this model's (issue 29): each of these is stale.
TAMPERED_TABLES = [
    ("nan-head", lambda t: _tampered(t, head_ms=[0.0, float("nan"), 0.1]), "holds head_ms nan"),
    ("nan-fixed", lambda t: _tampered(t, fixed_ms=float("nan")), "holds fixed_ms nan"),
    ("negative", lambda t: _tampered(t, mlp_ms=[0.0, -0.04, -0.08]), "holds mlp_ms -0.04"),
    ("huge", lambda t: _tampered(t, mlp_ms=[0.0, 0.04, 1e308]), "holds mlp_ms 1e+308, not a latency in [0, 1e+06] ms"),
    ("decreasing", lambda t: _tampered(t, head_ms=[0.0, 0.1, 0.05]), "holds a head_ms that falls as units are added"),
    ("other-shape", lambda t: _tampered(t, depth=2, head_ms=[0.0] + [0.01 * h for h in range(1, 7)],
                                        mlp_widths=[0, 512, 1024], mlp_ms=[0.0, 0.1, 0.2]),
     "is for 2 blocks of 6 heads and MLP widths [0, 512, 1024], the model has 2 of 2 and [0, 64, 128]"),
    ("off-the-dense-model", lambda t: _tampered(t, dense_ms=50.0),
     "predicts 0.48 ms for the whole model, measured at 50"),
    ("not-a-table", lambda t: {"depth": "two"}, "cannot be read (not a latency table"),
]


@pytest.mark.parametrize("name,tamper,reason", TAMPERED_TABLES, ids=[t[0] for t in TAMPERED_TABLES])
def test_a_tampered_cached_table_is_stale_and_measured_again(model, monkeypatch, tmp_path, name, tamper, reason):
    key = lm.cache_key(model, "ort-cpu", 1, 1, 64, 3)
    good = fake_table(key)
    assert lm.table_problem(good, key) is None
    path = lm.cache_path(key, tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "table": tamper(good)}))
    calls, notes = [], []
    monkeypatch.setattr(lm, "measure_table", lambda m, *a, **k: calls.append(a) or good)
    assert lm.latency_table(model, "ort-cpu", 1, 1, 64, 3, cache_dir=tmp_path, progress=notes.append) == good
    assert len(calls) == 1
    assert len(notes) == 1 and notes[0].startswith(f"latency table {path} ") and reason in notes[0], notes
    assert notes[0].endswith(": stale, measuring it again")
    assert LatencyTable.from_dict(json.loads(path.read_text())["table"]) == good  # replaced by the measured one


@pytest.mark.parametrize("kind", ["a-file", "read-only"])
def test_an_unusable_cache_folder_is_found_before_measuring_and_the_run_goes_on(model, monkeypatch, tmp_path, kind):
    key = lm.cache_key(model, "ort-cpu", 1, 1, 64, 3)
    if kind == "a-file":
        cache = tmp_path / "cache"
        cache.write_text("not a folder")
        expected = "cannot create output folder"
    else:  # a read-only mount (root writes through a folder's mode bits, so the mount is simulated)
        cache = tmp_path / "cache"
        cache.mkdir()

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        monkeypatch.setattr(lm.tempfile, "NamedTemporaryFile", read_only)
        expected = f"cannot write in {cache}: Read-only file system"
    events = []
    monkeypatch.setattr(lm, "measure_table", lambda m, *a, **k: events.append("measured") or fake_table(key))
    table = lm.latency_table(model, "ort-cpu", 1, 1, 64, 3, cache_dir=cache, progress=events.append)
    assert table == fake_table(key)
    assert len(events) == 2 and events[1] == "measured"  # the note comes before the measuring
    assert events[0].startswith("latency cache not usable (") and expected in events[0]
    assert events[0].endswith("); measuring without caching")
    if kind == "a-file":
        assert cache.read_text() == "not a folder"


def test_a_measured_table_never_gets_faster_with_more_units():
    assert lm._rising((0.0, 0.3, 0.25, 0.4)) == (0.0, 0.3, 0.3, 0.4)


def test_the_backend_precision_is_part_of_the_key(model):
    """Issue 27: an OpenVINO bf16 table is never read for f32 (f32 is the default)."""
    pytest.importorskip("openvino", reason="OpenVINO is an optional extra (vitcompact[openvino])")
    f32, bf16 = (lm.cache_key(model, "openvino", 1, 1, 64, 3, precision=p) for p in ("f32", "bf16"))
    assert (f32["precision"], bf16["precision"]) == ("f32", "bf16") and "openvino" in f32["versions"]
    assert lm.cache_path(f32, "c") != lm.cache_path(bf16, "c")
    assert lm.cache_key(model, "openvino", 1, 1, 64, 3) == f32
    assert lm.cache_key(model, "ort-cpu", 1, 1)["precision"] is None
    with pytest.raises(vc.ConfigError, match=r"^precision is set by backend openvino only; backend ort-cpu runs"):
        lm.cache_key(model, "ort-cpu", 1, 1, precision="bf16")
    with pytest.raises(vc.ConfigError, match="OpenVINO precision"):
        lm.cache_key(model, "openvino", 1, 1, precision="fp8")


def test_the_token_axis_is_part_of_the_key(model):
    plain, tokens = lm.cache_key(model, "ort-cpu", 1, 1), lm.cache_key(model, "ort-cpu", 1, 1, tokens=True)
    assert plain["tokens"] is None and tokens["tokens"] == {"counts": [7, 10, 14, 17], "merge_r": [1, 2, 4, 5],
                                                            "prefix_tokens": 1, "schedule": "constant"}
    assert lm.cache_path(plain, "c") != lm.cache_path(tokens, "c") and plain["schema"] == "vitcompact.latency-table/2"


def test_a_cache_file_of_the_older_schema_is_measured_again(model, monkeypatch, tmp_path):
    """A /1 file (no precision, no token axis in its key) sits at another path; were it at this
    path, its key would differ: either way it is measured again, never read."""
    key = lm.cache_key(model, "ort-cpu", 1, 1, 64, 3)
    old = {k: v for k, v in key.items() if k not in ("precision", "tokens")} | {"schema": "vitcompact.latency-table/1"}
    path = lm.cache_path(key, tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": old, "table": fake_table(old).to_dict() | {"tokens": None}}))
    calls, notes = [], []
    monkeypatch.setattr(lm, "measure_table", lambda m, *a, **k: calls.append(a) or fake_table(key))
    lm.latency_table(model, "ort-cpu", 1, 1, 64, 3, cache_dir=tmp_path, progress=notes.append)
    assert len(calls) == 1 and "was stored for another model, backend or machine" in notes[0]


@pytest.mark.slow
def test_a_table_measures_on_openvino_and_is_cached_by_precision(model, monkeypatch, tmp_path):
    pytest.importorskip("openvino", reason="OpenVINO is an optional extra (vitcompact[openvino])")
    monkeypatch.setattr(lm, "TableTiming", lambda: FAST)
    notes = []
    table = lm.latency_table(model, "openvino", 1, 1, 64, 2, cache_dir=tmp_path, precision="f32",
                             progress=notes.append)
    assert table.key["precision"] == "f32" and table.key["backend"] == "openvino"
    assert table.num_heads == 2 and table.mlp_widths == (0, 128) and table.dense_ms > 0
    assert lm.table_problem(table, table.key) is None
    assert lm.cache_path(table.key, tmp_path).is_file()
    assert lm.latency_table(model, "openvino", 1, 1, 64, 2, cache_dir=tmp_path, progress=notes.append) == table
    assert notes[-1].startswith("latency table from ")
