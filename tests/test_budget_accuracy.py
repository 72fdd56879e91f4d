"""The budgeted-vs-uniform study runs end to end on digits with tiny budgets and writes its files
(a synthetic latency table: measuring one is test_latency_model's business)."""

from __future__ import annotations

import json

from studies import budget_accuracy
from vitcompact.latency import budget as latency_budget

from test_budget_cli import TABLE


def test_study_runs_and_writes_its_three_files(tmp_path, monkeypatch):
    monkeypatch.setattr(latency_budget, "latency_table", lambda model, *a, **k: TABLE)
    out = tmp_path / "budget"
    report = budget_accuracy.main(["--data", "digits", "--model", "vit-digits", "--limit", "200", "--seeds", "0",
                                   "--dense-epochs", "1", "--states", "1", "--epochs-per-state", "1",
                                   "--finetune-epochs", "0", "--bench-seconds", "0.5", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["budget_accuracy.json", "budget_accuracy.md", "budget_accuracy.png"]
    saved = json.loads((out / "budget_accuracy.json").read_text())
    assert [(r["kind"], r["seed"]) for r in saved["rows"]] == [("uniform", 0), ("budgeted", 0)]
    assert saved["target_speedup"] == report["rows"][0]["measured_speedup"]
    uniform, budgeted = saved["rows"]
    assert uniform["heads_per_block"] == [2, 2, 2, 2] and uniform["neurons_per_block"] == [64, 64, 64, 64]
    # The budgeted structure meets the synthetic table's budget at the uniform point's measured speed-up.
    shape = list(zip(budgeted["heads_per_block"], budgeted["neurons_per_block"]))
    assert TABLE.predict(shape) <= TABLE.reference_ms / saved["target_speedup"] + 1e-9
    assert "| 0 | budgeted |" in (out / "budget_accuracy.md").read_text()
