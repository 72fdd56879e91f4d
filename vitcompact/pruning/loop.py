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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from .. import output_folder
from ..data import load_data
from ..models.preprocess import data_config
from ..errors import ConfigError, DataError
from ..io import write_json, write_tensors
from ..models.adapter import vit_layout
from ..models.merge_config import TokenMergeConfig
from ..models.token_merge import check_token_merge, merge_tokens
from ..training import distributed
from ..training.metrics_log import MetricsLog
from ..training.seeding import rng_state, seed_everything, set_rng_state
from ..training.trainer import ScheduleWindow, TrainConfig, evaluate, resolve_device, steps_per_epoch, train
from . import checkpoint, run_folder
from ..compaction import compact
from ..latency.budget import LatencyBudget
from ..latency.report import budget_report, write_budget_report
from .configs import CONFIGS, OneShotConfig, PruneConfig, RunFolder  # noqa: F401  (re-exported)
from .criteria import CRITERIA
from .magnitude import magnitude_prune
from ..masks import PruneMasks
from .methods import METHODS, Method, StatePlan, state_ratio  # noqa: F401  (state_ratio: re-exported)
from .regroup import regroup_with_allocation
from .selection import check_round_to
from ..structure import Structure

Notes = Callable[[str], None]
BUDGET_WARMUP = 0.1


@dataclass
class PruneResult:
    model: nn.Module
    masks: PruneMasks
    structure: Structure
    metrics: list[dict[str, Any]]
    val: dict[str, float]
    test: dict[str, float]
    out_dir: Path | None = None
    budget: dict[str, Any] | None = None  # under a latency budget: requested, predicted, measured speed-up
    token_merge: dict[str, Any] | None = None  # with token merging: its setting, val and test top-1 without and with


def plan_states(model: nn.Module, config: PruneConfig, method: Method,
                budget: LatencyBudget | None = None) -> tuple[list[StatePlan], int]:
    """The per-state ratios, magnitude rates and training epochs, and the fine-tuning epochs."""
    layout = vit_layout(model)
    if config.target != "head":  # before the run folder is written
        check_round_to(config.round_to, [b.hidden for b in layout.blocks])
    attn = sum(b.num_heads * b.head_dim * layout.embed_dim * 4 for b in layout.blocks)
    mlp = sum(b.hidden * layout.embed_dim * 2 for b in layout.blocks)
    head_r = config.head_ratio if config.target != "mlp" else 0.0
    mlp_r = config.mlp_ratio if config.target != "head" else 0.0
    removed = (attn * head_r + mlp * mlp_r) / max(1, attn + mlp)
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

    def __init__(self, model: nn.Module, bundle, config: PruneConfig, folder: RunFolder | None,
                 notes: Notes | None = None):
        self.model, self.bundle, self.config, self.folder = model, bundle, config, folder
        # Dense training inside the loop, and what a cut rewinds to: the iterative methods' settings.
        self.dense_epochs = getattr(config, "dense_epochs", 0)
        self.rewind_to, self.rewind_epoch = getattr(config, "rewind", "none"), getattr(config, "rewind_epoch", 0)
        # The budget is measured (or read from the cache) before anything is written.
        self.budget = config.budget.budget(model, config.round_to, progress=notes) if config.budget else None
        self.dense = copy.deepcopy(model).eval() if self.budget is not None else None  # what the report times
        self.device = resolve_device(config.train)
        distributed.setup(self.device)
        model.to(self.device)
        self.method = METHODS.get(config.method)(config)
        self.plans, self.finetune_epochs = plan_states(model, config, self.method, self.budget)
        self.out = folder.out_dir if folder is not None else None
        self.resume = folder is not None and folder.resume
        self.main = distributed.is_main()
        records = MetricsLog.read(self.out / "metrics.jsonl") if self.resume else []
        self.log = MetricsLog(self.out / "metrics.jsonl" if self.out is not None else None,
                              folder.wandb_project if folder else None, records, self.settings(), enabled=self.main)
        # A model that arrives pruned keeps its removed units removed; a dense one gets all-ones masks.
        hard = PruneMasks.from_weights(model)
        self.hard = hard if hard.is_quasi_structured() else PruneMasks.ones(model)
        self.element = _intersect(PruneMasks.ones(model), self.hard)
        if self.budget is not None:  # a budget the allocator cannot meet stops before the folder is written
            self.budget.check_reachable(config.target != "mlp", config.target != "head", config.round_to,
                                        free=self.hard != PruneMasks.ones(model))
        self.calibration = _calibration(model, bundle, config, self.method)
        self.done: int | None = None  # the last state a resumed run finished
        self.start = 0  # states up to this one are done
        self.rewind_state: dict[str, torch.Tensor] | None = None
        self.teacher: nn.Module | None = None
        # The pruning passes (states, then fine-tuning) share one learning-rate schedule and optimiser.
        self.epoch_steps = steps_per_epoch(bundle)
        self.epochs = sum(plan.epochs for plan in self.plans) + self.finetune_epochs
        self.offset = 0  # steps of that schedule already taken
        self.opt_state = None
        self.budget_r = 0  # tokens merged per block, where the budget chooses them (its last state's choice)

    @property
    def merging(self) -> TokenMergeConfig | None:
        """The pruned model's token merging: the user's, or the r a budget with the token axis chose."""
        return self.config.merging or (TokenMergeConfig(r=self.budget_r) if self.budget_r else None)

    def settings(self) -> dict[str, Any]:
        """The run's settings as run.json records them: the method's config and the run folder."""
        folder = self.folder
        return {**self.config.to_dict(), "out_dir": str(folder.out_dir) if folder else None,
                "resume": self.resume, "wandb_project": folder.wandb_project if folder else None,
                "inputs": dict(folder.inputs) if folder else {}}

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
        result = train(self.model, self.bundle, self.train_config(epochs, phase, self.epochs), self.hard,
                       window=ScheduleWindow(self.offset, self.epoch_steps * self.epochs),
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


def _calibration(model: nn.Module, bundle, config: PruneConfig, method: Method) -> DataLoader | None:
    """Training images in a fixed order, without augmentation, for a data-driven criterion or a
    refit (from `calib_data` where the config names a source or a folder of images, read with the
    model's own preprocessing): the first `calib_images` of them where the config says how many."""
    if not (CRITERIA.get(config.criteria).needs_data or method.needs_calibration):
        return None
    source = getattr(config, "calib_data", None)
    if source is not None:  # at the model's input, normalised as the data it is pruned on
        folder, cfg = Path(source).is_dir(), data_config(model)
        preprocessing = {**{k: cfg[k] for k in ("interpolation", "crop_pct", "crop_mode")},
                         "mean": tuple(bundle.mean), "std": tuple(bundle.std)}
        bundle = load_data("images" if folder else source, source if folder else None,
                           img_size=cfg["input_size"][1:], in_chans=cfg["input_size"][0], preprocessing=preprocessing,
                           batch_size=bundle.train.batch_size, aug="none", seed=config.seed)
    loader = bundle.calibration()
    if len(loader.dataset) < loader.batch_size:
        raise DataError(f"the calibration data holds {len(loader.dataset)} images, fewer than one batch "
                        f"({loader.batch_size}); give more images or a smaller batch size")
    count = getattr(config, "calib_images", None)
    if count is None:
        return loader
    if count < loader.batch_size and count < len(loader.dataset):
        raise DataError(f"calib_images={count} is fewer than one batch ({loader.batch_size}); "
                        "ask for at least one batch of calibration images")
    images = Subset(loader.dataset, range(min(count, len(loader.dataset))))
    return DataLoader(images, batch_size=loader.batch_size, shuffle=False, collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers)


def prune(model: nn.Module, bundle, config: PruneConfig | None = None, run: RunFolder | None = None,
          notes: Notes | None = None) -> PruneResult:
    """Prune heads and MLP neurons of a trained `model` to the configured ratios, or to the
    configured latency budget (see module doc); `notes` receives one-line progress notes.

    Returns the trained, hard-masked model (weights of removed units exactly zero), its
    quasi-structured masks and structure, the metrics records, validation and test accuracy (the
    test set is used for this final report only) and, under a budget, the requested, predicted
    and measured speed-up (also written to `out_dir` as latency_budget.json, .md and .png).
    With `config.token_merge` the returned model merges tokens (recorded in its model record), its
    accuracy is measured so, and `token_merge` holds the top-1 without and with merging.
    """
    config = config or OneShotConfig()
    classes = tuple(CONFIGS.get(name) for name in CONFIGS)
    if not isinstance(config, classes):
        raise ConfigError(f"config must be a method's config ({', '.join(c.__name__ for c in classes)}), "
                          f"got {type(config).__name__}")
    config.check_merge_to_finetune()
    if config.merging is not None:  # an r too large for the model's tokens, before anything is written
        check_token_merge(model, config.merging)
    if run is None:
        return _prune(model, bundle, config, None, notes)
    with output_folder.lock(run.out_dir, enabled=distributed.is_main()):
        return _prune(model, bundle, config, run, notes)


def _prune(model: nn.Module, bundle, config: PruneConfig, folder: RunFolder | None, notes: Notes | None) -> PruneResult:
    run = _Run(model, bundle, config, folder, notes)
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
        run.done = run_folder.open_run(run.out, run.settings(), run.bundle, run.main)
    # Records of a state that did not finish are dropped; that state runs again.
    run.log.records = [r for r in run.log.records if run.done is not None and r.get("state", -1) <= run.done
                       and r["phase"] != "final"]


def _restore_or_train_dense(run: _Run) -> None:
    if run.done is not None:
        _restore(run)
    elif run.dense_epochs:
        _train_dense(run)


def _restore(run: _Run) -> None:
    """Masks, weights, RNG, optimiser and schedule position as the last finished state left them."""
    element, hard, info = checkpoint.load_state(run.out, run.done, run.model)
    run.element, run.hard = element.to(run.device), hard.to(run.device)
    set_rng_state(info["rng"])
    run.start = run.done
    run.budget_r = info.get("merge_r", 0)
    if run.done > 0:
        run.opt_state = checkpoint.load_optimizer(run.out, run.done)
    run.offset = run.epoch_steps * sum(plan.epochs for plan in run.plans if plan.index <= run.start)


def _train_dense(run: _Run) -> None:
    """Dense training inside the loop, keeping the weights a rewind goes back to (state 0)."""
    config, model = run.config, run.model
    seed_everything(config.seed)
    snapshots = {0: _weights(model)}

    def keep_snapshot(record: dict[str, Any]) -> None:
        if record["epoch"] == run.rewind_epoch:
            snapshots[record["epoch"]] = _weights(model)
        run.logger("dense", 0)(record)
    result = train(model, run.bundle, run.train_config(run.dense_epochs, 0), run.hard,
                   on_epoch=keep_snapshot, description="dense")
    if run.rewind_to != "none":
        run.rewind_state = snapshots[0 if run.rewind_to == "init" else run.rewind_epoch]
        if run.out is not None and run.main:
            write_tensors(run.out / "rewind.safetensors", run.rewind_state)
    run.checkpoint(0, result.optimizer_state, {"phase": "dense", "val": result.val})


def _keep_rewind_weights(run: _Run) -> None:
    """A resumed run reads the rewind weights its dense training kept."""
    if run.rewind_to == "none" or run.rewind_state is not None:
        return
    run.rewind_state = checkpoint.load_tensors(run.out / "rewind.safetensors") if run.out is not None else None
    if run.rewind_state is None:
        raise ConfigError("cannot rewind: the rewind weights were not kept; resume needs out_dir")


def _make_teacher(run: _Run) -> None:
    """The model as it enters pruning, frozen (kept in the folder, so that a resume distils from it)."""
    config, out = run.config, run.out
    if not config.distill or not run.epochs:  # no training pass to distil in
        return
    run.teacher = copy.deepcopy(run.model)
    if out is not None and run.resume and (out / "teacher.safetensors").is_file():
        run.teacher.load_state_dict(checkpoint.load_tensors(out / "teacher.safetensors"))
    elif out is not None and run.main:
        write_tensors(out / "teacher.safetensors", run.teacher.state_dict())
    run.teacher.requires_grad_(False)


def _prune_state(run: _Run, plan: StatePlan) -> None:
    seed_everything(run.config.seed * 1000 + plan.index)
    structured = _regroup_state(run, plan)
    info: dict[str, Any] = {"head_ratio": plan.head_ratio, "mlp_ratio": plan.mlp_ratio, "rate": plan.rate,
                            **({"budget_ms": plan.budget_ms} if plan.budget_ms is not None else {}),
                            **({"merge_r": run.budget_r} if run.budget is not None and run.budget.tokens else {}),
                            **run.method.run_state(run, plan, structured, run.element)}
    run.element = _intersect(run.element, run.hard)
    _end_state(run, plan, info)


def _regroup_state(run: _Run, plan: StatePlan) -> PruneMasks:
    """Magnitude-prune the survivors at the state's rate and regroup them at its ratios (under a
    budget with the token axis, also choosing the tokens merged per block: `run.budget_r`)."""
    # Scores come from the current trained, masked weights (never stale or rewound ones).
    element = magnitude_prune(run.model, plan.rate, masks=run.element)
    structured, allocation = regroup_with_allocation(
        run.model, element,
        run.config.regroup_config(plan.head_ratio, plan.mlp_ratio, run.budget, plan.budget_ms,
                                  len(run.calibration) if run.method.needs_calibration else None),
        data=run.calibration, device=run.device)
    run.budget_r = allocation.r if allocation is not None else 0
    structured = distributed.broadcast_masks(_intersect(structured, run.hard))
    run.element = distributed.broadcast_masks(element)
    return structured


def _end_state(run: _Run, plan: StatePlan, info: dict[str, Any]) -> None:
    info.update({"val": evaluate(run.model, run.bundle.val, run.device), **_summary(run.hard)})
    run.log.write({"phase": "state_end", "state": plan.index, **{k: v for k, v in info.items() if k != "val"},
                   **{f"val_{k}": v for k, v in info["val"].items()}})
    run.checkpoint(plan.index, run.opt_state, {"phase": "state", **info})


def _finetune(run: _Run) -> None:
    """The fine-tuning epochs at the final structure; with `finetune_token_merge`, on merged tokens
    (the user's r, or the one a budget with the token axis chose)."""
    if run.finetune_epochs:
        phase = len(run.plans) + 1
        merging = run.merging if run.config.finetune_token_merge else None
        if merging is not None:
            merge_tokens(run.model, merging)
        run.train_pass(run.finetune_epochs, phase, on_epoch=run.logger("finetune", phase),
                       description="fine-tune" if merging is None else f"fine-tune (token merging r={merging.r})")


def _finish(run: _Run) -> PruneResult:
    """Evaluate the hard-masked model, log and save the final masks, structure and result."""
    model, hard, out = run.model, run.hard, run.out
    apply_hard(model, hard)
    if run.merging is not None:  # the structure alone first, then with its tokens merged
        merge_tokens(model, None)
    val, test = evaluate(model, run.bundle.val, run.device), evaluate(model, run.bundle.test, run.device)
    val, test, merging = _merged_accuracy(run, val, test)
    structure = hard.structure()
    run.log.write({"phase": "final", **{f"val_{k}": v for k, v in val.items()},
                   **{f"test_{k}": v for k, v in test.items()}, **_summary(hard)})
    run.log.close()
    if out is not None and run.main:
        hard.save(out / "masks.safetensors")
        structure.save(out / "structure.json")
        write_json(out / "result.json", {"val": val, "test": test, "structure": structure.summary(),
                                         **({"token_merge": merging} if merging is not None else {})})
    report = _budget_report(run, structure)
    distributed.barrier()
    return PruneResult(model, hard, structure, run.log.records, val, test, out, report, merging)


def _merged_accuracy(run: _Run, val: dict[str, float],
                     test: dict[str, float]) -> tuple[dict[str, float], dict[str, float], dict[str, Any] | None]:
    """With token merging: merge the pruned model's tokens and measure it again on the same splits.
    Returns the model's validation and test results as it is returned (merging) and the merging's
    summary (top-1 without and with); without merging, `val`, `test` and None."""
    merging, model, device = run.merging, run.model, run.device
    if merging is None:
        return val, test, None
    merge_tokens(model, merging)
    merged_val, merged_test = evaluate(model, run.bundle.val, device), evaluate(model, run.bundle.test, device)
    summary = {**merging.to_dict(), "finetuned_with_merging": bool(run.config.finetune_token_merge),
               "val_top1": {"without": val["top1"], "with": merged_val["top1"]},
               "test_top1": {"without": test["top1"], "with": merged_test["top1"]}}
    return merged_val, merged_test, summary


def _budget_report(run: _Run, structure: Structure) -> dict[str, Any] | None:
    """Under a latency budget: the pruned structure's speed-up, requested, predicted and measured
    (dense and compact timed interleaved at the deployment batch), written beside the masks."""
    if run.budget is None or not run.main:
        return None
    small = compact(copy.deepcopy(run.model).cpu(), run.hard.to("cpu")).eval()
    if run.config.merging is not None:  # the budget is on heads and neurons: time the structure alone
        merge_tokens(small, None)
    report = budget_report(run.dense, small, run.budget, run.config.budget)
    if run.out is not None:
        write_budget_report(report, run.out)
    return report
