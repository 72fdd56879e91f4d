"""Pretrained starting points: local timm checkpoints, hub weights (offline here) and the
preprocessing each kind of model carries into its artifact."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import input_for, randomize_
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import save_file
from test_compact import scenario_masks
from timm.data import resolve_model_data_config

import vitcompact as vc
from vitcompact.models.preprocess import PLAIN, data_config

# Small timm models whose architectures differ in their preprocessing (ViT: inception mean/std;
# DeiT: ImageNet mean/std) and in their tokens (DeiT distilled: two classifiers, two prefix tokens).
SMALL = dict(img_size=32, patch_size=8, depth=2)
ARCHS = ("vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224")
PREPROCESSING = ("interpolation", "crop_pct", "crop_mode", "mean", "std")


def timm_model(arch: str = "vit_tiny_patch16_224", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(timm.create_model(arch, pretrained=False, **{**SMALL, "num_classes": 7, **overrides}))


def save_checkpoint(model: torch.nn.Module, path) -> None:
    """As a timm user saves weights: a safetensors file, or torch.save of the state dict."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if str(path).endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)


def timm_preprocessing(arch: str, channels: int, height: int, width: int) -> dict:
    """timm's own data config of `arch`, at the input size the model really takes."""
    cfg = resolve_model_data_config(timm.create_model(arch, pretrained=False))
    return {**{k: cfg[k] for k in PREPROCESSING}, "input_size": (channels, height, width)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_timm_checkpoint_gives_the_same_model(tmp_path, arch, suffix):
    reference = timm_model(arch)
    save_checkpoint(reference, tmp_path / f"w{suffix}")
    # Class count, channels, patch and image size come from the checkpoint; depth is the user's.
    model = vc.create_model(arch, checkpoint_path=tmp_path / f"w{suffix}", depth=2).eval()
    assert vc.get_record(model).model_args == {"in_chans": 3, "patch_size": 8, "num_classes": 7,
                                               "img_size": 32, "depth": 2}
    x = input_for(model, 3)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert vc.get_record(model).preprocessing_known
    assert data_config(model) == timm_preprocessing(arch, 3, 32, 32)


@pytest.mark.parametrize("arch", ARCHS)
def test_other_class_count_resets_the_classifier(tmp_path, arch):
    reference = timm_model(arch)
    save_checkpoint(reference, tmp_path / "w.safetensors")
    model = vc.create_model(arch, checkpoint_path=tmp_path / "w.safetensors", depth=2, num_classes=3)
    classifiers = {"head.weight": (3, 192), "head.bias": (3,)}
    if "distilled" in arch:
        classifiers.update({"head_dist.weight": (3, 192), "head_dist.bias": (3,)})
    state, original = model.state_dict(), reference.state_dict()
    assert {k: tuple(state[k].shape) for k in classifiers} == classifiers
    assert sorted(state) == sorted(original)
    assert all(torch.equal(state[k], original[k]) for k in state if k not in classifiers)
    assert model.num_classes == 3 and vc.get_record(model).model_args["num_classes"] == 3
    assert model.eval()(input_for(model, 2)).shape == (2, 3)


def test_checkpoint_without_classifier_and_other_channels(tmp_path):
    reference = timm_model(num_classes=0)
    save_checkpoint(reference, tmp_path / "w.pth")
    model = vc.create_model("vit_tiny_patch16_224", checkpoint_path=tmp_path / "w.pth", depth=2)
    assert model.num_classes == 0 and isinstance(model.head, torch.nn.Identity)
    gray = vc.create_model("vit_tiny_patch16_224", checkpoint_path=tmp_path / "w.pth", depth=2, in_chans=1)
    weight = reference.patch_embed.proj.weight
    assert torch.equal(gray.patch_embed.proj.weight, weight.sum(dim=1, keepdim=True))  # timm's adapt_input_conv
    assert data_config(gray)["input_size"] == (1, 32, 32) and data_config(gray)["mean"] == (0.5,)


def test_checkpoint_for_a_model_that_is_not_a_vit_is_refused(tmp_path):
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(vc.UnsupportedModelError, match="model is a ResNet, not a timm VisionTransformer"):
        vc.create_model("resnet18", checkpoint_path=tmp_path / "w.safetensors")


def test_other_image_size_resamples_the_position_embedding(tmp_path):
    reference = timm_model()
    save_checkpoint(reference, tmp_path / "w.safetensors")
    model = vc.create_model("vit_tiny_patch16_224", checkpoint_path=tmp_path / "w.safetensors", depth=2,
                            img_size=48)
    assert tuple(model.pos_embed.shape) == (1, 1 + 6 * 6, 192)
    assert torch.equal(model.pos_embed[:, :1], reference.pos_embed[:, :1])  # the class token's is kept
    assert model.eval()(input_for(model, 2)).shape == (2, 7)
    assert data_config(model) == timm_preprocessing("vit_tiny_patch16_224", 3, 48, 48)


def test_fresh_models_and_preset_checkpoints_are_plain(tmp_path):
    preset = vc.create_model("vit-digits", depth=2)
    save_checkpoint(preset, tmp_path / "w.safetensors")
    for model in (preset, vc.create_model("vit_tiny_patch16_224", **SMALL),
                  vc.create_model("vit-digits", checkpoint_path=tmp_path / "w.safetensors", depth=2)):
        cfg = data_config(model)
        assert {k: cfg[k] for k in PLAIN} == PLAIN
        assert not vc.get_record(model).preprocessing_known
    # Another class count: the checkpoint's classifier is loaded, then reset (timm's reset_classifier).
    three = vc.create_model("vit-digits", checkpoint_path=tmp_path / "w.safetensors", depth=2, num_classes=3)
    assert three.num_classes == 3 and three.head.weight.shape == (3, 64)
    assert vc.get_record(three).model_args["num_classes"] == 3
    kept = preset.state_dict()
    assert all(torch.equal(v, kept[k]) for k, v in three.state_dict().items() if not k.startswith("head."))


def test_artifact_records_the_preprocessing(tmp_path):
    save_checkpoint(timm_model("deit_tiny_patch16_224"), tmp_path / "w.pth")
    model = vc.create_model("deit_tiny_patch16_224", checkpoint_path=tmp_path / "w.pth", depth=2)
    small = vc.compact(model, scenario_masks(model, "random"))
    assert small.pretrained_cfg == model.pretrained_cfg and vc.get_record(small).preprocessing_known
    vc.save(small, tmp_path / "art")
    config = json.loads((tmp_path / "art" / "config.json").read_text())
    assert {k: config[k] for k in PREPROCESSING} == {
        "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center",
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    loaded = vc.load(tmp_path / "art")
    assert data_config(loaded) == data_config(small) and vc.get_record(loaded).preprocessing_known

    fresh = vc.create_model("vit-digits", depth=2)
    vc.save(fresh, tmp_path / "fresh")
    config = json.loads((tmp_path / "fresh" / "config.json").read_text())
    assert "crop_pct" not in config and "interpolation" not in config
    assert not vc.get_record(vc.load(tmp_path / "fresh")).preprocessing_known


def test_artifact_without_preprocessing_loads_as_unknown(tmp_path):
    save_checkpoint(timm_model(), tmp_path / "w.pth")
    vc.save(vc.create_model("vit_tiny_patch16_224", checkpoint_path=tmp_path / "w.pth", depth=2), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    for key in ("interpolation", "crop_pct", "crop_mode"):  # as written before vitcompact recorded them
        del config[key]
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    loaded = vc.load(tmp_path / "a")
    assert not vc.get_record(loaded).preprocessing_known
    cfg = data_config(loaded)
    assert {k: cfg[k] for k in PLAIN} == PLAIN


@pytest.mark.parametrize("key, value, message", [
    ("crop_pct", 0.0, r"crop_pct must be in \(0, 1\], got 0.0"),
    ("crop_pct", 1.5, r"crop_pct must be in \(0, 1\], got 1.5"),
    ("crop_pct", "0.9", "crop_pct must be a number, got '0.9'"),
    ("interpolation", "lanczos", "interpolation must be one of bilinear, bicubic, nearest, got 'lanczos'"),
    ("crop_mode", "random", "crop_mode must be one of center, squash, border, got 'random'"),
])
def test_bad_preprocessing_in_config_is_refused(tmp_path, key, value, message):
    save_checkpoint(timm_model(), tmp_path / "w.pth")
    vc.save(vc.create_model("vit_tiny_patch16_224", checkpoint_path=tmp_path / "w.pth", depth=2), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    config[key] = value
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.raises(vc.ArtifactError, match=rf"config.json: {message}$"):
        vc.load(tmp_path / "a")


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No network and an empty hub cache. huggingface_hub reads its environment on import, so its
    constants are patched too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def single_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_pretrained_offline_says_so(offline_hub):
    with pytest.raises(vc.ConfigError) as error:
        vc.create_model("vit_tiny_patch16_224", pretrained=True, **SMALL)
    assert single_line(error) == (
        "the pretrained weights for vit_tiny_patch16_224 could not be downloaded: the machine appears "
        "offline (HF_HUB_OFFLINE is set); pass a local checkpoint instead (checkpoint_path / "
        "--checkpoint FILE)")


@pytest.mark.parametrize("failure, expected", [
    (LocalEntryNotFoundError("not in the cache"), "appears offline ([Errno -2] Name or service not known)"),
    (OSError("401 Client Error: gated repository"), "could not be downloaded (401 Client Error: gated repository)"),
])
def test_pretrained_download_failure_names_the_reason(monkeypatch, failure, expected):
    real = timm.create_model

    def failing(name, pretrained=False, **kwargs):
        if not pretrained:
            return real(name, **kwargs)
        try:
            raise ConnectionError("[Errno -2] Name or service not known")
        except ConnectionError as cause:
            if isinstance(failure, LocalEntryNotFoundError):
                raise failure from cause
        raise failure

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(timm, "create_model", failing)
    with pytest.raises(vc.ConfigError) as error:
        vc.create_model("vit_tiny_patch16_224", pretrained=True, **SMALL)
    assert expected in single_line(error) and "--checkpoint FILE" in single_line(error)
    assert ("offline" in single_line(error)) == isinstance(failure, LocalEntryNotFoundError)


def test_pretrained_weights_rebuild_without_the_hub(monkeypatch, tmp_path):
    """timm's own pretrained path, fed a local file instead of the hub: a new classifier for another
    class count, timm's preprocessing, and an artifact that loads with the hub offline."""
    reference = timm_model(num_classes=1000)  # the class count of timm's pretrained config
    save_checkpoint(reference, tmp_path / "hub.pth")
    real = timm.create_model

    def from_file(name, pretrained=False, **kwargs):
        if pretrained:
            kwargs["pretrained_cfg_overlay"] = {"file": str(tmp_path / "hub.pth")}
        return real(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", from_file)
    model = vc.create_model("vit_tiny_patch16_224", pretrained=True, **SMALL, num_classes=5)
    assert model.num_classes == 5 and vc.get_record(model).model_args == {**SMALL, "num_classes": 5}
    original = reference.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items() if not k.startswith("head."))
    assert vc.get_record(model).preprocessing_known and data_config(model) == timm_preprocessing("vit_tiny_patch16_224", 3, 32, 32)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    vc.save(model, tmp_path / "art")
    loaded = vc.load(tmp_path / "art")
    assert vc.get_record(loaded).preprocessing_known and data_config(loaded) == data_config(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="vit-digits", pretrained=True),
     "vit-digits is a vitcompact preset, which has no pretrained weights on the hub; pass a timm model "
     "name, or a local checkpoint (checkpoint_path / --checkpoint FILE)"),
    (dict(name="vit_tiny_patch16_224", pretrained=True, checkpoint_path="w.pth"),
     "pass either pretrained (timm's hub weights) or a checkpoint file, not both"),
    (dict(name="vit_base_patch16_gap_224", pretrained=True),
     "timm has no pretrained weights for vit_base_patch16_gap_224; pass a local checkpoint "
     "(checkpoint_path / --checkpoint FILE)"),
    (dict(name="vit_tiny_patch16_224.nope"),
     "timm has no pretrained tag 'nope' for vit_tiny_patch16_224; see "
     "timm.list_pretrained('vit_tiny_patch16_224*')"),
])
def test_pretrained_refusals(tmp_path, kwargs, message):
    if "checkpoint_path" in kwargs:
        save_checkpoint(timm_model(), tmp_path / kwargs["checkpoint_path"])
        kwargs = {**kwargs, "checkpoint_path": tmp_path / kwargs["checkpoint_path"]}
    with pytest.raises(vc.ConfigError) as error:
        vc.create_model(**kwargs)
    assert single_line(error) == message


def test_pretrained_artifact_is_refused(tmp_path):
    vc.save(vc.create_model("vit-digits", depth=2), tmp_path / "art")
    with pytest.raises(vc.ConfigError) as error:
        vc.create_model(tmp_path / "art", pretrained=True)
    assert single_line(error) == (f"{tmp_path / 'art'} is an artifact, which carries its own weights; "
                                  "pretrained weights are for a timm model name")


def test_tagged_timm_name_keeps_the_tag(tmp_path):
    """A pretrained tag picks timm's config of those weights (here 21k classes), and is kept for rebuilding."""
    model = vc.create_model("vit_tiny_patch16_224.augreg_in21k", **SMALL)
    assert model.num_classes == 21843 and vc.get_record(model).architecture == "vit_tiny_patch16_224.augreg_in21k"
    vc.save(model, tmp_path / "art")
    assert vc.load(tmp_path / "art").num_classes == 21843
