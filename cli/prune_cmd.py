"""`vitcompact prune`: one-shot / RSST / Refill pruning to a head and neuron structure; its options
are made from the method configs (`vitcompact.pruning.configs`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer

import vitcompact as vc
from vitcompact import output_folder
from vitcompact.latency import MISS_TOLERANCE, BudgetRequest, budget_missed
from vitcompact.latency.report import REPORT_MD
from vitcompact.models.token_merge import check_token_merge
from vitcompact.pruning.configs import CONFIGS, PruneConfig, RunFolder, foreign_setting, prune_config
from vitcompact.pruning.loop import prune as prune_model
from vitcompact.training import TrainConfig, distributed

from .common import (AugOption, DataOption, DataRootOption, JsonOption, PretrainedOption, ResetClassifierOption,
                     WorkersOption, check_writable, console, err_console, print_json, token_merge_config,
                     token_merge_options, user_errors)
from .options import Fields, config_options, split


def method_fields(prefix: str, exclude: tuple[str, ...] = ()) -> list[Fields]:
    """Every method config's fields, each once (under the first config that has it)."""
    seen: set[str] = set(exclude)
    groups = []
    for name in CONFIGS:
        config = CONFIGS.get(name)
        own = tuple(f.name for f in dataclasses.fields(config) if f.name not in seen)
        seen.update(own)
        groups.append(Fields(config, prefix, names=own))
    return groups


def config_from_options(method: str, given: dict[str, Any], progress: bool = True) -> PruneConfig:
    """`method`'s config from the options given (`prune.`, `train.`, `budget.` and `token_merge.`
    names); an option of another method, or the ratios beside a latency budget, are refused."""
    budget_fields = split(given, "budget.")
    budget = BudgetRequest(**budget_fields) if budget_fields else None
    fields = split(given, "prune.")
    if budget is not None and {"head_ratio", "mlp_ratio"} & fields.keys():
        raise vc.ConfigError("--head-ratio and --mlp-ratio do not apply with a latency budget (--target-speedup "
                             "or --latency-ms sets the structure); give one or the other")
    foreign = foreign_setting(method, fields)
    if foreign is not None:
        name, owners = foreign
        raise vc.ConfigError(f"--{name.replace('_', '-')} is a setting of {' and '.join(owners)}, not of {method}")
    defaults = CONFIGS.get(method)().train  # the method's own trainer settings (refit's distil)
    train = dataclasses.replace(defaults, progress=progress, **split(given, "train."))
    return prune_config(method, **fields, train=train, budget=budget, token_merge=token_merge_config(given))


def check_budget_met(report: dict[str, Any] | None, out: Path, allow: bool) -> None:
    """Refuse to save a model whose measured speed-up misses its latency budget (beyond
    `MISS_TOLERANCE`) unless `allow`; then it is said loudly, and saved."""
    missed = budget_missed(report) if report is not None else None
    if missed is None:
        return
    where = out / REPORT_MD
    if allow:
        err_console.print(f"warning: {missed}; saved anyway (--allow-missed-budget), see {where}", markup=False)
        return
    raise vc.ConfigError(f"{missed}; the model is not saved (the masks and {where} are): check the machine's "
                         "load, or rerun with --resume --allow-missed-budget to save it as it is")


def run_inputs(model: str, checkpoint: Path | None, data: str, data_root: Path | None, batch_size: int,
               aug: str = "light", pretrained: bool = False) -> dict:
    """What a run prunes, for run.json: a resume with other inputs is refused. Paths are absolute,
    so that the same run resumed from another working folder is the same run."""
    def named(spec: str | Path | None) -> str | None:
        return None if spec is None else str(Path(spec).resolve()) if Path(spec).exists() else str(spec)
    return {"model": named(model), "checkpoint": named(checkpoint), "pretrained": pretrained, "data": data,
            "data_root": named(data_root), "batch_size": batch_size, "aug": aug}


PRUNE_OPTIONS = (*method_fields(prefix="prune.", exclude=("train", "budget", "token_merge")),
                 Fields(TrainConfig, "train.", exclude=("epochs", "lr", "seed", "progress")),
                 Fields(BudgetRequest, "budget."),
                 token_merge_options("the pruned model (recorded in its artifact; val and test top-1 reported "
                                     "without and with it)"))


@user_errors
@config_options(*PRUNE_OPTIONS)
def prune(
    model: str = typer.Argument(..., help="Trained artifact directory, preset or timm ViT name."),
    method: str = typer.Option("oneshot", help=f"One of: {', '.join(CONFIGS)}; each takes its own options "
                               "(one-shot: --finetune-epochs; rsst and refill: --states, --epochs-per-state, ...)."),
    data: str = DataOption,
    data_root: Path | None = DataRootOption,
    batch_size: int = typer.Option(64, help="Batch size."),
    aug: str = AugOption,
    workers: int | None = WorkersOption,
    checkpoint: Path | None = typer.Option(None, help="Dense weights (.safetensors/.pth) for MODEL."),
    pretrained: bool = PretrainedOption,
    reset_classifier: bool = ResetClassifierOption,
    out: Path = typer.Option(..., "--out", help="Output folder (checkpoints, masks, pruned artifact)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last state."),
    wandb_project: str | None = typer.Option(None, "--wandb-project", help="Also log to wandb."),
    allow_missed_budget: bool = typer.Option(
        False, "--allow-missed-budget", help=f"Save the model even when the measured speed-up misses the latency "
                                             f"budget by more than {MISS_TOLERANCE:.0%} (otherwise: exit code 2)."),
    json_out: bool = JsonOption,
    given: dict[str, Any] | None = None,
) -> None:
    """Prune heads and MLP neurons; writes masks, structure, metrics and the masked model.

    Example: vitcompact prune runs/dense --data digits --method rsst --head-ratio 0.3 --mlp-ratio 0.3 --out runs/rsst
    """
    config = config_from_options(method, given or {}, progress=not json_out)
    if allow_missed_budget and config.budget is None:
        raise vc.ConfigError("--allow-missed-budget is for a latency budget; add --target-speedup or --latency-ms")
    folder = RunFolder(out, resume, wandb_project,
                       run_inputs(model, checkpoint, data, data_root, batch_size, aug, pretrained))
    check_writable(out)
    if not resume and (out / "run.json").exists():
        raise vc.ConfigError(f"{out} already holds a pruning run; pass --resume or choose a new --out")
    m, bundle = vc.model_and_data(model, data, data_root, checkpoint=checkpoint, pretrained=pretrained,
                                  reset_classifier=reset_classifier, seed=config.seed, batch_size=batch_size,
                                  aug=aug, workers=workers)
    if config.merging is not None:  # an r too large for the model's tokens: refused before the folder is made
        check_token_merge(m, config.merging)
    say = (lambda line: None) if json_out else (lambda line: console.print(line, markup=False))
    with output_folder.lock(out, enabled=distributed.is_main()):
        result = prune_model(m, bundle, config, folder, notes=say)
        if not distributed.is_main():  # under torchrun every rank holds the same masks; rank 0 writes
            return
        budget = ({k: result.budget[k] for k in ("requested_speedup", "predicted", "measured")}
                  if result.budget is not None else None)
        check_budget_met(result.budget, out, allow_missed_budget)
        merging = {"token_merge": result.token_merge} if result.token_merge is not None else {}
        vc.save(result.model, out, provenance={"stage": "prune", "data": data, "prune": config.to_dict(),
                                               "val": result.val, "test": result.test,
                                               "structure": result.structure.summary(), **merging})
    summary = {"out": str(out), "structure": result.structure.summary(), "val": result.val, "test": result.test,
               **merging, **({"latency_budget": budget} if budget is not None else {})}
    if json_out:
        print_json(summary)
        return
    print_summary(summary, config)


def print_summary(summary: dict[str, Any], config: PruneConfig) -> None:
    """The prune summary as lines: the latency budget's speed-ups, the token merging's accuracy
    without and with it, then the structure and the final model's accuracy."""
    budget, merge = summary.get("latency_budget"), summary.get("token_merge")
    if budget is not None:
        request = config.budget
        console.print(f"speed-up at batch {request.deploy_batch} ({request.backend}): requested "
                      f"{budget['requested_speedup']:.2f}x, predicted {budget['predicted']['speedup']:.2f}x, "
                      f"measured {budget['measured']['speedup']:.2f}x "
                      f"(see {Path(summary['out']) / 'latency_budget.md'})")
    if merge is not None:
        trained = ", fine-tuned with it" if merge["finetuned_with_merging"] else ""
        console.print(f"token merging r={merge['r']} ({merge['schedule']}{trained}): "
                      f"val top1 {merge['val_top1']['without']:.4f} without, {merge['val_top1']['with']:.4f} with; "
                      f"test top1 {merge['test_top1']['without']:.4f} without, {merge['test_top1']['with']:.4f} with")
    console.print(f"{summary['structure']}  val top1 {summary['val']['top1']:.4f}  "
                  f"test top1 {summary['test']['top1']:.4f}  saved to {summary['out']}")
