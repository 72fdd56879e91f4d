"""Smoke test of the refit study (bench/studies/refit.py): it runs every variant and writes its files."""

from __future__ import annotations

import json

from studies import refit as study


def test_refit_study_runs_every_variant_and_writes_json_markdown_and_plot(tmp_path):
    report = study.main(["--seeds", "0", "--ratios", "0.5/0.5", "--dense-epochs", "0", "--finetune", "0",
                         "--out", str(tmp_path)])
    names = [r["variant"] for r in report["rows"]]
    assert names[0] == "dense" and len(names) == 1 + len(study.variants(0))
    assert all(0.0 <= r["val_top1"] <= 1.0 for r in report["rows"])
    # vit-digits has 4 blocks of 4 heads and 128 neurons: half of them kept, per block or in all.
    kept = {r["variant"]: (r["heads"], r["neurons"]) for r in report["rows"][1:]}
    assert kept["activation scores, layer-wise"] == kept["refit global"] == (8, 256)
    assert json.loads((tmp_path / "refit.json").read_text())["rows"] == report["rows"]
    table = (tmp_path / "refit.md").read_text()
    assert "| refit global | " in table and "| activation scores, layer-wise | 8 / 256 |" in table and (tmp_path / "refit.png").stat().st_size > 0
