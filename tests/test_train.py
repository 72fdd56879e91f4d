"""Training: masked weights stay exactly zero, runs repeat exactly, metrics are what they say."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
from conftest import tiny
from torch.utils.data import DataLoader, Subset
from typer.testing import CliRunner

import vitcompact as vc
from vitcompact.cli.app import app
from vitcompact.errors import ConfigError
from vitcompact.training import MetricsLog, TrainConfig, evaluate, train
from vitcompact.training.trainer import _lr_factor, block_distill_loss, block_outputs, distill_loss

FAST = dict(epochs=1, progress=False)



def test_pruned_weights_stay_exactly_zero_through_adamw(bundle):
    model = tiny()
    masks = vc.magnitude_prune(model, 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, bundle, TrainConfig(weight_decay=0.5, **FAST), masks=masks)
    for name, m in masks.masks.items():
        w = model.get_parameter(name)
        assert int((w[~m] != 0).sum()) == 0
        assert not torch.equal(w[m], before[name][m])  # the kept weights did train


def test_training_repeats_exactly_with_the_same_seed(bundle):
    a, b = tiny(), tiny()
    ra = train(a, bundle, TrainConfig(seed=3, **FAST))
    rb = train(b, bundle, TrainConfig(seed=3, **FAST))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert ra.epochs == rb.epochs


def test_epoch_metrics_reach_the_callback(bundle):
    seen = []
    result = train(tiny(), bundle, TrainConfig(epochs=2, progress=False), on_epoch=seen.append)
    assert [r["epoch"] for r in seen] == [1, 2]
    assert seen[-1]["step"] == 2 * math.ceil(len(bundle.train.dataset) / 32) == result.steps
    assert set(seen[0]) == {"epoch", "step", "lr", "train_loss", "val_top1", "val_top5", "val_loss"}


class FixedLogits(nn.Module):
    """Returns the logits stored for each input index (input = index as a float)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, x):
        return self.logits[x.long().flatten()]


def test_evaluate_top1_top5_and_loss_exactly():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0, 0], [0.0, 1, 2, 3, 4, 5, 6], [1.0, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
    labels = torch.tensor([0, 0, 6])
    loader = [(torch.arange(3).float(), labels)]
    out = evaluate(FixedLogits(logits), loader)
    assert out["top1"] == pytest.approx(1 / 3)
    assert out["top5"] == pytest.approx(1 / 3)  # rows 1 and 2: the label ranks last
    assert out["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, labels)))
    few = evaluate(FixedLogits(logits[:, :4]), [(torch.arange(3).float(), torch.tensor([0, 3, 0]))])
    assert set(few) == {"top1", "loss"} and few["top1"] == 1.0


def test_warmup_then_cosine_learning_rate():
    assert _lr_factor(0, 4, 20, 0.01) == 0.25
    assert _lr_factor(3, 4, 20, 0.01) == 1.0
    assert _lr_factor(4, 4, 20, 0.01) == 1.0
    assert _lr_factor(12, 4, 20, 0.01) == pytest.approx(0.01 + 0.99 * 0.5)
    assert _lr_factor(20, 4, 20, 0.01) == pytest.approx(0.01)


def test_a_run_shorter_than_its_warmup_still_decays_to_min_lr(bundle):
    result = train(tiny(), bundle, TrainConfig(epochs=1, warmup_epochs=5.0, lr=1e-3, min_lr=1e-5, progress=False))
    assert result.epochs[-1]["lr"] == pytest.approx(1e-5)


class _Probe:
    """A gradient penalty that records the gradient norm it sees and adds `push` to one weight."""

    def __init__(self, push: float):
        self.push, self.norms = push, []

    def __call__(self, model, step, total_steps):
        self.norms.append(float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm()))
        model.head.weight.grad[0, 0] += self.push
        return self.push


def test_penalty_comes_after_clipping_and_leaves_other_gradients_alone():
    one_step = vc.load_data("digits", batch_size=512, limit=160)  # the training split is one batch
    config = TrainConfig(optimizer="sgd", clip_grad=0.5, warmup_epochs=0.0, lr=0.1, **FAST)
    runs = {}
    for push in (0.0, 1e6):
        model, probe = tiny(), _Probe(push)
        train(model, one_step, config, penalty=probe)
        assert len(probe.norms) == 1 and probe.norms[0] <= 0.5 + 1e-5
        runs[push] = model.state_dict()
    changed = [k for k in runs[0.0] if not torch.equal(runs[0.0][k], runs[1e6][k])]
    assert changed == ["head.weight"]
    diff = (runs[0.0]["head.weight"] != runs[1e6]["head.weight"]).nonzero().tolist()
    assert diff == [[0, 0]]


def test_distillation_loss_is_zero_for_identical_logits():
    x = torch.randn(4, 10)
    assert float(distill_loss(x, x, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(x, x.flip(-1), 2.0)) > 0


def stream_after_each_block(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    outputs = []
    for block in model.blocks:
        h = block(h)
        outputs.append(h)
    return outputs


def test_block_outputs_records_each_block_and_leaves_no_hook():
    model = tiny().eval()
    x = torch.randn(3, *vc.input_size(model))
    with torch.no_grad(), block_outputs(model) as seen:
        model(x)
    expected = stream_after_each_block(model, x)
    assert len(seen) == len(expected) == 2 and all(torch.equal(a, b) for a, b in zip(seen, expected))
    assert all(not block._forward_hooks for block in model.blocks)
    with block_outputs(model, enabled=False) as nothing:
        model(x)
    assert nothing == []
    with pytest.raises(ConfigError, match="distill_blocks needs a ViT with a `blocks` sequence; Linear has none"):
        with block_outputs(nn.Linear(2, 2)):
            pass


def test_block_distill_loss_is_relative_to_the_teachers_stream_and_refuses_other_shapes():
    t = [torch.randn(2, 5, 8), 100 * torch.randn(2, 5, 8)]
    assert float(block_distill_loss(t, t)) == 0.0
    # Twice the teacher's stream: an error equal to the stream in every block, whatever its scale.
    assert float(block_distill_loss([2 * t[0], 2 * t[1]], t)) == pytest.approx(1.0, rel=1e-6)
    assert float(block_distill_loss([2 * t[0], t[1]], t)) == pytest.approx(0.5, rel=1e-6)
    with pytest.raises(ConfigError, match=r"block 0 gives \(2, 3, 8\) in the student and \(2, 5, 8\) in the teacher"):
        block_distill_loss([torch.zeros(2, 3, 8)], t[:1])
    with pytest.raises(ConfigError, match="the student ran 1 blocks, the teacher 2"):
        block_distill_loss(t[:1], t)


def test_block_distillation_adds_its_weighted_loss_to_the_soft_target_term(bundle):
    """One step on one batch: the recorded loss grows by distill_blocks times the block loss of the
    starting weights on that batch (the same seed gives both runs the same batch)."""
    one = dataclasses.replace(bundle, train=DataLoader(Subset(bundle.train.dataset, range(32)), batch_size=32,
                                                       collate_fn=bundle.train.collate_fn))
    teacher = vc.create_model("vit-digits", depth=2)  # other random weights, the same shapes
    batches = []
    teacher.register_forward_pre_hook(lambda module, args: batches.append(args[0].detach().clone()))
    losses = {}
    for weight in (0.0, 3.0):
        student = tiny()
        config = TrainConfig(epochs=1, progress=False, precision="fp32", distill_alpha=0.5, distill_blocks=weight)
        losses[weight] = train(student, one, config, teacher=teacher).epochs[0]["train_loss"]
    assert torch.equal(batches[0], batches[1])
    start = tiny().train()
    with torch.no_grad():
        expected = block_distill_loss(stream_after_each_block(start, batches[0]),
                                      stream_after_each_block(teacher.eval(), batches[0]))
    assert float(expected) > 0.1
    assert losses[3.0] - losses[0.0] == pytest.approx(0.5 * 3.0 * float(expected), rel=1e-4)


@pytest.mark.parametrize("field,value,message", [
    ("optimizer", "lamb", "unknown optimizer 'lamb'; choose one of: adamw, sgd"),
    ("lr", 0.0, "lr must be > 0, got 0.0"),
    ("label_smoothing", 1.0, r"label_smoothing must be in \[0, 1\), got 1.0"),
    ("distill_blocks", -1.0, "distill_blocks must be >= 0, got -1.0"),
])
def test_bad_train_config_is_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value})


def test_wandb_requested_but_missing_is_a_clear_error(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ConfigError, match=r"wandb logging was requested but wandb is not installed"):
        MetricsLog(wandb_project="demo")


def test_wandb_logging_works_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional extra")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(tmp_path / "metrics.jsonl", wandb_project="vitcompact-test", run_config={"seed": 0})
    log.write({"phase": "rsst", "epoch": 1, "val_top1": 0.5, "lambda": 0.25})
    log.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert MetricsLog.read(tmp_path / "metrics.jsonl") == [{"phase": "rsst", "epoch": 1, "val_top1": 0.5,
                                                            "lambda": 0.25}]


def test_cli_train_writes_a_dense_artifact(tmp_path):
    out = tmp_path / "dense"
    result = CliRunner().invoke(app, ["train", "vit-digits", "--data", "digits", "--epochs", "1",
                                      "--batch-size", "128", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    model = vc.load(out)
    provenance = vc.io.read_json(out / "config.json")["vitcompact"]["provenance"]
    assert provenance["stage"] == "train" and len(provenance["epochs"]) == 1
    assert len(MetricsLog.read(out / "metrics.jsonl")) == 1
    assert model.num_classes == 10


@pytest.mark.parametrize("args,message", [
    (["--data", "mnist", "--data-root", "/nonexistent/mnist"], "error: data folder /nonexistent/mnist does not exist"),
    (["--data", "digits", "--optimizer", "lamb"], "error: unknown optimizer 'lamb'; choose one of: adamw, sgd"),
])
def test_cli_train_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    out = tmp_path / "never"
    result = CliRunner().invoke(app, ["train", "vit-digits", "--epochs", "1", "--out", str(out), *args])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[0].startswith(message)
    assert not out.exists()
