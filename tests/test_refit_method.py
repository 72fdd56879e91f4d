"""`--method refit`: compaction without training through `vc.prune`, the CLI and the pipeline,
with calibration images from the training split, another source or a flat folder without labels."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import vitcompact as vc
from vitcompact.cli.app import app

from conftest import one_line_error

runner = CliRunner()


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = vc.create_model("vit-digits", num_classes=10, depth=2)
    data = vc.load_data_for(model, "digits", batch_size=64)
    vc.train(model, data, vc.TrainConfig(epochs=3, progress=False))
    return model, data


def flat_folder(path, count: int):
    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(path / f"{i:03d}.png")
    return path


def test_refit_prunes_without_training_and_compacts_exactly(trained):
    model, data = copy.deepcopy(trained[0]), trained[1]  # the next test needs the dense model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = vc.prune(model, data, vc.RefitConfig(head_ratio=0.5, mlp_ratio=0.5, calib_images=128))
    heads = [len(b.heads) for b in result.structure.blocks]  # global: half of the 8, as the scores share them
    assert sum(heads) == 4 and min(heads) >= 1
    assert result.masks.is_quasi_structured() and result.masks == vc.PruneMasks.from_weights(model)
    assert not any(r["phase"] in ("refit", "finetune") for r in result.metrics)  # no training pass
    # The refit changed the kept output layers and the kept rows of the input layers (refit_inputs).
    after = model.state_dict()
    assert not torch.equal(before["blocks.0.attn.proj.weight"], after["blocks.0.attn.proj.weight"])
    kept = result.structure.blocks[0].neurons
    assert not torch.equal(before["blocks.0.mlp.fc1.weight"][kept], after["blocks.0.mlp.fc1.weight"][kept])
    assert not torch.equal(before["blocks.1.attn.qkv.weight"], after["blocks.1.attn.qkv.weight"])
    small = vc.compact(model, result.masks).eval()
    x = torch.randn(4, *vc.input_size(small))
    with torch.no_grad():
        assert torch.allclose(small(x), model.eval()(x), atol=1e-5)


def test_refit_beats_plain_removal_on_validation(trained):
    model, data = trained
    plain = vc.prune(copy.deepcopy(model), data, vc.OneShotConfig(head_ratio=0.5, mlp_ratio=0.5, criteria="activation",
                                                                  finetune_epochs=0, train=vc.TrainConfig(progress=False)))
    # The same units as plain removal's (activation scores, layer-wise): only the refit differs.
    refit = vc.prune(copy.deepcopy(model), data, vc.RefitConfig(head_ratio=0.5, mlp_ratio=0.5, criteria="activation",
                                                                mode="layer-wise"))
    assert refit.structure.shape() == plain.structure.shape()
    assert refit.val["loss"] < plain.val["loss"]


def test_cli_refit_from_a_flat_folder_of_unlabelled_images(tmp_path):
    folder = flat_folder(tmp_path / "calib", 80)
    out = tmp_path / "run"
    result = runner.invoke(app, ["prune", "vit-digits", "--method", "refit", "--calib-data", str(folder),
                                 "--calib-images", "64", "--head-ratio", "0.5", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["method"] == "refit"
    assert json.loads(result.output)["structure"].startswith("8/16 heads")
    assert vc.is_compact(vc.load(out)) is False and (out / "masks.safetensors").exists()


def test_cli_turns_off_a_refit_default_with_its_no_flag(tmp_path):
    folder = flat_folder(tmp_path / "calib", 80)
    runs = {}
    for name, extra in (("default", []), ("off", ["--no-refit-inputs", "--no-distill"]),
                        ("on", ["--refit-inputs"])):
        out = tmp_path / name
        result = runner.invoke(app, ["prune", "vit-digits", "--method", "refit", "--calib-data", str(folder),
                                     "--calib-images", "64", "--head-ratio", "0.5", "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        run = json.loads((out / "run.json").read_text())
        runs[name] = (run["refit_inputs"], run["distill"])
    assert runs == {"default": (True, True), "off": (False, False), "on": (True, True)}


@pytest.mark.parametrize("count,args,message", [
    (0, [], "holds no images"),
    (20, [], "the calibration data holds 18 images, fewer than one batch (64)"),
    (80, ["--calib-images", "10"], "calib_images=10 is fewer than one batch (64)"),
])
def test_cli_refit_refuses_bad_calibration_in_one_line_and_writes_nothing(tmp_path, count, args, message):
    folder = flat_folder(tmp_path / "calib", count)
    out = tmp_path / "run"
    one_line_error(runner.invoke(app, ["prune", "vit-digits", "--method", "refit", "--calib-data", str(folder),
                                       *args, "--out", str(out)]), message)
    assert not (out / "run.json").exists() and not (out / "model.safetensors").exists()


def test_refit_settings_belong_to_refit():
    one_line_error(runner.invoke(app, ["prune", "vit-digits", "--calib-images", "64", "--out", "x"]),
                   "--calib-images is a setting of refit, not of oneshot")
    with pytest.raises(vc.ConfigError, match="unknown refit target 'both'"):
        vc.RefitConfig(refit_target="both")


def test_refit_fine_tunes_on_the_dense_models_soft_targets_wherever_it_is_chosen():
    """Refit's own defaults (fisher scores chosen globally, lr 1e-4, no fine-tune, distillation on
    soft targets alone)
    hold from the library, the CLI and a pipeline that switches to it; the settings every method
    defaults alike (the ratios, label smoothing) carry over from the method it switches from."""
    from vitcompact.cli.prune_cmd import config_from_options
    from vitcompact.pipeline.config import PipelineConfig, with_overrides
    from vitcompact.pruning.configs import with_method
    own = ("fisher", "global", 1e-4, 0, True, 1.0, 4.0)

    def refit_settings(c):
        return (c.criteria, c.mode, c.lr, c.finetune_epochs, c.distill, c.train.distill_alpha,
                c.train.distill_temperature)
    assert refit_settings(vc.RefitConfig()) == own
    assert refit_settings(config_from_options("refit", {"train.label_smoothing": 0.0})) == own
    piped = with_overrides(PipelineConfig(), **{"prune.method": "refit"}).prune  # from the demo's one-shot
    assert refit_settings(piped) == own and (piped.head_ratio, piped.mlp_ratio) == (0.5, 0.5)
    switched = with_method(vc.OneShotConfig(head_ratio=0.4, train=vc.TrainConfig(label_smoothing=0.0)), "refit")
    assert refit_settings(switched) == own and (switched.head_ratio, switched.train.label_smoothing) == (0.4, 0.0)
    back = with_method(vc.RefitConfig(head_ratio=0.4), "oneshot")  # and one-shot's own defaults back
    assert (back.criteria, back.mode, back.lr, back.finetune_epochs, back.distill, back.train.distill_alpha,
            back.head_ratio) == ("magnitude", "layer-wise", 1e-3, 8, False, 0.5, 0.4)


def test_refit_keeps_a_teacher_only_when_it_fine_tunes(trained, tmp_path):
    model, data = trained
    quiet = vc.TrainConfig(progress=False, distill_alpha=1.0, distill_temperature=4.0)
    for epochs in (0, 1):
        out = tmp_path / f"e{epochs}"
        result = vc.prune(copy.deepcopy(model), data, vc.RefitConfig(head_ratio=0.5, mlp_ratio=0.5, calib_images=128,
                                                                     finetune_epochs=epochs, train=quiet),
                          run=vc.RunFolder(out))
        assert (out / "teacher.safetensors").is_file() == bool(epochs)
        assert [r["phase"] for r in result.metrics if r["phase"] == "finetune"] == ["finetune"] * epochs
