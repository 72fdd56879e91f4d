"""`prune`: the iterative loop (RSST, Refill) and the one-shot baseline, on the pruning core.

Each state s = 1..S magnitude-prunes the surviving weights (compounding), regroups the element
masks into whole heads and neurons at that state's ratio, then runs its method's state step
(`methods`: RSST fades the units it will drop, then cuts them; Refill cuts, optionally rewinds
and retrains; one-shot is a single state at the final ratio, then the whole epoch budget as
fine-tuning). Removed units never come back (each state's mask lies within the previous one) and
the last state uses the user's ratios exactly, so the final structure is what a direct `regroup`
gives.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import output_folder
from ..errors import ConfigError
from ..io import write_json, write_tensors
from ..models.adapter import vit_layout
from ..training import distributed
from ..training.metrics_log import MetricsLog
from ..training.seeding import rng_state, seed_everything, set_rng_state
from ..training.trainer import ScheduleWindow, TrainConfig, evaluate, resolve_device, steps_per_epoch, train
from ..validate import flag, in_range, integer, ratio, seed
from . import checkpoint, run_folder
from .budget import LatencyBudget
from .criteria import CRITERIA
from .magnitude import magnitude_prune
from .masks import PruneMasks
from .methods import METHODS, Method, StatePlan, state_ratio  # noqa: F401  (state_ratio: re-exported)
from .penalty import PENALTIES
from .regroup import TARGETS, RegroupConfig, regroup
from .schedules import LambdaSchedule
from .selection import MODES, check_round_to
from .structure import Structure

REWINDS = ("none", "init", "epoch")
BUDGET_WARMUP = 0.1


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
    λ·W gradient term, with `lambda_max`/`lambda_base`). The default method is one-shot: on the
    converged Fashion-MNIST reference it led RSST on validation over 3 seeds (README's accuracy
    study); RSST's defaults (fade, 2 states of 2 epochs, then 4 epochs at the final structure)
    were chosen on validation accuracy too."""

    method: str = "oneshot"
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
    latency_budget: LatencyBudget | None = None
    out_dir: Path | None = None
    resume: bool = False
    seed: int = 0
    wandb_project: str | None = None
    # What the run prunes, as its caller names it ({"model": ..., "data": ..., "batch_size": ...}):
    # kept in run.json beside the settings, so that resuming with other inputs is refused.
    inputs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        METHODS.get(self.method)
        for name, value, choices in (("target", self.target, TARGETS), ("mode", self.mode, MODES),
                                     ("rewind", self.rewind, REWINDS)):
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
        if self.latency_budget is not None and not isinstance(self.latency_budget, LatencyBudget):
            raise ConfigError(f"latency_budget must be a LatencyBudget, got {type(self.latency_budget).__name__}")
        self.schedule()
        dataclasses.replace(self.train, lr=self.lr)  # the pruning lr must suit the trainer too

    def schedule(self) -> LambdaSchedule:
        return LambdaSchedule(self.lambda_schedule, self.lambda_max, self.lambda_base, self.lambda_exponent)

    def regroup_config(self, head_ratio: float, mlp_ratio: float, budget_ms: float | None = None) -> RegroupConfig:
        """How a state at these ratios (or, under a latency budget, this state's budget) regroups
        its element masks."""
        return RegroupConfig(target=self.target, head_ratio=head_ratio, mlp_ratio=mlp_ratio, criteria=self.criteria,
                             mode=self.mode, min_keep=self.min_keep, round_to=self.round_to,
                             num_batches=self.num_batches, budget=self.latency_budget,
                             budget_ms=budget_ms if self.latency_budget is not None else None)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out_dir"] = str(self.out_dir) if self.out_dir is not None else None
        return d


@dataclass
class PruneResult:
    model: nn.Module
    masks: PruneMasks
    structure: Structure
    metrics: list[dict[str, Any]]
    val: dict[str, float]
    test: dict[str, float]
    out_dir: Path | None = None


def plan_states(model: nn.Module, config: PruneConfig, method: Method) -> tuple[list[StatePlan], int]:
    """The per-state ratios, magnitude rates and training epochs, and the fine-tuning epochs."""
    layout = vit_layout(model)
    if config.target != "head":  # before the run folder is written
        check_round_to(config.round_to, [b.hidden for b in layout.blocks])
    attn = sum(b.num_heads * b.head_dim * layout.embed_dim * 4 for b in layout.blocks)
    mlp = sum(b.hidden * layout.embed_dim * 2 for b in layout.blocks)
    head_r = config.head_ratio if config.target != "mlp" else 0.0
    mlp_r = config.mlp_ratio if config.target != "head" else 0.0
    removed = (attn * head_r + mlp * mlp_r) / max(1, attn + mlp)
    budget = config.latency_budget
    if budget is None:
        return method.plan(head_r, mlp_r, removed)
    # Under a latency budget the allocator sets each state's structure; the share of the blocks'
    # latency it removes stands in for the ratios (it sets the magnitude rate of each state).
    table = budget.table
    blocks_full, blocks_floor = table.full_ms - table.fixed_ms, table.depth * table.base_ms
    removed = min(0.99, max(0.0, (table.full_ms - budget.budget_ms) / max(1e-9, blocks_full - blocks_floor)))
    plans, finetune = method.plan(removed if config.target != "mlp" else 0.0,
                                  removed if config.target != "head" else 0.0, removed)
    for plan in plans:
        plan.budget_ms = budget.at_state(plan.index, len(plans))
    return plans, finetune


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


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _Run:
    """One `prune` call: its settings and method, and what its steps hand on to each other."""

    def __init__(self, model: nn.Module, bundle, config: PruneConfig):
        self.model, self.bundle, self.config = model, bundle, config
        self.device = resolve_device(config.train)
        distributed.setup(self.device)
        model.to(self.device)
        self.method = METHODS.get(config.method)(config)
        self.plans, self.finetune_epochs = plan_states(model, config, self.method)
        self.out = Path(config.out_dir) if config.out_dir is not None else None
        self.main = distributed.is_main()
        records = []
        if self.out is not None and config.resume:
            records = MetricsLog.read(self.out / "metrics.jsonl")
        self.log = MetricsLog(self.out / "metrics.jsonl" if self.out is not None else None,
                              config.wandb_project, records, config.to_dict(), enabled=self.main)
        # A model that arrives pruned keeps its removed units removed; a dense one gets all-ones masks.
        hard = PruneMasks.from_weights(model)
        self.hard = hard if hard.is_quasi_structured() else PruneMasks.ones(model)
        self.element = _intersect(PruneMasks.ones(model), self.hard)
        self.calibration = bundle.calibration() if CRITERIA.get(config.criteria).needs_data else None
        self.done: int | None = None  # the last state a resumed run finished
        self.start = 0  # states up to this one are done
        self.rewind_state: dict[str, torch.Tensor] | None = None
        self.teacher: nn.Module | None = None
        # The pruning passes (states, then fine-tuning) share one learning-rate schedule and optimiser.
        self.epoch_steps = steps_per_epoch(bundle)
        self.budget = sum(plan.epochs for plan in self.plans) + self.finetune_epochs
        self.offset = 0  # steps of that schedule already taken
        self.opt_state = None

    def train_config(self, epochs: int, phase: int, budget_epochs: int | None = None) -> TrainConfig:
        # A seed per phase: each phase's data order and augmentation repeat on resume.
        # Passes of the pruning budget start from a trained model, so their shared schedule warms
        # up for at most a tenth of the budget; dense training (no budget) keeps its warm-up.
        warmup = self.config.train.warmup_epochs
        if budget_epochs is not None:
            warmup = min(warmup, BUDGET_WARMUP * budget_epochs)
        return dataclasses.replace(self.config.train, epochs=epochs, lr=self.config.lr, warmup_epochs=warmup,
                                   seed=self.config.seed * 1000 + phase)

    def logger(self, phase: str, state: int):
        summary = _summary(self.hard)  # the masks the epochs train under

        def on_epoch(record: dict[str, Any]) -> None:
            self.log.write({"phase": phase, "state": state, **record, **summary})
        return on_epoch

    def checkpoint(self, state: int, opt_state, info: dict) -> None:
        if self.out is not None and self.main:
            checkpoint.save_state(self.out, state, self.model, self.element, self.hard, opt_state,
                                  {**info, "rng": rng_state()})
        distributed.barrier()

    def train_pass(self, epochs: int, phase: int, **train_args: Any) -> None:
        """One pass of the pruning budget, going on with the last pass's schedule and optimiser."""
        result = train(self.model, self.bundle, self.train_config(epochs, phase, self.budget), self.hard,
                       window=ScheduleWindow(self.offset, self.epoch_steps * self.budget),
                       optimizer_state=self.opt_state, teacher=self.teacher, **train_args)
        self.offset += self.epoch_steps * epochs
        self.opt_state = result.optimizer_state

    def train_state(self, plan: StatePlan, **train_args: Any) -> None:
        method = self.config.method
        self.train_pass(plan.epochs, plan.index, on_epoch=self.logger(method, plan.index),
                        description=f"{method} state {plan.index}/{len(self.plans)}", **train_args)

    def cut(self, structured: PruneMasks) -> None:
        self.hard = structured
        apply_hard(self.model, structured)

    def rewind(self) -> None:
        if self.rewind_state is None:
            return
        with torch.no_grad():
            for k, t in self.model.state_dict().items():
                t.copy_(self.rewind_state[k])
        self.opt_state = None  # moments of weights that no longer exist


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
    run = _Run(model, bundle, config)
    _open_run_folder(run)
    _restore_or_train_dense(run)
    _keep_rewind_weights(run)
    _make_teacher(run)
    for plan in run.plans:
        if plan.index > run.start:
            _prune_state(run, plan)
    _finetune(run)
    return _finish(run)


def _open_run_folder(run: _Run) -> None:
    """Open a new run folder or resume the run in it; keep the records of the finished states."""
    if run.out is not None:
        run.done = run_folder.open_run(run.out, run.config.to_dict(), run.bundle, run.main)
    # Records of a state that did not finish are dropped; that state runs again.
    run.log.records = [r for r in run.log.records if run.done is not None and r.get("state", -1) <= run.done
                       and r["phase"] != "final"]


def _restore_or_train_dense(run: _Run) -> None:
    if run.done is not None:
        _restore(run)
    elif run.config.dense_epochs:
        _train_dense(run)


def _restore(run: _Run) -> None:
    """Masks, weights, RNG, optimiser and schedule position as the last finished state left them."""
    element, hard, info = checkpoint.load_state(run.out, run.done, run.model)
    run.element, run.hard = element.to(run.device), hard.to(run.device)
    set_rng_state(info["rng"])
    run.start = run.done
    if run.done > 0:
        run.opt_state = checkpoint.load_optimizer(run.out, run.done)
    run.offset = run.epoch_steps * sum(plan.epochs for plan in run.plans if plan.index <= run.start)


def _train_dense(run: _Run) -> None:
    """Dense training inside the loop, keeping the weights a rewind goes back to (state 0)."""
    config, model = run.config, run.model
    seed_everything(config.seed)
    snapshots = {0: _weights(model)}

    def keep_snapshot(record: dict[str, Any]) -> None:
        if record["epoch"] == config.rewind_epoch:
            snapshots[record["epoch"]] = _weights(model)
        run.logger("dense", 0)(record)
    result = train(model, run.bundle, run.train_config(config.dense_epochs, 0), run.hard,
                   on_epoch=keep_snapshot, description="dense")
    if config.rewind != "none":
        run.rewind_state = snapshots[0 if config.rewind == "init" else config.rewind_epoch]
        if run.out is not None and run.main:
            write_tensors(run.out / "rewind.safetensors", run.rewind_state)
    run.checkpoint(0, result.optimizer_state, {"phase": "dense", "val": result.val})


def _keep_rewind_weights(run: _Run) -> None:
    """A resumed run reads the rewind weights its dense training kept."""
    if run.config.rewind == "none" or run.rewind_state is not None:
        return
    run.rewind_state = checkpoint.load_tensors(run.out / "rewind.safetensors") if run.out is not None else None
    if run.rewind_state is None:
        raise ConfigError("cannot rewind: the rewind weights were not kept; resume needs out_dir")


def _make_teacher(run: _Run) -> None:
    """The model as it enters pruning, frozen (kept in the folder, so that a resume distils from it)."""
    config, out = run.config, run.out
    if not config.distill:
        return
    run.teacher = copy.deepcopy(run.model)
    if out is not None and config.resume and (out / "teacher.safetensors").is_file():
        run.teacher.load_state_dict(checkpoint.load_tensors(out / "teacher.safetensors"))
    elif out is not None and run.main:
        write_tensors(out / "teacher.safetensors", run.teacher.state_dict())
    run.teacher.requires_grad_(False)


def _prune_state(run: _Run, plan: StatePlan) -> None:
    seed_everything(run.config.seed * 1000 + plan.index)
    structured = _regroup_state(run, plan)
    info: dict[str, Any] = {"head_ratio": plan.head_ratio, "mlp_ratio": plan.mlp_ratio, "rate": plan.rate,
                            **({"budget_ms": plan.budget_ms} if plan.budget_ms is not None else {}),
                            **run.method.run_state(run, plan, structured, run.element)}
    run.element = _intersect(run.element, run.hard)
    _end_state(run, plan, info)


def _regroup_state(run: _Run, plan: StatePlan) -> PruneMasks:
    """Magnitude-prune the survivors at the state's rate and regroup them at its ratios."""
    # Scores come from the current trained, masked weights (never stale or rewound ones).
    element = magnitude_prune(run.model, plan.rate, masks=run.element)
    structured = regroup(run.model, element, run.config.regroup_config(plan.head_ratio, plan.mlp_ratio, plan.budget_ms),
                         data=run.calibration, device=run.device)
    structured = distributed.broadcast_masks(_intersect(structured, run.hard))
    run.element = distributed.broadcast_masks(element)
    return structured


def _end_state(run: _Run, plan: StatePlan, info: dict[str, Any]) -> None:
    info.update({"val": evaluate(run.model, run.bundle.val, run.device), **_summary(run.hard)})
    run.log.write({"phase": "state_end", "state": plan.index, **{k: v for k, v in info.items() if k != "val"},
                   **{f"val_{k}": v for k, v in info["val"].items()}})
    run.checkpoint(plan.index, run.opt_state, {"phase": "state", **info})


def _finetune(run: _Run) -> None:
    if run.finetune_epochs:
        phase = len(run.plans) + 1
        run.train_pass(run.finetune_epochs, phase, on_epoch=run.logger("finetune", phase), description="fine-tune")


def _finish(run: _Run) -> PruneResult:
    """Evaluate the hard-masked model, log and save the final masks, structure and result."""
    model, hard, out = run.model, run.hard, run.out
    apply_hard(model, hard)
    val, test = evaluate(model, run.bundle.val, run.device), evaluate(model, run.bundle.test, run.device)
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
