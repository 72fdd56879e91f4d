"""Artifacts: safetensors + config.json, strict loading, user checkpoints, no pickles."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from conftest import input_for, make_family
from safetensors.torch import save_file
from test_compact import scenario_masks
from typer.testing import CliRunner

import vitcompact as vc
from vitcompact.cli.app import app


@pytest.fixture(scope="module")
def compact_dir(tmp_path_factory):
    model = make_family("deit_small")
    small = vc.compact(model, scenario_masks(model, "random"))
    path = tmp_path_factory.mktemp("art") / "compact"
    vc.save(small, path)
    return path, small


def test_save_load_round_trip_is_exact(compact_dir):
    path, small = compact_dir
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = vc.load(path)
    x = input_for(small, 4)
    with torch.no_grad():
        assert torch.equal(loaded(x), small.eval()(x))
    config = json.loads((path / "config.json").read_text())
    assert config["architecture"] == "deit_small_patch16_224"
    assert config["num_classes"] == 10 and config["in_chans"] == 3 and config["img_size"] == [32, 32]
    section = config["vitcompact"]
    assert [b["num_heads"] for b in section["blocks"]] == [3, 3]
    assert [len(b["heads"]) for b in section["structure"]["blocks"]] == [3, 3]
    assert section["accounting"]["compact"]["params"] == sum(p.numel() for p in small.parameters())
    assert section["accounting"]["dense"]["params"] > section["accounting"]["compact"]["params"]


def test_config_that_does_not_match_weights_is_refused(compact_dir, tmp_path):
    path, _ = compact_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    config = json.loads((path / "config.json").read_text())
    config["vitcompact"]["blocks"][1]["num_heads"] = 4
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(vc.ArtifactError, match=r"structure.blocks\[1\] keeps 3 heads .* but vitcompact.blocks\[1\] has 4"):
        vc.load(bad)
    config["vitcompact"]["structure"] = None  # then the weights' shapes tell
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(vc.ArtifactError, match=r"blocks.1.attn.qkv.weight has shape \(576, 384\) but the model expects "
                                               r"\(768, 384\) \(config.json field vitcompact.blocks\[1\].num_heads\)"):
        vc.load(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(vc.ArtifactError, match="config.json is not valid JSON"):
        vc.load(bad)
    with pytest.raises(vc.ArtifactError, match="is not an artifact directory"):
        vc.load(tmp_path / "missing")


def test_load_user_checkpoints_safetensors_and_pth(tmp_path):
    model = vc.create_model("vit-digits", depth=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = vc.create_model("vit-digits", checkpoint_path=tmp_path / name, depth=2)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    partial = dict(state)
    partial.pop("head.weight")
    partial["extra.weight"] = torch.zeros(1)
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(vc.ArtifactError, match=r"missing keys \['head.weight'\], unexpected keys \['extra.weight'\]"):
        vc.create_model("vit-digits", checkpoint_path=tmp_path / "partial.pt", depth=2)


class NotATensor:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoints_are_never_unpickled(tmp_path, capsys):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"x": NotATensor()}, f)
    with pytest.raises(vc.ArtifactError, match="could not be read as a weights-only checkpoint"):
        vc.create_model("vit-digits", checkpoint_path=tmp_path / "evil.pth")
    assert "this must never run" not in capsys.readouterr().out
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(vc.ArtifactError, match="is not a readable safetensors file"):
        vc.create_model("vit-digits", checkpoint_path=tmp_path / "corrupt.safetensors")
    with pytest.raises(vc.ArtifactError, match="unsupported checkpoint type '.ckpt'"):
        (tmp_path / "w.ckpt").write_bytes(b"x")
        vc.create_model("vit-digits", checkpoint_path=tmp_path / "w.ckpt")


def test_save_to_unwritable_place_fails_cleanly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(vc.ArtifactError, match="cannot create output folder"):
        vc.save(vc.create_model("vit-digits"), blocker / "out")
    assert blocker.read_text() == "x"


def test_inspect_shows_dense_vs_compact(compact_dir):
    path, small = compact_dir
    result = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["count"]["params"] == sum(p.numel() for p in small.parameters())
    assert out["count"]["heads"] == 6 and out["dense"]["heads"] == 12
    table = CliRunner().invoke(app, ["inspect", str(path)])
    assert table.exit_code == 0 and "3/6" in table.output and "ideal speed-up" in table.output
