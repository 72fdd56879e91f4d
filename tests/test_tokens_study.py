"""The token-merging study (bench/studies/tokens.py): its measurement of one model, its plan on digits
(every series measured and timed once, a second run reads finished units back) and its target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vitcompact as vc
from studies import tokens as study

def test_evaluate_gives_fp32_and_static_int8_top1_from_onnxruntime(tmp_path):
    model = vc.merge_tokens(vc.create_model("vit-digits", depth=2), vc.TokenMergeConfig(r=2)).eval()
    data = vc.load_data("digits", batch_size=16, limit=96)
    rows = study.evaluate(model, "m", tmp_path, data, model="dense", r=2, training="none", seed=None)
    assert [r["precision"] for r in rows] == ["fp32", "int8"]
    assert [Path(r["file"]).name for r in rows] == ["m.onnx", "m.int8.onnx"] and all(Path(r["file"]).is_file() for r in rows)
    torch_top1 = vc.evaluate(model, data.test)["top1"]
    assert abs(rows[0]["test_top1"] - torch_top1) <= 1 / len(data.test.dataset)  # at most one image apart
    assert all(r["r"] == 2 and r["model"] == "dense" for r in rows)


def test_tokens_study_measures_every_series_and_resumes(tmp_path, monkeypatch):
    """The study's plan on digits with one seed; exporting and timing (tested above and in the bench
    tests) are replaced by records of what was asked."""
    evaluated, timed, heads, widths = [], [], {}, {}

    def fake_evaluate(net, label, folder, data, **key):
        evaluated.append((label, vc.get_record(net).token_merge))
        heads[label] = net.blocks[0].attn.num_heads
        widths[label] = net.blocks[0].mlp.fc1.out_features
        return [{**key, "precision": p, "test_top1": 0.5, "val_top1": 0.5, "file": f"{label}.{p}"}
                for p in ("fp32", "int8")]

    def fake_time(dense, other, batch, threads, seconds):
        timed.append((dense, other, batch))
        return {"dense_p50_ms": 2.0, "p50_ms": 1.0, "speedup": 2.0, "speedup_low": 1.9, "speedup_high": 2.1,
                "rounds": 3}

    monkeypatch.setattr(study, "evaluate", fake_evaluate)
    monkeypatch.setattr(study, "time_pair", fake_time)
    argv = ["--data", "digits", "--dense", str(tmp_path / "none"), "--dense196", str(tmp_path / "ref"),
            "--img196", "16", "--r-values196", "1", "--seeds", "0", "--limit", "64", "--finetune-epochs", "1",
            "--train196-epochs", "1", "--train196-finetune-epochs", "1", "--stack-epochs", "1", "--stack-limit", "256",
            "--dense196w", str(tmp_path / "wide"), "--r-values196w", "2", "--train196w-epochs", "1",
            "--train196w-finetune-images", "64", "--stack196w-mlp-ratio", "0.5", "--skip-speed", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out")]
    report = study.main(argv)
    ref, wide = report["references"]
    # the reference: 16 px, patch 4 (trained at 8 px first); merging on the decreasing schedule (2, 1, 1, 0, 0, 0)
    assert ref["info"]["tokens"] == [17] * 6 and ref["info"]["token_counts"] == {"1": [17, 15, 14, 13, 13, 13]}
    assert vc.input_size(vc.load(tmp_path / "ref")) == (1, 16, 16)
    merges = {label: (merge.r, merge.schedule) if merge else 0 for label, merge in evaluated}
    one, two = (1, "decreasing"), (2, "decreasing")
    assert merges == {"dense-r0": 0, "dense-r1": one, "s0-dense-ft-r1": one, "s0-compact-r0": 0, "s0-compact-r1": one,
                      "s0-compact-ft-r1": one, "s0-stack-r1": one,
                      "dense-r2": two, "stack-r0": 0, "stack-r2": two}  # the last three: the wide reference
    assert ref["info"]["stack"] == {"head_ratio": 2 / 3, "mlp_ratio": 0.5, "r": 1, "epochs": 1, "lr": 3e-4, "images": 256}
    # the stack keeps 1 of the 3 heads, the one-shot compact model 2
    assert heads["s0-stack-r1"] == 1 and heads["s0-compact-ft-r1"] == 2 and heads["dense-r1"] == 3
    series = {(a["model"], a["r"], a["training"], a["precision"]) for a in ref["aggregates"]}
    expected = {("dense", 0, "none"), ("dense", 1, "none"), ("dense", 1, "fine-tuned with merging"),
                ("compact", 0, "one-shot fine-tune"), ("compact", 1, "one-shot fine-tune, merging off the shelf"),
                ("compact", 1, "one-shot fine-tune with merging"), (study.STACK_MODEL, 1, study.STACK_TRAINING)}
    assert series == {(*s, p) for s in expected for p in ("fp32", "int8")}
    # one timing per (model, r, precision), on its first file, against the dense FP32 file at batch 8
    # (the wide reference's files after the narrow one's)
    narrow_files = ["dense-r0.int8", "dense-r1.fp32", "dense-r1.int8", "s0-compact-r0.fp32", "s0-compact-r0.int8",
                    "s0-compact-r1.fp32", "s0-compact-r1.int8", "s0-stack-r1.fp32", "s0-stack-r1.int8"]
    assert sorted(other for _, other, _ in timed[:len(narrow_files)]) == sorted(narrow_files)
    assert sorted(other for _, other, _ in timed[len(narrow_files):]) == sorted(
        ["dense-r0.int8", "dense-r2.fp32", "dense-r2.int8", "stack-r0.fp32", "stack-r0.int8", "stack-r2.fp32",
         "stack-r2.int8"])

    # The wide reference (192 wide, MLP x4; trained at 8 px, then on 64 images at 16 px): dense and the
    # refit stack (half of the neurons, every head; no training) with merging off the shelf at r = 2.
    wide_model = vc.load(tmp_path / "wide")
    assert (wide_model.embed_dim, wide_model.blocks[0].mlp.fc1.out_features) == (192, 768)
    assert vc.input_size(wide_model) == (1, 16, 16)
    assert "64 images" in json.loads((tmp_path / "wide" / "config.json").read_text())["vitcompact"]["provenance"]["train"]
    assert wide["info"]["stack"] == {"head_ratio": 0.0, "mlp_ratio": 0.5, "r": None, "epochs": 0, "lr": None,
                                     "images": None}
    assert {(a["model"], a["r"], a["training"], a["precision"]) for a in wide["aggregates"]} == {
        (m, r, t, p) for m, t in (("dense", "none"), (study.STACK_MODEL, study.STACK_NO_TRAINING))
        for r in (0, 2) for p in ("fp32", "int8")}
    assert all(row["seed"] is None for row in wide["rows"])
    assert wide["info"]["token_counts"] == {"2": [17, 13, 10, 8, 7, 7]}
    assert (heads["stack-r2"], widths["stack-r2"]) == (3, 384)
    assert {(d, b) for d, _, b in timed} == {("dense-r0.fp32", 8)}
    saved = json.loads((tmp_path / "out" / "tokens.json").read_text())
    assert saved["references"][0]["rows"] == ref["rows"] and len(ref["rows"]) == 14 and len(wide["rows"]) == 8
    assert "| compact | 1 | one-shot fine-tune with merging | int8 | 50.00 |" in (tmp_path / "out" / "tokens.md").read_text()
    assert (tmp_path / "out" / "tokens.png").stat().st_size > 0

    # Run again: every unit is read back from the work folder, nothing is trained or measured.
    evaluated.clear()
    monkeypatch.setattr(vc, "prune", lambda *a, **k: pytest.fail("a finished unit was trained again"))
    again = study.main(argv + ["--skip-timing"])
    assert again["references"][0]["rows"] == ref["rows"] and evaluated == []


def test_full_stack_target_needs_4x_within_one_point():
    def agg(model, r, training, precision, mean, speedup):
        return {"model": model, "r": r, "training": training, "precision": precision, "mean": mean,
                "speedup": speedup}

    rows = [agg("dense", 0, "none", "fp32", 0.90, 1.0),
            agg("compact", 8, "one-shot fine-tune with merging", "int8", 0.891, 4.2),  # -0.9 point, 4.2x: met
            agg("compact", 16, "one-shot fine-tune, merging off the shelf", "int8", 0.88, 5.0),  # -2 points
            agg("compact", 4, "one-shot fine-tune, merging off the shelf", "int8", 0.899, 3.9)]  # under 4x
    target = study.full_stack_target(rows, 8)
    assert [s["met"] for s in target["stacks"]] == [True, False, False]
    assert target["met"] is True
    assert study.full_stack_target(rows[:1] + rows[2:], 8)["met"] is False
