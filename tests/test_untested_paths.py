"""Paths no other test reaches: distillation, rewinding to an epoch, `prune --resume` through the
CLI, ONNX weights in an external `.data` file, and the CIFAR-100 source."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import load_file
from typer.testing import CliRunner

import vitcompact as vc
from vitcompact.cli.app import app
from vitcompact.export import ExportConfig, files, to_onnx
from vitcompact.pruning import loop
from vitcompact.pruning.configs import PruneConfig, RefillConfig, RSSTConfig
from vitcompact.pruning.loop import prune
from vitcompact.training import TrainConfig, trainer

QUIET = TrainConfig(progress=False)


# ---------------------------------------------------------------- distillation

def divergence(teacher: torch.nn.Module, student: torch.nn.Module, loader) -> float:
    """Mean KL(teacher || student) of the two models' predictions over `loader`."""
    total, n = 0.0, 0
    with torch.no_grad():
        for x, _ in loader:
            t, s = F.log_softmax(teacher(x), -1), F.log_softmax(student(x), -1)
            total += float(F.kl_div(s, t, reduction="sum", log_target=True))
            n += len(x)
    return total / n


def test_distill_trains_towards_the_frozen_dense_teacher(bundle, monkeypatch):
    kd_calls: list[tuple[torch.Tensor, float]] = []
    distill_loss = trainer.distill_loss

    def spy(logits, teacher_logits, temperature):
        kd_calls.append((teacher_logits.detach().clone(), temperature))
        return distill_loss(logits, teacher_logits, temperature)
    monkeypatch.setattr(trainer, "distill_loss", spy)
    # distill_alpha=1: the training loss is the distillation term alone (without a teacher it is
    # plain cross-entropy).
    train = TrainConfig(progress=False, distill_alpha=1.0)

    def config(distill: bool, epochs: int = 1) -> PruneConfig:
        return RSSTConfig(head_ratio=0.5, mlp_ratio=0.3, states=1, epochs_per_state=epochs,
                          finetune_epochs=epochs, distill=distill, train=train)

    untrained, labels_only = tiny(), tiny()
    prune(untrained, bundle, config(distill=False, epochs=0))
    prune(labels_only, bundle, config(distill=False))
    assert kd_calls == []

    student = tiny()
    dense = copy.deepcopy(student).eval()
    # The loop's teacher is a deep copy of the model it is given, and a deep copy keeps forward
    # hooks: this one sees every forward of that copy (any module but the student itself).
    teacher_forwards: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(module, inputs, output):
        if module is not student:
            teacher_forwards.append((inputs[0].detach().clone(), output.detach().clone()))
    student.register_forward_hook(record)
    prune(student, bundle, config(distill=True))

    steps = 2 * trainer.steps_per_epoch(bundle)  # one state epoch and one fine-tuning epoch
    assert len(kd_calls) == len(teacher_forwards) == steps
    for (targets, temperature), (x, output) in zip(kd_calls, teacher_forwards):
        assert temperature == train.distill_temperature
        assert torch.equal(targets, output.float())
        with torch.no_grad():  # the teacher is the dense model as it came in, unchanged by training
            assert torch.allclose(targets, dense(x).float(), atol=1e-5)
    # Trained on the soft targets, the pruned student comes much closer to the teacher than it was
    # right after pruning (weight decay alone barely moves it); trained on the labels, it moves away.
    kd, before, ce = (divergence(dense, m.eval(), bundle.val) for m in (student, untrained, labels_only))
    assert kd < 0.5 * before and before < ce, (kd, before, ce)


# ---------------------------------------------------------------- rewind to an epoch

@pytest.mark.parametrize("rewind_epoch", [1, 2])
def test_refill_rewinds_the_survivors_to_the_weights_after_rewind_epoch(bundle, monkeypatch, rewind_epoch):
    dense_after: dict[int, dict[str, torch.Tensor]] = {}
    train = loop.train

    def spy(model, bundle, config, masks=None, *, on_epoch=None, description="train", **kw):
        if description == "dense":  # keep a copy of the weights after each dense epoch
            inner = on_epoch

            def on_epoch(record):
                inner(record)
                dense_after[record["epoch"]] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return train(model, bundle, config, masks, on_epoch=on_epoch, description=description, **kw)
    monkeypatch.setattr(loop, "train", spy)

    model = tiny()
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = prune(model, bundle, RefillConfig(rewind="epoch", rewind_epoch=rewind_epoch, dense_epochs=3,
                                               head_ratio=0.5, mlp_ratio=0.3, states=1, epochs_per_state=0,
                                               finetune_epochs=0, train=QUIET))
    assert sorted(dense_after) == [1, 2, 3]
    snapshot = dense_after[rewind_epoch]
    # Dense training moved the weights, so rewinding to any other point would show.
    for other in [init, *(dense_after[e] for e in (1, 2, 3) if e != rewind_epoch)]:
        assert not torch.equal(other["blocks.0.mlp.fc1.weight"], snapshot["blocks.0.mlp.fc1.weight"])
    kept = 0
    for name, value in model.state_dict().items():
        # Every weight is its value at the rewind point, or zero where a unit was removed.
        changed = value != snapshot[name]
        assert not value[changed].any(), name
        if name in result.masks.masks:
            m = result.masks[name]
            assert torch.equal(value[m], snapshot[name][m]), name
            assert not value[~m].any(), name
            kept += int(m.sum())
    assert kept > 0


# ---------------------------------------------------------------- prune --resume through the CLI

PRUNE = ["prune", "vit-digits", "--data", "digits", "--method", "rsst", "--head-ratio", "0.5",
         "--mlp-ratio", "0.5", "--states", "2", "--epochs-per-state", "1", "--finetune-epochs", "1",
         "--batch-size", "128", "--precision", "fp32", "--json"]


def different_tensors(a, b) -> list[str]:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return [k for k in ta if not torch.equal(ta[k], tb[k])]


def test_cli_prune_resume_finishes_a_stopped_run_to_the_uninterrupted_result(tmp_path):
    runner = CliRunner()
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    result = runner.invoke(app, [*PRUNE, "--out", str(whole)])
    assert result.exit_code == 0, result.output
    expected = json.loads(result.output)
    # What a run stopped during its second state leaves: the first state's checkpoint, nothing after
    # (the whole run's folder, cut back to that).
    shutil.copytree(whole, stopped)
    shutil.rmtree(stopped / "checkpoints" / "state_002")
    for name in ("masks.safetensors", "structure.json", "result.json", "model.safetensors", "config.json"):
        (stopped / name).unlink()
    first = stopped / "checkpoints" / "state_001" / "model.safetensors"
    first_stat = os.stat(first)

    again = runner.invoke(app, [*PRUNE, "--out", str(stopped)])
    assert again.exit_code == 2 and "pass --resume" in again.output  # without --resume: refused
    resumed = runner.invoke(app, [*PRUNE, "--out", str(stopped), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads(resumed.output)
    assert (summary["structure"], summary["val"], summary["test"]) == (
        expected["structure"], expected["val"], expected["test"])
    for name in ("model.safetensors", "masks.safetensors", "checkpoints/state_002/model.safetensors"):
        assert different_tensors(whole / name, stopped / name) == [], name
    # It went on from the first state's checkpoint instead of starting over.
    assert (os.stat(first).st_ino, os.stat(first).st_mtime_ns) == (first_stat.st_ino, first_stat.st_mtime_ns)
    phases = [[(r["phase"], r.get("state")) for r in map(json.loads, (f / "metrics.jsonl").read_text().splitlines())]
              for f in (whole, stopped)]
    assert phases[0] == phases[1]


# ---------------------------------------------------------------- ONNX weights in <file>.data

def weights_graph(values: np.ndarray) -> onnx.ModelProto:
    """y = x + w, with w an initializer of `values`."""
    node = helper.make_node("Add", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "add", [helper.make_tensor_value_info("x", TensorProto.FLOAT, values.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, values.shape)],
                              [numpy_helper.from_array(values, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("threshold,external", [(2047, True), (2048, False)])
def test_weights_past_the_threshold_go_to_a_data_file(tmp_path, monkeypatch, threshold, external):
    values = np.arange(512, dtype=np.float32)  # 512 floats: 2048 bytes of weights
    monkeypatch.setattr(files, "EXTERNAL_DATA_BYTES", threshold)
    path = files.save_onnx(weights_graph(values), tmp_path / "add.onnx")
    assert (tmp_path / "add.onnx.data").is_file() == external
    if external:
        assert (tmp_path / "add.onnx.data").stat().st_size == 2048
        assert (tmp_path / "add.onnx").stat().st_size < 2048
    x = np.ones(512, dtype=np.float32)
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.array_equal(y, values + 1)


def test_to_onnx_of_a_model_past_the_threshold_ships_a_data_file_that_loads(tmp_path, monkeypatch):
    model = tiny().eval()
    weight_bytes = 4 * sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(files, "EXTERNAL_DATA_BYTES", weight_bytes // 4)
    path = tmp_path / "model.onnx"
    result = to_onnx(model, path, ExportConfig(optimize="on"))
    assert result.external_data and result.optimized.applied
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert path.stat().st_size < weight_bytes // 4 < (tmp_path / "model.onnx.data").stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external and all(e.value == "model.onnx.data" for t in external for e in t.external_data
                            if e.key == "location")
    # Both files moved together still load: the .onnx names its data file relative to itself.
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        shutil.move(tmp_path / name, moved / name)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(moved / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert np.allclose(logits, model(x).numpy(), atol=1e-4)


# ---------------------------------------------------------------- CIFAR-100

def test_cifar100_python_pickles_load_with_fine_labels_and_names(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def batch(n: int, fine: list[int]) -> dict:
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        return {b"filenames": [f"img{i}.png".encode() for i in range(n)], b"batch_label": b"batch",
                b"fine_labels": fine, b"coarse_labels": [label // 5 for label in fine],
                b"data": images.reshape(n, 3072)}  # each row: the red plane, then green, then blue

    train = batch(10, [0, 99, 5, 17, 42, 63, 88, 1, 2, 3])
    train[b"data"][0] = np.repeat(np.array([255, 0, 7], dtype=np.uint8), 1024)  # one red image
    test = batch(4, [99, 12, 0, 50])
    fine_names = [f"fine{i}".encode() for i in range(100)]
    (folder / "train").write_bytes(pickle.dumps(train))
    (folder / "test").write_bytes(pickle.dumps(test))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": fine_names,
                                                b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}))

    bundle = vc.load_data("cifar100", root=tmp_path, img_size=32, in_chans=3, batch_size=4, val_fraction=0.2,
                          aug="none")
    assert bundle.num_classes == 100 and bundle.class_names == [f"fine{i}" for i in range(100)]
    assert (len(bundle.train.dataset), len(bundle.val.dataset)) == (8, 2)
    test_set = bundle.test.dataset
    assert torch.equal(test_set.images, torch.from_numpy(test[b"data"].reshape(4, 3, 32, 32)))
    assert test_set.labels.tolist() == [99, 12, 0, 50]  # the fine labels, not the coarse ones
    # Train and validation split the training file: every image with its own fine label.
    images = torch.cat([bundle.train.dataset.images, bundle.val.dataset.images])
    labels = torch.cat([bundle.train.dataset.labels, bundle.val.dataset.labels]).tolist()
    label_of = {row.tobytes(): label for row, label in zip(train[b"data"], train[b"fine_labels"])}
    assert {image.numpy().reshape(3072).tobytes(): label for image, label in zip(images, labels)} == label_of
    red = images[labels.index(0)]
    assert [set(plane.unique().tolist()) for plane in red] == [{255}, {0}, {7}]
    # The folder itself works as the root too.
    same = vc.load_data("cifar100", root=folder, img_size=32, in_chans=3, val_fraction=0.2, aug="none")
    assert torch.equal(same.test.dataset.images, test_set.images)
