"""Smoke test of the refit timing study (bench/studies/refit_timing.py): a tiny model, 8 images."""

from __future__ import annotations

import json

import pytest

from studies import refit_timing as study


@pytest.mark.parametrize("data", ["random", "digits"])
def test_refit_timing_times_scores_and_refit_and_writes_json(tmp_path, data):
    out = tmp_path / "timing.json"
    report = study.main(["--model", "vit-digits", "--images", "8", "--batch-size", "4", "--data", data,
                         "--extrapolate", "16", "--out", str(out)])
    assert report["images"] == 8 and report["fallbacks"] == 0
    assert (report["criteria"], report["mode"]) == ("fisher", "global")  # refit's defaults, as timed
    assert 0 < report["scores_s"] < report["total_s"] and report["refit_s"] > 0 and report["total_cpu_s"] > 0
    assert report["extrapolated_total_s"] == pytest.approx(2 * report["total_s"])
    assert report["peak_rss_mb"] >= report["peak_rss_before_mb"] > 0 and report["cpu"]
    assert json.loads(out.read_text()) == report
