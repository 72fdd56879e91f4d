"""Pruning to a latency budget from `prune`, `pipeline` and the library: the request, its report,
and budgets that cannot be met. The latency table is synthetic here (measuring one is
`test_latency_model`'s business); the measured speed-up in the report is real."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

import vitcompact as vc
from vitcompact.latency import budget as latency_budget
from vitcompact.latency import BudgetRequest
from vitcompact.cli.app import app
from vitcompact.cli.pipeline_cmd import budget_with_flags
from vitcompact.pipeline import PipelineConfig, run
from vitcompact.latency import LatencyTable

from conftest import one_line_error
from test_pipeline import TINY_TOML, tiny

runner = CliRunner()

# vit-digits: 4 blocks of 4 heads and 128 neurons.
TABLE = LatencyTable({"model": "vit-digits", "synthetic": True}, 4, 0.2, 0.01, (0.0, 0.1, 0.2, 0.3, 0.4),
                     (0, 32, 64, 96, 128), (0.0, 0.1, 0.2, 0.3, 0.4), 3.44)
PRUNE = ["prune", "vit-digits", "--data", "digits", "--method", "oneshot", "--finetune-epochs", "1", "--round-to", "32"]


@pytest.fixture
def synthetic_table(monkeypatch):
    asked = []

    def table(model, backend, batch, threads, round_to=1, **_):
        asked.append((backend, batch, threads, round_to))
        return TABLE
    monkeypatch.setattr(latency_budget, "latency_table", table)
    return asked


def test_prune_to_a_speedup_writes_the_budget_report(tmp_path, synthetic_table):
    result = runner.invoke(app, [*PRUNE, "--target-speedup", "2", "--deploy-batch", "4", "--threads", "1",
                                 "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    assert synthetic_table == [("ort-cpu", 4, 1, 32)]
    report = json.loads((tmp_path / "run" / "latency_budget.json").read_text())
    assert report["request"] == {"kind": "speedup", "target": 2.0, "budget_ms": TABLE.reference_ms / 2, "deploy_batch": 4,
                                 "backend": "ort-cpu", "threads": 1, "block_removal": "last-resort"}
    structure = vc.Structure.load(tmp_path / "run" / "structure.json")
    blocks = structure.shape()
    assert report["predicted"]["ms"] == pytest.approx(TABLE.predict(blocks)) and report["predicted"]["ms"] <= TABLE.reference_ms / 2
    assert report["measured"]["speedup"] > 0 and [b["heads"] for b in report["blocks"]] == [h for h, _ in blocks]
    assert (tmp_path / "run" / "latency_budget.png").stat().st_size > 0
    markdown = (tmp_path / "run" / "latency_budget.md").read_text()
    assert "| requested (2x) | 2.000x |" in markdown
    whole = sum(1 for h, w in blocks if h == 0 and w == 0)
    assert f"Whole blocks removed: {whole} (block removal: last-resort)." in markdown
    summary = json.loads(result.output)
    assert summary["latency_budget"]["requested_speedup"] == pytest.approx(2.0)


def test_a_budget_below_the_fixed_cost_is_refused_and_nothing_is_written(tmp_path, synthetic_table):
    out = tmp_path / "run"
    one_line_error(runner.invoke(app, [*PRUNE, "--latency-ms", "0.1", "--out", str(out)]),
                   "0.1 ms asks for 0.100 ms, below the 0.240 ms the model takes with every block removed")
    assert not out.exists()
    one_line_error(runner.invoke(app, [*PRUNE, "--target-speedup", "2", "--latency-ms", "1", "--out", str(out)]),
                   "a latency budget takes exactly one of a target speed-up or a latency in ms")
    one_line_error(runner.invoke(app, [*PRUNE, "--target-speedup", "0.5", "--out", str(out)]),
                   "target speed-up must be > 1, got 0.5")
    one_line_error(runner.invoke(app, [*PRUNE, "--target-speedup", "2", "--block-removal", "sometimes", "--out",
                                       str(out)]),
                   "unknown block removal 'sometimes'; choose one of: last-resort, free, never")
    assert not out.exists()


def test_pipeline_prunes_to_a_budget_and_reports_it(tmp_path, synthetic_table):
    config = tiny(tmp_path / "run", budget=BudgetRequest(target_speedup=1.5, deploy_batch=2))
    result = run(config)
    report = result.summary["latency_budget"]
    assert report["requested_speedup"] == pytest.approx(1.5) and report["predicted"]["speedup"] >= 1.5
    # The prune stage writes the budget's report beside its masks, as `vitcompact prune` does.
    assert (tmp_path / "run" / "prune" / "latency_budget.png").exists()
    text = (tmp_path / "run" / "report.md").read_text()
    assert "## Latency budget (ort-cpu, batch 2, 1 thread(s))" in text and "![structure](prune/latency_budget.png)" in text
    # The same from a config file's [budget] section, and from flags.
    path = tmp_path / "p.toml"
    path.write_text(TINY_TOML + "[budget]\ntarget_speedup = 1.5\ndeploy_batch = 2\n")
    assert PipelineConfig.from_toml(path).budget == BudgetRequest(target_speedup=1.5, deploy_batch=2)
    path.write_text(TINY_TOML + "[budget]\ntarget_speedup = 1.5\nblock_removal = \"free\"\n")
    assert PipelineConfig.from_toml(path).budget == BudgetRequest(target_speedup=1.5, block_removal="free")
    flagged = runner.invoke(app, ["pipeline", "--config", str(path), "--latency-ms", "0.1", "--out",
                                  str(tmp_path / "flags"), "--json"])
    one_line_error(flagged, "below the 0.240 ms the model takes with every block removed")


def test_pipeline_budget_flags_go_over_the_config_files_budget():
    file = BudgetRequest(target_speedup=1.5, deploy_batch=8, threads=4, block_removal="free")
    assert budget_with_flags(file) == file
    assert budget_with_flags(file, latency_ms=12.0) == BudgetRequest(latency_ms=12.0, deploy_batch=8, threads=4,
                                                                     block_removal="free")
    assert budget_with_flags(file, block_removal="never", threads=None) == dataclasses.replace(file, block_removal="never")
    assert budget_with_flags(None, target_speedup=2.0, backend="torch") == BudgetRequest(target_speedup=2.0, backend="torch")
    assert budget_with_flags(None) is None
    with pytest.raises(vc.ConfigError, match=r"^--deploy-batch sets up a latency budget; give --target-speedup or "
                                             r"--latency-ms \(or a \[budget\] section in the config file\)$"):
        budget_with_flags(None, deploy_batch=8)
    one_line_error(runner.invoke(app, ["pipeline", "--deploy-batch", "8"]), "--deploy-batch sets up a latency budget")
