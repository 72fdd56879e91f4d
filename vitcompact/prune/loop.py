"""`prune`: the iterative loop (RSST, Refill) and the one-shot baseline, on the pruning core.

Each state s = 1..S magnitude-prunes the surviving weights (compounding), regroups the element
masks into whole heads and neurons at that state's ratio, then
- refill: applies the structured mask at once, optionally rewinds the survivors, and retrains;
- rsst: retrains with a growing penalty on the weights the structure will drop, then cuts them;
- oneshot: a single state at the final ratio, then the whole epoch budget as fine-tuning.
Removed units never come back (each state's mask lies within the previous one) and the last
state uses the user's ratios exactly, so the final structure is what a direct `regroup` gives.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import output_folder
from ..errors import ConfigError
from ..io import ensure_dir, read_json, write_json, write_tensors
from ..models.adapter import vit_layout
from ..train import distributed
from ..train.metrics_log import MetricsLog
from ..train.seeding import rng_state, seed_everything, set_rng_state
from ..train.trainer import ScheduleWindow, TrainConfig, evaluate, resolve_device, steps_per_epoch, train
from ..validate import flag, in_range, integer, ratio, seed
from . import checkpoint
from .criteria import CRITERIA
from .magnitude import magnitude_prune
from .masks import PruneMasks
from .penalty import PENALTIES
from .regroup import TARGETS, regroup
from .schedules import LambdaSchedule
from .selection import MODES, check_round_to
from .structure import Structure

METHODS = ("rsst", "refill", "oneshot")
REWINDS = ("none", "init", "epoch")
# Fields of run.json that may differ between a run and its resumption: where it is written and how
# it is shown. Every other one changes the result.
RESUME_FREE = ("out_dir", "resume", "wandb_project", "train.progress")
BUDGET_WARMUP = 0.1
# How a resume refusal names a run.json field that is not an option of the same name.
RECORD_NAMES = {"inputs.model": "MODEL", "inputs.train_images": "training set (images)"}


@dataclass
class PruneConfig:
    """What to prune and how. Epoch budget: `states * epochs_per_state + finetune_epochs` for every
    method (one-shot spends it all fine-tuning). `prune_rate=None` picks the per-state magnitude
    rate so element sparsity tracks the structural target. `rewind` (Refill only) to `init` or
    to `epoch` `rewind_epoch` needs `dense_epochs` of dense training inside the loop. `lr` is the
    peak learning rate of the pruning budget, whose passes (states, then fine-tuning) follow one
    warm-up + cosine schedule and carry the optimiser's moments from pass to pass (a rewind
    resets them); `train` holds the other settings (its epochs, lr and seed are set per pass,
    and its warm-up is capped at a tenth of the budget: the model arrives trained).
    RSST fades the units it will drop with `penalty` (`fade`: decoupled, to `fade_to` of their
    size by each state's end along `lambda_schedule`'s shape; `gradient`: the research code's
    λ·W gradient term, with `lambda_max`/`lambda_base`). The defaults (fade, 2 states of 2
    epochs, then 4 epochs at the final structure) were chosen on validation accuracy; see the
    README's accuracy study."""

    method: str = "rsst"
    head_ratio: float = 0.3
    mlp_ratio: float = 0.3
    target: str = "both"
    criteria: str = "magnitude"
    mode: str = "layer-wise"
    min_keep: int = 1
    round_to: int = 1
    num_batches: int = 8
    states: int = 2
    epochs_per_state: int = 2
    finetune_epochs: int = 4
    prune_rate: float | None = None
    lambda_schedule: str = "x"
    lambda_max: float = 1.0
    lambda_base: float | None = None
    lambda_exponent: float = 4.0
    penalty: str = "fade"
    fade_to: float = 0.01
    rewind: str = "none"
    rewind_epoch: int = 1
    dense_epochs: int = 0
    distill: bool = False
    lr: float = 1e-3
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: Path | None = None
    resume: bool = False
    seed: int = 0
    wandb_project: str | None = None
    # What the run prunes, as its caller names it ({"model": ..., "data": ..., "batch_size": ...}):
    # kept in run.json beside the settings, so that resuming with other inputs is refused.
    inputs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value, choices in (("method", self.method, METHODS), ("target", self.target, TARGETS),
                                     ("mode", self.mode, MODES), ("rewind", self.rewind, REWINDS)):
            if value not in choices:
                raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
        CRITERIA.get(self.criteria)
        PENALTIES.get(self.penalty)
        in_range("fade_to", self.fade_to, 0.0, 1.0, low_open=True, high_open=True)
        ratio("head_ratio", self.head_ratio)
        ratio("mlp_ratio", self.mlp_ratio)
        if self.prune_rate is not None:
            ratio("prune_rate", self.prune_rate)
        integer("states", self.states, 1)
        for name in ("epochs_per_state", "finetune_epochs", "dense_epochs", "min_keep", "rewind_epoch"):
            integer(name, getattr(self, name), 0)
        integer("round_to", self.round_to, 1)
        integer("num_batches", self.num_batches, 1)
        seed("seed", self.seed)
        flag("distill", self.distill)
        flag("resume", self.resume)
        if not isinstance(self.inputs, dict):
            raise ConfigError(f"inputs must be a dict of what the run prunes, got {type(self.inputs).__name__}")
        if self.rewind != "none" and self.dense_epochs < 1:
            raise ConfigError(f"rewind={self.rewind!r} needs dense_epochs >= 1 (the weights to rewind "
                              "to come from dense training inside the loop); or use rewind='none'")
        if self.rewind == "epoch" and not 0 <= self.rewind_epoch <= self.dense_epochs:
            raise ConfigError(f"rewind_epoch must be in [0, dense_epochs={self.dense_epochs}], got {self.rewind_epoch}")
        self.schedule()
        dataclasses.replace(self.train, lr=self.lr)  # the pruning lr must suit the trainer too

    def schedule(self) -> LambdaSchedule:
        return LambdaSchedule(self.lambda_schedule, self.lambda_max, self.lambda_base, self.lambda_exponent)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out_dir"] = str(self.out_dir) if self.out_dir is not None else None
        return d


@dataclass
class StatePlan:
    index: int
    head_ratio: float
    mlp_ratio: float
    rate: float
    epochs: int


@dataclass
class PruneResult:
    model: nn.Module
    masks: PruneMasks
    structure: Structure
    metrics: list[dict[str, Any]]
    val: dict[str, float]
    test: dict[str, float]
    out_dir: Path | None = None


def state_ratio(final: float, state: int, states: int) -> float:
    """Ratio for state s of S: kept fraction (1 - r)^(s/S), and exactly r at the last state."""
    return final if state == states else 1.0 - (1.0 - final) ** (state / states)


def plan_states(model: nn.Module, config: PruneConfig) -> tuple[list[StatePlan], int]:
    """The per-state ratios, magnitude rates and training epochs, and the fine-tuning epochs."""
    layout = vit_layout(model)
    if config.target != "head":  # before the run folder is written
        check_round_to(config.round_to, [b.hidden for b in layout.blocks])
    attn = sum(b.num_heads * b.head_dim * layout.embed_dim * 4 for b in layout.blocks)
    mlp = sum(b.hidden * layout.embed_dim * 2 for b in layout.blocks)
    head_r = config.head_ratio if config.target != "mlp" else 0.0
    mlp_r = config.mlp_ratio if config.target != "head" else 0.0
    removed = (attn * head_r + mlp * mlp_r) / max(1, attn + mlp)
    if config.method == "oneshot":
        rate = config.prune_rate if config.prune_rate is not None else removed
        budget = config.states * config.epochs_per_state + config.finetune_epochs
        return [StatePlan(1, head_r, mlp_r, rate, 0)], budget
    S = config.states
    rate = config.prune_rate if config.prune_rate is not None else 1.0 - (1.0 - removed) ** (1.0 / S)
    plans = [StatePlan(s, state_ratio(head_r, s, S), state_ratio(mlp_r, s, S), rate, config.epochs_per_state)
             for s in range(1, S + 1)]
    return plans, config.finetune_epochs


@torch.no_grad()
def apply_hard(model: nn.Module, hard: PruneMasks) -> None:
    """Zero the masked weights and the biases of removed units. Those biases feed only masked
    outgoing weights, so the function is unchanged, but data-driven criteria then score removed
    units 0 and never pick them again."""
    hard.apply_(model)
    for block in hard.layout.blocks:
        heads, neurons = hard.unit_states(block)
        b = model.blocks[block.index]
        if heads is not None and b.attn.qkv.bias is not None:
            view = b.attn.qkv.bias.view(3, block.num_heads, block.head_dim)
            view[:, ~heads.kept.to(view.device)] = 0
        if neurons is not None and b.mlp.fc1.bias is not None:
            b.mlp.fc1.bias[~neurons.kept.to(b.mlp.fc1.bias.device)] = 0


def _intersect(a: PruneMasks, b: PruneMasks) -> PruneMasks:
    return PruneMasks({n: a[n] & b[n].to(a[n].device) for n in a.layout.weight_names()}, a.layout)


def _summary(hard: PruneMasks) -> dict[str, Any]:
    structure = hard.structure()
    sparsity = hard.sparsity()["all"]
    return {"sparsity": sparsity["pruned"] / sparsity["total"], "kept_heads": structure.kept_heads,
            "kept_neurons": structure.kept_neurons}


class _Run:
    """State shared by the phases of one `prune` call."""

    def __init__(self, model: nn.Module, bundle, config: PruneConfig):
        self.model, self.bundle, self.config = model, bundle, config
        self.out = Path(config.out_dir) if config.out_dir is not None else None
        self.main = distributed.is_main()
        records = []
        if self.out is not None and config.resume:
            records = MetricsLog.read(self.out / "metrics.jsonl")
        self.log = MetricsLog(self.out / "metrics.jsonl" if self.out is not None else None,
                              config.wandb_project, records, config.to_dict(), enabled=self.main)

    def train_config(self, epochs: int, phase: int, budget_epochs: int | None = None) -> TrainConfig:
        # A seed per phase: each phase's data order and augmentation repeat on resume.
        # Passes of the pruning budget start from a trained model, so their shared schedule warms
        # up for at most a tenth of the budget; dense training (no budget) keeps its warm-up.
        warmup = self.config.train.warmup_epochs
        if budget_epochs is not None:
            warmup = min(warmup, BUDGET_WARMUP * budget_epochs)
        return dataclasses.replace(self.config.train, epochs=epochs, lr=self.config.lr, warmup_epochs=warmup,
                                   seed=self.config.seed * 1000 + phase)

    def logger(self, phase: str, state: int, hard: PruneMasks):
        summary = _summary(hard)

        def on_epoch(record: dict[str, Any]) -> None:
            self.log.write({"phase": phase, "state": state, **record, **summary})
        return on_epoch

    def checkpoint(self, state: int, element: PruneMasks, hard: PruneMasks, opt_state, info: dict) -> None:
        if self.out is not None and self.main:
            checkpoint.save_state(self.out, state, self.model, element, hard, opt_state,
                                  {**info, "rng": rng_state()})
        distributed.barrier()


def _flat(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _run_record(config: PruneConfig, bundle) -> dict[str, Any]:
    """run.json: the settings, and the inputs — as the caller names them, plus what the data
    loaders show of themselves (a library caller may name nothing)."""
    record = config.to_dict()
    loader = bundle.train
    seen = {"batch_size": loader.batch_size, "train_images": len(loader.dataset)}
    # The caller's names first: a refusal names the first difference, and those are what it typed.
    record["inputs"] = {**config.inputs, **{k: v for k, v in seen.items() if k not in config.inputs}}
    return json.loads(json.dumps(record, default=str))  # as it reads back: lists, not tuples


def _check_resume(out: Path, record: dict[str, Any]) -> None:
    saved, now = _flat(read_json(out / "run.json")), _flat(record)
    for key, value in saved.items():
        if key not in RESUME_FREE and now.get(key) != value:
            option = RECORD_NAMES.get(key) or "--" + key.rpartition(".")[2].replace("_", "-")
            raise ConfigError(f"--resume with a different {option}: the run used {value!r}, now {now.get(key)!r}; "
                              "resume with the original value or start a new output folder")


def prune(model: nn.Module, bundle, config: PruneConfig | None = None) -> PruneResult:
    """Prune heads and MLP neurons of a trained `model` to the configured ratios (see module doc).

    Returns the trained, hard-masked model (weights of removed units exactly zero), its
    quasi-structured masks and structure, the metrics records, and validation and test accuracy
    (the test set is used for this final report only).
    """
    config = config or PruneConfig()
    if config.out_dir is None:
        return _prune(model, bundle, config)
    with output_folder.lock(config.out_dir, enabled=distributed.is_main()):
        return _prune(model, bundle, config)


def _prune(model: nn.Module, bundle, config: PruneConfig) -> PruneResult:
    device = resolve_device(config.train)
    distributed.setup(device)
    model.to(device)
    plans, finetune_epochs = plan_states(model, config)
    run = _Run(model, bundle, config)
    out = run.out
    start, element, hard, rewind_state = 0, PruneMasks.ones(model), PruneMasks.from_weights(model), None
    # A model that arrives pruned keeps its removed units removed; a dense one gets all-ones masks.
    hard = hard if hard.is_quasi_structured() else PruneMasks.ones(model)
    element = _intersect(element, hard)
    done = None
    if out is not None:
        started = (out / "run.json").is_file()
        if started and not config.resume:
            raise ConfigError(f"{out} already holds a pruning run; resume it (--resume) or choose a new folder")
        record = _run_record(config, bundle)
        if started:
            _check_resume(out, record)
            done = checkpoint.last_finished(out)
        # Every rank reads the folder before rank 0 writes to it.
        distributed.barrier()
        if run.main and not started:
            ensure_dir(out)
            write_json(out / "run.json", record)
    # Records of a state that did not finish are dropped; that state runs again.
    run.log.records = [r for r in run.log.records if done is not None and r.get("state", -1) <= done
                       and r["phase"] != "final"]

    # The pruning passes (states, then fine-tuning) share one learning-rate schedule and optimiser.
    epoch_steps = steps_per_epoch(bundle)
    budget = sum(plan.epochs for plan in plans) + finetune_epochs
    opt_state = None
    if done is not None:
        element, hard, info = checkpoint.load_state(out, done, model)
        element, hard = element.to(device), hard.to(device)
        set_rng_state(info["rng"])
        start = done
        if done > 0:
            opt_state = checkpoint.load_optimizer(out, done)
    elif config.dense_epochs:
        seed_everything(config.seed)
        init = {k: v.detach().clone() for k, v in model.state_dict().items()}
        snapshots = {0: init}

        def keep_snapshot(record: dict[str, Any]) -> None:
            if record["epoch"] == config.rewind_epoch:
                snapshots[record["epoch"]] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            run.logger("dense", 0, hard)(record)
        result = train(model, bundle, run.train_config(config.dense_epochs, 0), hard,
                       on_epoch=keep_snapshot, description="dense")
        rewind_state = snapshots[0 if config.rewind == "init" else config.rewind_epoch] if config.rewind != "none" else None
        if rewind_state is not None and out is not None and run.main:
            write_tensors(out / "rewind.safetensors", rewind_state)
        run.checkpoint(0, element, hard, result.optimizer_state, {"phase": "dense", "val": result.val})
    if config.rewind != "none" and rewind_state is None:
        rewind_state = checkpoint.load_tensors(out / "rewind.safetensors") if out is not None else None
        if rewind_state is None:
            raise ConfigError("cannot rewind: the rewind weights were not kept; resume needs out_dir")

    teacher = None
    if config.distill:
        if out is not None and config.resume and (out / "teacher.safetensors").is_file():
            teacher = copy.deepcopy(model)
            teacher.load_state_dict(checkpoint.load_tensors(out / "teacher.safetensors"))
        else:
            teacher = copy.deepcopy(model)
            if out is not None and run.main:
                write_tensors(out / "teacher.safetensors", teacher.state_dict())
        teacher.requires_grad_(False)

    offset = epoch_steps * sum(plan.epochs for plan in plans if plan.index <= start)

    def train_pass(epochs: int, phase: int, **kw: Any):
        nonlocal opt_state, offset
        result = train(model, bundle, run.train_config(epochs, phase, budget), hard,
                       window=ScheduleWindow(offset, epoch_steps * budget), optimizer_state=opt_state, **kw)
        offset += epoch_steps * epochs
        opt_state = result.optimizer_state
        return result

    calibration = bundle.calibration() if config.criteria in ("l1", "l2", "saliency") else None
    for plan in plans:
        if plan.index <= start:
            continue
        seed_everything(config.seed * 1000 + plan.index)
        # Scores come from the current trained, masked weights (never stale or rewound ones).
        element = magnitude_prune(model, plan.rate, masks=element)
        structured = regroup(model, element, config.target, plan.head_ratio, plan.mlp_ratio,
                             config.criteria, config.mode, config.min_keep, config.round_to,
                             data=calibration, num_batches=config.num_batches, device=device)
        structured = distributed.broadcast_masks(_intersect(structured, hard))
        element = distributed.broadcast_masks(element)
        info: dict[str, Any] = {"head_ratio": plan.head_ratio,
                                "mlp_ratio": plan.mlp_ratio, "rate": plan.rate}
        if config.method == "rsst":
            penalty = PENALTIES.get(config.penalty)(structured, element, config.schedule(), config.fade_to)
            norm_before = penalty.norm(model)
            train_pass(plan.epochs, plan.index, penalty=penalty, teacher=teacher,
                       on_epoch=run.logger("rsst", plan.index, hard),
                       description=f"rsst state {plan.index}/{len(plans)}")
            info.update({"lambda": penalty.value, "penalised_norm_before": norm_before,
                         "penalised_norm_after": penalty.norm(model)})
            hard = structured
            apply_hard(model, hard)
        else:
            hard = structured
            if rewind_state is not None:
                with torch.no_grad():
                    for k, t in model.state_dict().items():
                        t.copy_(rewind_state[k])
                opt_state = None  # moments of weights that no longer exist
            apply_hard(model, hard)
            if plan.epochs:
                train_pass(plan.epochs, plan.index, teacher=teacher,
                           on_epoch=run.logger(config.method, plan.index, hard),
                           description=f"{config.method} state {plan.index}/{len(plans)}")
        element = _intersect(element, hard)
        info.update({"val": evaluate(model, bundle.val, device), **_summary(hard)})
        run.log.write({"phase": "state_end", "state": plan.index, **{k: v for k, v in info.items() if k != "val"},
                       **{f"val_{k}": v for k, v in info["val"].items()}})
        run.checkpoint(plan.index, element, hard, opt_state, {"phase": "state", **info})

    if finetune_epochs:
        train_pass(finetune_epochs, len(plans) + 1, teacher=teacher,
                   on_epoch=run.logger("finetune", len(plans) + 1, hard), description="fine-tune")
    apply_hard(model, hard)
    val, test = evaluate(model, bundle.val, device), evaluate(model, bundle.test, device)
    structure = hard.structure()
    run.log.write({"phase": "final", **{f"val_{k}": v for k, v in val.items()},
                   **{f"test_{k}": v for k, v in test.items()}, **_summary(hard)})
    run.log.close()
    if out is not None and run.main:
        hard.save(out / "masks.safetensors")
        structure.save(out / "structure.json")
        write_json(out / "result.json", {"val": val, "test": test, "structure": structure.summary()})
    distributed.barrier()
    return PruneResult(model, hard, structure, run.log.records, val, test, out)
