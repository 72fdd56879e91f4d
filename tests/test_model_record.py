"""One builder, one record on the model, one block-shape type."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import torch

import vitcompact as vc
from vitcompact.models import BlockShape, build_model
from vitcompact.models.record import RECORD_ATTR

from conftest import input_for, randomize_
from test_compact import remove_heads, remove_neurons

PACKAGE = Path(vc.__file__).parent


def digits_compact() -> tuple[torch.nn.Module, torch.nn.Module, vc.PruneMasks]:
    torch.manual_seed(0)
    model = randomize_(vc.create_model("vit-digits"))
    masks = vc.PruneMasks.ones(model)
    remove_heads(masks, 0, [1, 3])
    remove_neurons(masks, 1, list(range(0, 128, 2)))
    remove_heads(masks, 2, list(range(4)))
    return model, vc.compact(model, masks), masks


def test_the_record_is_the_only_attribute_vitcompact_sets(tmp_path):
    model, small, _ = digits_compact()
    vc.save(small, tmp_path / "small")
    for m in (model, small, vc.load(tmp_path / "small")):
        ours = sorted(k for k in vars(m) if k.startswith("vitcompact"))
        assert ours == [RECORD_ATTR] and isinstance(getattr(m, RECORD_ATTR), vc.ModelRecord)
    record = vc.get_record(small)
    assert (record.architecture, record.preset) == ("vit_tiny_patch16_224", "vit-digits")
    assert record.model_args == vc.get_record(model).model_args and record.dense == vc.count(model).to_dict()
    assert vc.get_record(copy.deepcopy(small)) == record
    assert vc.get_record(torch.nn.Linear(2, 2)) == vc.ModelRecord() and not vc.is_compact(torch.nn.Linear(2, 2))


def test_load_and_create_model_of_an_artifact_give_the_same_model_and_record(tmp_path):
    _, small, _ = digits_compact()
    vc.save(small, tmp_path / "small")
    loaded, created = vc.load(tmp_path / "small"), vc.create_model(tmp_path / "small")
    assert vc.get_record(loaded) == vc.get_record(created)
    assert vc.get_record(loaded).blocks == vc.get_record(small).blocks
    x = input_for(small, 2)
    with torch.no_grad():
        assert torch.equal(loaded(x), small.eval()(x)) and torch.equal(created(x), loaded(x))


def test_the_builder_builds_compact_shapes_on_meta_without_memory():
    _, small, _ = digits_compact()
    record = vc.get_record(small)
    skeleton = build_model(record.architecture, record.model_args, record.blocks, device="meta")
    assert all(p.is_meta for p in skeleton.parameters())
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    assert vc.get_record(skeleton).blocks == record.blocks


def test_one_block_shape_for_layout_structure_compact_blocks_and_accounting():
    model, small, masks = digits_compact()
    structure = masks.structure()
    kept = structure.shape()
    assert kept == [b.shape for b in vc.vit_layout(small).blocks] == [b.shape for b in vc.get_record(small).blocks]
    assert [tuple(s) for s in kept] == [(2, 128), (4, 64), (0, 128), (4, 128)]  # unpacks as (heads, width)
    assert kept[0] == BlockShape(2, 16, 128) and kept[0].attn_dim == 32
    assert [b.shape for b in structure.blocks] == [b.shape for b in vc.vit_layout(model).blocks]
    by_structure, by_model = vc.count(structure), vc.count(small)
    assert [(b.heads, b.neurons, b.macs) for b in by_structure.blocks] == \
        [(b.heads, b.neurons, b.macs) for b in by_model.blocks]


def test_artifact_reads_the_version_without_importing_the_package():
    # `from vitcompact import __version__` inside the package is an import loop; `version.py` is its home.
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level and node.module is None:
                assert "__version__" not in [a.name for a in node.names], path
