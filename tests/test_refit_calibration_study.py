"""Smoke test of the calibration-count study (bench/studies/refit_calibration.py), and its tables."""

from __future__ import annotations

import json

from studies import refit_calibration as study


def test_calibration_study_runs_each_seed_ratio_and_count_and_writes_its_files(tmp_path):
    report = study.main(["--skip-fashion", "--digits-seeds", "0,1", "--digits-epochs", "0", "--ratios", "0.5/0.5",
                         "--digits-counts", "64,5000", "--out", str(tmp_path)])
    rows = report["rows"]
    assert [(r["seed"], r["images"] == 64) for r in rows] == [(0, True), (0, False), (1, True), (1, False)]
    # more images than the training split holds: the run reads them all, and says how many
    assert all(r["images"] < 5000 for r in rows[1::2]) and rows[1]["images"] == rows[3]["images"]
    assert all(0.0 <= r["val_top1"] <= 1.0 and r["seconds"] > 0 and "test_top1" not in r for r in rows)
    saved = json.loads((tmp_path / "refit-calibration.json").read_text())
    assert saved["rows"] == rows and saved["environment"]["backend"] == "torch-cpu" and saved["environment"]["cpu"]
    table = (tmp_path / "refit-calibration.md").read_text()
    assert "fashion-mnist" not in table and "| 64 | " in table
    assert (tmp_path / "refit-calibration.png").stat().st_size > 0


def test_tables_average_seeds_and_put_validation_beside_test():
    rows = [{"data": "digits", "seed": s, "ratio": "0.3/0.3", "images": 64, "val_top1": v}
            for s, v in ((0, 0.5), (1, 0.7))]
    rows.append({"data": "fashion-mnist", "ratio": "0.3/0.3", "images": 128, "val_top1": 0.86, "test_top1": 0.85})
    report = {"rows": rows, "dense": {"digits": {"val_top1": 0.9}, "fashion-mnist": {"val_top1": 0.8958,
                                                                                     "test_top1": 0.8919}}}
    assert study.curves(rows, "digits", "val_top1") == {"0.3/0.3": {64: 0.6}}
    assert study.curves(rows, "digits", "test_top1") == {}
    assert study.to_markdown(report).splitlines() == [
        "fashion-mnist: top-1 (%), validation / test; dense 89.58 / 89.19.", "",
        "| calibration images | 0.3/0.3 |", "|---:|---:|", "| 128 | 86.00 / 85.00 |", "",
        "digits: top-1 (%), validation, mean over seeds; dense 90.00.", "",
        "| calibration images | 0.3/0.3 |", "|---:|---:|", "| 64 | 60.00 |"]
