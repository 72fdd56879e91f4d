"""Token merging through the tool: the model's record, artifacts, compaction, accounting, ONNX metadata,
pruning (the pruned model merging, fine-tuning with merging), the CLI (`export onnx`, `bench`, `compact`,
`prune`, `pipeline`) and the pipeline's report."""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Iterator

import numpy as np
import pytest
import torch
from conftest import input_for, one_line_error, randomize_
from test_pipeline import tiny as tiny_pipeline
from typer.testing import CliRunner

import vitcompact as vc
from vitcompact.cli.app import app
from vitcompact.export import read_metadata
from vitcompact.export.verify import ort_session
from vitcompact.models.record import RECORD_ATTR
from vitcompact.models.token_merge import TokenMergeConfig, get_token_merge, merge_schedule, merge_tokens, \
    model_token_counts
from vitcompact.pipeline import run
from vitcompact.pruning.configs import OneShotConfig
from vitcompact.training import TrainConfig, evaluate

runner = CliRunner()


def digits(seed: int = 0) -> torch.nn.Module:
    """vit-digits: 16 patches and a class token, 4 blocks of 4 heads of 16, 64 wide, MLP 128."""
    torch.manual_seed(seed)
    return randomize_(vc.create_model("vit-digits", num_classes=10), seed)


def half_masks(model: torch.nn.Module) -> vc.PruneMasks:
    """Half the heads and neurons of every block, and every head of block 0."""
    masks = vc.regroup(model, vc.magnitude_prune(model, rate=0.5),
                       vc.RegroupConfig(target="both", head_ratio=0.5, mlp_ratio=0.5))
    masks.masks["blocks.0.attn.qkv.weight"][:] = False
    masks.masks["blocks.0.attn.proj.weight"][:] = False
    return masks


def outputs(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


# The record

def test_the_setting_lives_in_the_record_only():
    model = merge_tokens(digits(), TokenMergeConfig(r=2))
    assert vc.get_record(model).token_merge == TokenMergeConfig(r=2) == get_token_merge(model)
    assert sorted(k for k in vars(model) if k.startswith("vitcompact")) == [RECORD_ATTR]
    twin = copy.deepcopy(model)
    assert get_token_merge(twin) == TokenMergeConfig(r=2)
    images = input_for(model, 2)
    assert torch.equal(outputs(twin, images), outputs(model, images))
    merge_tokens(model, None)
    assert vc.get_record(model).token_merge is None and get_token_merge(twin) is not None
    foreign = torch.nn.Module()
    assert get_token_merge(foreign) is None


# Artifacts

@pytest.mark.parametrize("kind", ["dense", "compact"])
def test_artifact_round_trips_the_setting(kind, tmp_path):
    model = digits()
    if kind == "compact":
        model = vc.compact(model, half_masks(model))
    config = TokenMergeConfig(r=2, schedule="decreasing", proportional_attention=False)
    merge_tokens(model, config)
    vc.save(model, tmp_path / "m")
    section = json.loads((tmp_path / "m" / "config.json").read_text())["vitcompact"]
    assert section["token_merge"] == config.to_dict()
    assert section["accounting"]["compact"]["macs"] == vc.count(model).macs < section["accounting"]["dense"]["macs"]
    loaded = vc.load(tmp_path / "m")
    assert get_token_merge(loaded) == config and vc.get_record(loaded) == vc.get_record(model)
    images = input_for(model, 3)
    assert torch.equal(outputs(loaded, images), outputs(model, images))


def test_an_artifact_without_merging_has_no_token_merge_key(tmp_path):
    model = merge_tokens(merge_tokens(digits(), TokenMergeConfig(r=2)), None)
    vc.save(model, tmp_path / "m")
    assert "token_merge" not in json.loads((tmp_path / "m" / "config.json").read_text())["vitcompact"]
    assert get_token_merge(vc.load(tmp_path / "m")) is None


@pytest.mark.parametrize("value, message", [
    ({"r": -1}, "vitcompact.token_merge: token merge r must be >= 0"),
    ({"r": 2, "ratio": 0.5}, "vitcompact.token_merge: unknown key(s) ratio"),
    ({"r": "2"}, "vitcompact.token_merge: r must be an integer"),
    ([2], "vitcompact.token_merge must be an object"),
    ({"r": 9}, "vitcompact.token_merge does not fit the model (8x8 input): token merge r=9 is larger than half"),
    ({"r": 2, "protect_cls": False}, "protect_cls=False would merge the model's 1 prefix token"),
])
def test_a_bad_recorded_setting_is_one_line_artifact_error(value, message, tmp_path):
    model = merge_tokens(digits(), TokenMergeConfig(r=2))
    vc.save(model, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    raw = json.loads(path.read_text())
    raw["vitcompact"]["token_merge"] = value
    path.write_text(json.dumps(raw))
    with pytest.raises(vc.ArtifactError) as error:
        vc.load(tmp_path / "m")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_compacting_a_merging_model_keeps_the_setting():
    model = merge_tokens(digits(), TokenMergeConfig(r=3))
    masks = half_masks(model)
    small = vc.compact(model, masks)
    assert get_token_merge(small) == TokenMergeConfig(r=3)
    # The same as compacting first and merging after; the dense accounting is the model's without merging.
    plain = vc.compact(merge_tokens(copy.deepcopy(model), None), masks)
    merge_tokens(plain, TokenMergeConfig(r=3))
    images = input_for(model, 3)
    assert torch.equal(outputs(small, images), outputs(plain, images))
    assert vc.get_record(small).dense == vc.count(model, merged=False).to_dict()


# Accounting

def _hand_macs(attn_tokens, mlp_tokens, heads=(4, 4, 4, 4), hidden=(128, 128, 128, 128)):
    """Per block: qkv, q·kᵀ and attn·v, proj on the attention's tokens; fc1 and fc2 on the MLP's."""
    dim = 64
    return [t * dim * 3 * (16 * h) + 2 * t * t * (16 * h) + t * (16 * h) * dim + 2 * m * dim * w
            for t, m, h, w in zip(attn_tokens, mlp_tokens, heads, hidden)]


@pytest.mark.parametrize("config, attn, mlp", [
    (TokenMergeConfig(r=3), [17, 14, 11, 8], [14, 11, 8, 5]),
    (TokenMergeConfig(r=2, schedule="decreasing"), [17, 13, 11, 10], [13, 11, 10, 10]),
])
def test_count_takes_the_merged_tokens_of_every_block(config, attn, mlp):
    model = digits()
    plain = vc.count(model)
    assert [b.macs for b in plain.blocks] == _hand_macs([17] * 4, [17] * 4)
    merge_tokens(model, config)
    merged = vc.count(model)
    assert [b.macs for b in merged.blocks] == _hand_macs(attn, mlp)
    assert merged.macs == plain.other_macs + sum(_hand_macs(attn, mlp)) and merged.params == plain.params
    assert vc.count(model, merged=False).to_dict() == plain.to_dict()


def test_count_of_a_merging_compact_model():
    model = digits()
    small = merge_tokens(vc.compact(model, half_masks(model)), TokenMergeConfig(r=3))
    heads = [b.heads for b in vc.count(small).blocks]
    hidden = [b.neurons for b in vc.count(small).blocks]
    assert heads[0] == 0
    assert [b.macs for b in vc.count(small).blocks] == _hand_macs([17, 14, 11, 8], [14, 11, 8, 5], heads, hidden)


# ONNX

def test_export_records_the_merge_and_its_int8_files_keep_it(tmp_path, plain_onnx):
    """`export onnx --token-merge` with dynamic INT8: both files merge, run, and say so in their metadata."""
    model = digits()
    vc.save(model, tmp_path / "dense")
    out = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", "onnx", str(tmp_path / "dense"), str(out), "--token-merge", "3",
                                 "--int8", "dynamic", "--optimize", "off", "--json"])
    assert result.exit_code == 0, result.output
    files = json.loads(result.stdout)
    assert [f["precision"] for f in files] == ["fp32", "int8"] and files[0]["parity"]["passed"]
    merged = merge_tokens(copy.deepcopy(model), TokenMergeConfig(r=3))
    for path in (out, tmp_path / "model.int8.onnx"):
        meta = read_metadata(path)
        assert meta["token_merge"] == TokenMergeConfig(r=3).to_dict()
        assert meta["block_tokens"] == [17, 14, 11, 8] and meta["macs"] == vc.count(merged).macs
    images = input_for(model, 2)
    fp32 = ort_session(out).run(None, {"images": images.numpy()})[0]
    np.testing.assert_allclose(fp32, outputs(merged, images).numpy(), atol=1e-4, rtol=0)
    int8 = ort_session(tmp_path / "model.int8.onnx").run(None, {"images": images.numpy()})[0]
    assert int8.shape == (2, 10) and np.isfinite(int8).all()
    assert "token_merge" not in read_metadata(plain_onnx)


@pytest.fixture(scope="module")
def plain_onnx(tmp_path_factory):
    """`digits()` exported without merging (no verification, no graph optimisation), once for the module."""
    from vitcompact.export import ExportConfig, to_onnx
    return to_onnx(digits(), tmp_path_factory.mktemp("plain") / "plain.onnx",
                   ExportConfig(optimize="off", verify=False)).path


# The CLI

@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("token-merge-cli")
    model = digits()
    masks = half_masks(model)
    masks.apply_(model)
    vc.save(model, root / "pruned")
    masks.save(root / "masks.safetensors")
    return root


def test_compact_command_records_the_merge(pruned, tmp_path):
    out = tmp_path / "compact"
    result = runner.invoke(app, ["compact", str(pruned / "pruned"), "--masks", str(pruned / "masks.safetensors"),
                                 "--out", str(out), "--token-merge", "2", "--token-merge-schedule", "decreasing",
                                 "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    small = vc.load(out)
    assert get_token_merge(small) == TokenMergeConfig(r=2, schedule="decreasing")
    assert summary["token_merge"] == TokenMergeConfig(r=2, schedule="decreasing").to_dict()
    assert summary["compact"]["macs"] == vc.count(small).macs
    assert summary["ideal_speedup"] == pytest.approx(summary["dense"]["macs"] / vc.count(small).macs)


@pytest.mark.parametrize("args, message", [
    (["--token-merge", "-1"], "token merge r must be >= 0"),
    (["--token-merge", "9"], "token merge r=9 is larger than half the 16 mergeable tokens of block 0"),
    (["--token-merge", "4"], "token merge r=4 is larger than half the 4 mergeable tokens of block 3 "
                             "(5 tokens, 1 protected); use r <= 3"),
    (["--token-merge-schedule", "decreasing"], "--token-merge-schedule needs --token-merge R"),
    (["--token-merge", "2", "--token-merge-schedule", "cosine"], "unknown token merge schedule 'cosine'"),
])
def test_bad_token_merge_is_one_line(pruned, tmp_path, args, message):
    one_line_error(runner.invoke(app, ["export", "onnx", "vit-digits", str(tmp_path / "m.onnx"), *args]), message)
    one_line_error(runner.invoke(app, ["compact", str(pruned / "pruned"), "--out", str(tmp_path / "c"), *args]),
                   message)
    one_line_error(runner.invoke(app, ["bench", "vit-digits", "vit-digits", *args]), message)
    one_line_error(runner.invoke(app, ["prune", "vit-digits", "--data", "digits", "--out", str(tmp_path / "p" / "q"),
                                       *args]), message)
    assert list(tmp_path.iterdir()) == []


def test_bench_merges_the_compact_model_only(plain_onnx):
    exported = plain_onnx
    one_line_error(runner.invoke(app, ["bench", "vit-digits", str(exported), "--token-merge", "2"]),
                   f"token merging cannot be added to the exported file {exported}")
    # A dense export at another input size than the merging model's.
    one_line_error(runner.invoke(app, ["bench", "vit-cifar-tiny", "vit-digits", "--token-merge", "2"]),
                   "dense input [3, 32, 32] and compact input [1, 8, 8] differ")
    result = runner.invoke(app, ["bench", str(exported), "vit-digits", "--token-merge", "3", "--batch-sizes", "2",
                                 "--threads", "1", "--rounds", "1", "--runs-per-round", "1", "--json"])
    assert result.exit_code == 0, result.output
    bench = json.loads(result.stdout)
    assert bench["compact"]["label"] == "vit-digits + token merging r=3"
    merged = vc.count(merge_tokens(vc.create_model("vit-digits"), TokenMergeConfig(r=3))).macs
    assert bench["compact"]["macs"] == merged and bench["dense"]["macs"] == vc.count(digits()).macs


# Pruning

@contextlib.contextmanager
def mlp_tokens(model: torch.nn.Module) -> Iterator[list[tuple[bool, int]]]:
    """Record (training, tokens) of every block's MLP input, in call order, for the block."""
    seen: list[tuple[bool, int]] = []

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        seen.append((module.training, args[0].shape[1]))
    handles = [block.mlp.register_forward_hook(hook) for block in model.blocks]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def merged_mlp_tokens(model: torch.nn.Module, config: TokenMergeConfig) -> list[int]:
    """The tokens each block's MLP sees when `model` merges as `config` says (after the block's merge)."""
    return [n - r for n, r in zip(model_token_counts(model, config), merge_schedule(len(model.blocks), config))]


def test_prune_saves_the_model_merging_with_both_accuracies_on_the_same_split(tmp_path):
    out, config = tmp_path / "p", TokenMergeConfig(r=2, schedule="decreasing")
    result = runner.invoke(app, ["prune", "vit-digits", "--data", "digits", "--head-ratio", "0.5", "--mlp-ratio", "0.5",
                                 "--finetune-epochs", "0", "--token-merge", "2", "--token-merge-schedule", "decreasing",
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    merge = summary["token_merge"]
    assert {k: merge[k] for k in config.to_dict()} == config.to_dict() and not merge["finetuned_with_merging"]
    assert json.loads((out / "result.json").read_text())["token_merge"] == merge
    section = json.loads((out / "config.json").read_text())["vitcompact"]
    assert section["token_merge"] == config.to_dict() and section["provenance"]["token_merge"] == merge
    loaded = vc.load(out)
    assert get_token_merge(loaded) == config
    with mlp_tokens(loaded) as seen:
        outputs(loaded, input_for(loaded, 2))
    assert [n for _, n in seen] == merged_mlp_tokens(loaded, config) == [13, 11, 10, 10]
    # Both accuracies are the saved model's, without and with merging, on the split the summary names.
    _, data = vc.model_and_data("vit-digits", "digits", seed=0, batch_size=64)
    for split in ("val", "test"):
        loader = getattr(data, split)
        assert summary[split]["top1"] == merge[f"{split}_top1"]["with"] == evaluate(loaded, loader)["top1"]
        assert merge[f"{split}_top1"]["without"] == evaluate(merge_tokens(loaded, None), loader)["top1"]
        merge_tokens(loaded, config)
    text = runner.invoke(app, ["prune", "vit-digits", "--data", "digits", "--finetune-epochs", "0", "--token-merge",
                               "2", "--out", str(tmp_path / "q")])
    assert text.exit_code == 0, text.output
    assert "token merging r=2 (constant): val top1 " in " ".join(text.output.split())


@pytest.mark.parametrize("during", [False, True], ids=["merge-after", "merge-during-finetune"])
def test_finetune_trains_on_merged_tokens_when_asked(bundle, during):
    model, config = digits(), TokenMergeConfig(r=2)
    prune_config = OneShotConfig(head_ratio=0.5, mlp_ratio=0.5, finetune_epochs=1, token_merge=config,
                                 finetune_token_merge=during, train=TrainConfig(progress=False))
    with mlp_tokens(model) as seen:
        result = vc.prune(model, bundle, prune_config)
    trained = [n for training, n in seen if training]
    assert trained, "fine-tuning ran no forward pass"
    blocks = len(model.blocks)
    expected = merged_mlp_tokens(model, config) if during else [17] * blocks
    assert [trained[i:i + blocks] for i in range(0, len(trained), blocks)] == [expected] * (len(trained) // blocks)
    assert get_token_merge(result.model) == config and result.token_merge["finetuned_with_merging"] is during
    assert result.val["top1"] == result.token_merge["val_top1"]["with"]


@pytest.mark.parametrize("args, message", [
    (["--finetune-token-merge"], "finetune_token_merge needs token merging: token_merge with r >= 1"),
    (["--finetune-token-merge", "--token-merge", "0"], "finetune_token_merge needs token merging: token_merge with r >= 1"),
    (["--finetune-token-merge", "--token-merge", "2", "--finetune-epochs", "0"],
     "finetune_token_merge needs fine-tuning: finetune_epochs >= 1"),
    (["--token-merge", "6"], "token merge r=6 is larger than half the 10 mergeable tokens of block 1"),
])
def test_prune_refuses_a_bad_merge_setting_before_writing(tmp_path, args, message):
    one_line_error(runner.invoke(app, ["prune", "vit-digits", "--data", "digits", "--out", str(tmp_path / "p"), *args]),
                   message)
    assert list(tmp_path.iterdir()) == []


def test_library_prune_refuses_a_too_large_merge_before_its_folder(bundle, tmp_path):
    config = OneShotConfig(finetune_epochs=0, token_merge=TokenMergeConfig(r=9))
    with pytest.raises(vc.ConfigError, match="token merge r=9 is larger than half"):
        vc.prune(digits(), bundle, config, vc.RunFolder(tmp_path / "p"))
    assert list(tmp_path.iterdir()) == []


# The pipeline

def test_pipeline_ships_the_compact_model_merging_and_reports_both(tmp_path, digits_two_blocks):
    result = run(tiny_pipeline(tmp_path / "run", model=digits_two_blocks, token_merge=TokenMergeConfig(r=2)))
    s, out = result.summary, result.out
    merge = s.token_merge
    assert merge.config == TokenMergeConfig(r=2)
    assert s.config["token_merge"] == TokenMergeConfig(r=2).to_dict()
    assert s.accuracy.compact_test_top1 == merge.test_top1_with
    assert 0.0 <= merge.test_top1_without <= 1.0
    assert s.macs.compact == merge.macs_with < merge.macs_without
    assert s.ideal_speedup == pytest.approx(s.macs.dense / merge.macs_with)
    written = json.loads((out / "summary.json").read_text())["token_merge"]
    assert {k: written[k] for k in ("r", "schedule")} == {"r": 2, "schedule": "constant"}
    assert written["test_top1"] == {"without": merge.test_top1_without, "with": merge.test_top1_with}
    assert get_token_merge(vc.load(out / "compact")) == TokenMergeConfig(r=2)
    assert get_token_merge(vc.load(out / "dense")) is None
    for name in ("compact.onnx", "compact.int8.onnx"):
        assert read_metadata(out / name)["token_merge"] == TokenMergeConfig(r=2).to_dict()
    assert "token_merge" not in read_metadata(out / "dense.onnx")
    assert s.accuracy.compact_onnx_test_top1 == pytest.approx(s.accuracy.compact_test_top1, abs=0.01)
    report = (out / "report.md").read_text()
    assert "| | dense | compact + token merging |" in report
    assert "Token merging (ToMe) on the compact model: r=2 tokens per block (constant schedule)" in report
    assert "compact + token merging INT8 p50 (ms) | stacked speed-up" in report


def test_pipeline_refuses_a_token_merge_too_large_before_training(tmp_path):
    one_line_error(runner.invoke(app, ["pipeline", "--token-merge", "9", "--out", str(tmp_path / "r")]),
                   "token merge r=9 is larger than half the 16 mergeable tokens of block 0")
    one_line_error(runner.invoke(app, ["pipeline", "--token-merge", "-2", "--out", str(tmp_path / "r")]),
                   "token merge r must be >= 0")
    assert not (tmp_path / "r").exists()
