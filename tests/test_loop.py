"""The pruning loop: λ schedules, the penalised set, the reached structure, resume, torchrun."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny
from safetensors.torch import load_file
from typer.testing import CliRunner

import vitcompact as vc
from vitcompact.cli.app import app
from vitcompact.errors import ConfigError
from vitcompact.pruning import checkpoint
from vitcompact.pruning.configs import OneShotConfig, PruneConfig, RSSTConfig, RunFolder, prune_config, same_budget
from vitcompact.pruning.loop import apply_hard, prune, state_ratio
from vitcompact.pruning.penalty import PENALTIES, FadePenalty, RSSTPenalty, penalised_weights
from vitcompact.pruning.schedules import LAMBDA_SCHEDULES, LambdaSchedule
from vitcompact.pruning.selection import keep_count
from vitcompact.training import TrainConfig, steps_per_epoch

QUIET = TrainConfig(progress=False)



def quick(**kw) -> PruneConfig:
    fields = {**dict(method="rsst", head_ratio=0.5, mlp_ratio=0.3, states=2, epochs_per_state=1, finetune_epochs=0,
                     train=QUIET), **kw}
    method, split = fields.pop("method"), [fields.pop(k) for k in ("states", "epochs_per_state", "finetune_epochs")]
    return same_budget(method, *split, **fields)  # one-shot spends the same epochs fine-tuning


FORMULAS = {
    "x": lambda t, T, k: t,
    "x^2": lambda t, T, k: t * t,
    "x^3": lambda t, T, k: t ** 3,
    "exp": lambda t, T, k: math.exp(t / T) - 1,
    "exp_custom": lambda t, T, k: (math.exp(t / T) - 1) / (math.e - 1),
    "exp_custom_exponents": lambda t, T, k: (math.exp(k * t / T) - 1) / (math.exp(k) - 1),
}


def test_every_registered_schedule_has_a_formula_here():
    assert LAMBDA_SCHEDULES.names() == sorted(FORMULAS)


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_schedule_matches_its_formula_and_cap(name):
    schedule = LambdaSchedule(name, cap=0.5, base=0.01, exponent=3.0)
    for t in (0, 1, 7, 40, 100):
        assert schedule(t, 100) == pytest.approx(min(0.5, 0.01 * FORMULAS[name](t, 100, 3.0)), rel=1e-12)
    assert schedule(0, 100) == 0.0
    assert schedule(10**6, 100) == 0.5


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_default_base_reaches_the_cap_half_way(name):
    schedule = LambdaSchedule(name, cap=2.0, exponent=3.0)
    assert schedule(50, 100) == pytest.approx(2.0)
    assert schedule(25, 100) < 2.0


def test_penalty_touches_exactly_the_weights_the_structure_drops():
    model = tiny()
    element = vc.magnitude_prune(model, 0.4)
    structured = vc.regroup(model, element, vc.RegroupConfig(head_ratio=0.5, mlp_ratio=0.5))
    targets = penalised_weights(structured, element)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    penalty = RSSTPenalty(structured, element, LambdaSchedule("x", cap=10.0, base=0.25))
    assert penalty(model, 4, 100) == 1.0
    for name, p in model.named_parameters():
        if name in targets:
            expected = p.detach() * (~structured[name] & element[name])
            assert torch.equal(p.grad, expected)
            assert 0 < int(targets[name].sum()) < int((~structured[name]).sum())
        else:
            assert int(p.grad.count_nonzero()) == 0


@pytest.mark.parametrize("name", ["x", "x^2", "exp_custom_exponents"])
def test_fade_penalty_scales_exactly_the_dropped_weights_by_its_formula(name):
    model = tiny()
    element = vc.magnitude_prune(model, 0.4)
    structured = vc.regroup(model, element, vc.RegroupConfig(head_ratio=0.5, mlp_ratio=0.5))
    targets = penalised_weights(structured, element)
    penalty = FadePenalty(structured, element, LambdaSchedule(name, exponent=3.0), fade_to=0.05)
    T, t = 20, 6
    g = [FORMULAS[name](s, T, 3.0) for s in range(1, T + 1)]
    expected_rate = math.log(1 / 0.05) * g[t] / sum(g)
    assert penalty.rate(t, T) == pytest.approx(expected_rate, rel=1e-12)
    assert sum(penalty.rate(s, T) for s in range(T)) == pytest.approx(math.log(20.0), rel=1e-12)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    penalty.after_step(model, t, T)
    assert penalty.value == pytest.approx(expected_rate, rel=1e-12)
    for name_, p in model.named_parameters():
        if name_ in targets:
            m = targets[name_]
            assert torch.allclose(p[m], before[name_][m] * math.exp(-expected_rate), rtol=1e-6, atol=0)
            assert torch.equal(p[~m], before[name_][~m])
        else:
            assert torch.equal(p, before[name_])


def test_fade_alone_leaves_fade_to_of_the_weights_after_a_state():
    model = tiny()
    element = vc.PruneMasks.ones(model)
    structured = vc.regroup(model, element, vc.RegroupConfig(head_ratio=0.5, mlp_ratio=0.5))
    penalty = FadePenalty(structured, element, LambdaSchedule("x"), fade_to=0.01)
    start = penalty.norm(model)
    for t in range(37):
        penalty.after_step(model, t, 37)
    assert penalty.norm(model) == pytest.approx(0.01 * start, rel=1e-4)


def test_penalties_are_registered_by_name():
    assert PENALTIES.names() == ["fade", "gradient"]
    assert PENALTIES.get("gradient") is RSSTPenalty and PENALTIES.get("fade") is FadePenalty
    with pytest.raises(ConfigError, match="unknown rsst penalty 'l1'"):
        quick(penalty="l1")
    with pytest.raises(ConfigError, match="fade_to must be in"):
        quick(fade_to=1.0)


def test_state_ratios_end_exactly_at_the_final_ratio():
    assert state_ratio(0.3, 3, 3) == 0.3
    ratios = [state_ratio(0.3, s, 3) for s in (1, 2, 3)]
    assert ratios == sorted(ratios) and ratios[0] == pytest.approx(1 - 0.7 ** (1 / 3))
    assert [keep_count(128, r, 1) for r in ratios][-1] == keep_count(128, 0.3, 1)


@pytest.mark.parametrize("method", ["rsst", "refill", "oneshot"])
def test_loop_reaches_the_requested_structure(bundle, method):
    model = tiny()
    result = prune(model, bundle, quick(method=method))
    assert [len(b.heads) for b in result.structure.blocks] == [keep_count(4, 0.5, 1)] * 2
    assert [len(b.neurons) for b in result.structure.blocks] == [keep_count(128, 0.3, 1)] * 2
    for name, m in result.masks.masks.items():
        assert int(model.get_parameter(name)[~m].count_nonzero()) == 0
    # Whole units only, and the weights say the same: zero exactly where the masks remove.
    assert result.masks.is_quasi_structured()
    assert result.masks == vc.PruneMasks.from_weights(model)
    ends = [r for r in result.metrics if r["phase"] == "state_end"]
    assert len(ends) == (1 if method == "oneshot" else 2)
    assert ends[-1]["kept_heads"] == 4 and ends[-1]["kept_neurons"] == 2 * keep_count(128, 0.3, 1)
    assert set(result.test) == {"top1", "top5", "loss"}


def test_rsst_penalty_fades_the_dropped_weights(bundle):
    config = quick(states=1, epochs_per_state=2, lambda_max=5.0, lr=0.05,
                   train=TrainConfig(optimizer="sgd", clip_grad=None, progress=False))
    end = [r for r in prune(tiny(), bundle, config).metrics if r["phase"] == "state_end"][0]
    assert end["penalised_norm_after"] < 0.5 * end["penalised_norm_before"]


def test_pruning_passes_follow_one_schedule_and_carry_the_optimiser(bundle, tmp_path):
    config = quick(method="refill", states=2, epochs_per_state=1, finetune_epochs=1, lr=1e-3,
                   train=TrainConfig(warmup_epochs=1.0, min_lr=1e-5, progress=False))
    records = prune(tiny(), bundle, config, RunFolder(tmp_path)).metrics
    lrs = [r["lr"] for r in records if r["phase"] in ("refill", "finetune")]
    assert len(lrs) == 3 and 1e-3 > lrs[0] > lrs[1] > lrs[2] and lrs[2] == pytest.approx(1e-5)
    saved = checkpoint.load_optimizer(tmp_path, 2)
    steps = {int(v["step"]) for v in saved["state"].values()}
    assert steps == {2 * steps_per_epoch(bundle)}  # two passes of one epoch, one optimiser


def test_refill_rewinds_survivors_to_init_as_copies(bundle):
    model = tiny()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune(model, bundle, quick(method="refill", rewind="init", dense_epochs=1, states=1,
                                        epochs_per_state=0))
    expected = {k: v.clone() for k, v in init.items()}
    reference = tiny()
    reference.load_state_dict(expected)
    apply_hard(reference, result.masks)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_resume_ends_with_the_same_masks_and_weights(bundle, tmp_path):
    full = prune(tiny(), bundle, quick(finetune_epochs=1), RunFolder(tmp_path / "full"))
    partial = tmp_path / "partial"
    shutil.copytree(tmp_path / "full", partial)
    shutil.rmtree(partial / "checkpoints" / "state_002")
    for name in ("masks.safetensors", "structure.json", "result.json"):
        (partial / name).unlink()
    resumed_model = tiny()
    resumed = prune(resumed_model, bundle, quick(finetune_epochs=1), RunFolder(partial, resume=True))
    assert resumed.masks == full.masks
    assert all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(),
                                                 resumed_model.state_dict().values()))
    assert [r["phase"] for r in resumed.metrics] == [r["phase"] for r in full.metrics]
    assert vc.PruneMasks.load(partial / "masks.safetensors") == full.masks


def test_resume_refuses_changed_settings_and_fresh_runs_refuse_a_used_folder(bundle, tmp_path):
    prune(tiny(), bundle, quick(states=1, epochs_per_state=0), RunFolder(tmp_path))
    with pytest.raises(ConfigError, match="--resume with a different --head-ratio: the run used 0.5, now 0.25"):
        prune(tiny(), bundle, quick(states=1, epochs_per_state=0, head_ratio=0.25), RunFolder(tmp_path, resume=True))
    with pytest.raises(ConfigError, match="already holds a pruning run; resume it"):
        prune(tiny(), bundle, quick(states=1, epochs_per_state=0), RunFolder(tmp_path))


@pytest.mark.parametrize("kw,message", [
    (dict(method="lth"), "unknown method 'lth'; choose one of: oneshot, rsst, refill"),
    (dict(head_ratio=1.0), r"head_ratio must be in \[0, 1\), got 1.0"),
    (dict(method="refill", rewind="init"), "rewind='init' needs dense_epochs >= 1"),
    (dict(method="rsst", lambda_schedule="log"), "unknown lambda schedule 'log'; choose one of: exp, exp_custom"),
    (dict(criteria="taylor"), "unknown criterion 'taylor'"),
    (dict(method="oneshot", states=2), "states is a setting of rsst and refill, not of oneshot"),
    (dict(method="rsst", rewind="init"), "rewind is a setting of refill, not of rsst"),
])
def test_bad_prune_config_is_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        prune_config(**kw)


def test_the_configs_type_chooses_the_method():
    assert [type(prune_config(m)).__name__ for m in ("oneshot", "rsst", "refill")] == [
        "OneShotConfig", "RSSTConfig", "RefillConfig"]
    assert RSSTConfig(states=1).method == "rsst" and not hasattr(OneShotConfig(), "states")
    # One epoch budget, split as the iterative methods split it; one-shot spends it all fine-tuning.
    assert same_budget("oneshot", 2, 2, 4).finetune_epochs == 8
    assert (same_budget("rsst", 1, 1, 7).states, same_budget("rsst", 1, 1, 7).finetune_epochs) == (1, 7)
    with pytest.raises(ConfigError, match="config must be a method's config"):
        prune(tiny(), None, PruneConfig())


TORCHRUN_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    from safetensors.torch import save_file
    import vitcompact as vc
    from vitcompact.pruning.loop import prune
    rank = os.environ["RANK"]
    torch.manual_seed(int(rank))  # different init per rank: DDP must align them
    model = vc.create_model("vit-digits", depth=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(sys.argv[1], f"init{rank}.safetensors"))
    bundle = vc.load_data("digits", batch_size=16, limit=96)
    result = prune(model, bundle, vc.RSSTConfig(head_ratio=0.5, mlp_ratio=0.3, states=2, epochs_per_state=1,
                   finetune_epochs=0, train=vc.TrainConfig(progress=False)), vc.RunFolder(sys.argv[2]))
    save_file({k: v.contiguous() for k, v in result.model.state_dict().items()},
              os.path.join(sys.argv[1], f"final{rank}.safetensors"))
""")


def test_two_torchrun_processes_end_with_the_same_weights(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           str(script), str(tmp_path), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    init = [load_file(str(tmp_path / f"init{r}.safetensors")) for r in (0, 1)]
    final = [load_file(str(tmp_path / f"final{r}.safetensors")) for r in (0, 1)]
    # The ranks start apart, so agreeing at the end is DDP's doing, not the seed's.
    assert not torch.equal(init[0]["blocks.0.mlp.fc1.weight"], init[1]["blocks.0.mlp.fc1.weight"])
    assert final[0].keys() == final[1].keys() == init[0].keys()
    assert [k for k in final[0] if not torch.equal(final[0][k], final[1][k])] == []
    assert not torch.equal(final[0]["blocks.0.mlp.fc1.weight"], init[0]["blocks.0.mlp.fc1.weight"])  # it trained
    # What rank 0 wrote is what every rank holds: the last state's weights and the masks.
    saved = load_file(str(tmp_path / "out" / "checkpoints" / "state_002" / "model.safetensors"))
    assert [k for k in final[0] if not torch.equal(final[0][k], saved[k])] == []
    masks = vc.PruneMasks.load(tmp_path / "out" / "masks.safetensors")
    for r in (0, 1):
        assert all(torch.equal(final[r][name] != 0, m) for name, m in masks.masks.items())


def test_cli_prune_writes_masks_structure_metrics_and_artifact(tmp_path):
    out = tmp_path / "rsst"
    result = CliRunner().invoke(app, ["prune", "vit-digits", "--data", "digits", "--head-ratio", "0.5",
                                      "--finetune-epochs", "1",
                                      "--batch-size", "128", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    for name in ("masks.safetensors", "structure.json", "metrics.jsonl", "config.json", "model.safetensors"):
        assert (out / name).is_file(), name
    model, masks = vc.load(out), vc.PruneMasks.load(out / "masks.safetensors")
    assert masks.structure().kept_heads == 8
    assert vc.PruneMasks.from_weights(model).structure().kept_heads == 8


@pytest.mark.parametrize("args,message", [
    (["vit-digits", "--head-ratio", "1.5"], r"error: head_ratio must be in [0, 1), got 1.5"),
    (["vit-digits", "--data", "mnist", "--data-root", "/nonexistent"], "error: data folder /nonexistent does not exist"),
    (["resnet18"], "error: model is a ResNet, not a timm VisionTransformer"),
])
def test_cli_prune_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "never"
    result = CliRunner().invoke(app, ["prune", *args, "--out", str(out)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[0].startswith(message)
    assert not out.exists()


def test_cli_prune_unwritable_output_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(app, ["prune", "vit-digits", "--out", str(blocker / "out")])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: cannot write to {blocker / 'out'}: {blocker} is not a folder"
