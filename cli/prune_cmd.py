"""`vitcompact prune`: RSST / Refill / one-shot pruning to a head and neuron structure."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import typer

import vitcompact as vc
from vitcompact import output_folder
from vitcompact.bench.latency_budget import BudgetRequest, budget_report, write_budget_report
from vitcompact.pruning.loop import METHODS, REWINDS, PruneConfig, prune as prune_model
from vitcompact.pruning.penalty import PENALTIES
from vitcompact.pruning.schedules import LAMBDA_SCHEDULES
from vitcompact.training import TrainConfig, distributed

from .common import (AugOption, CutmixOption, DataOption, DataRootOption, JsonOption, LabelSmoothingOption,
                     MixupOption, PretrainedOption, ResetClassifierOption, WorkersOption, check_writable, console,
                     print_json, user_errors)

_defaults = PruneConfig()


def run_inputs(model: str, checkpoint: Path | None, data: str, data_root: Path | None, batch_size: int,
               aug: str = "light", pretrained: bool = False) -> dict:
    """What a run prunes, for run.json: a resume with other inputs is refused. Paths are absolute,
    so that the same run resumed from another working folder is the same run."""
    def named(spec: str | Path | None) -> str | None:
        return None if spec is None else str(Path(spec).resolve()) if Path(spec).exists() else str(spec)
    return {"model": named(model), "checkpoint": named(checkpoint), "pretrained": pretrained, "data": data,
            "data_root": named(data_root), "batch_size": batch_size, "aug": aug}


@user_errors
def prune(
    model: str = typer.Argument(..., help="Trained artifact directory, preset or timm ViT name."),
    data: str = DataOption,
    data_root: Path | None = DataRootOption,
    method: str = typer.Option(_defaults.method, help=f"One of: {', '.join(METHODS)}."),
    head_ratio: float = typer.Option(_defaults.head_ratio, help="Fraction of heads to remove, [0, 1)."),
    mlp_ratio: float = typer.Option(_defaults.mlp_ratio, help="Fraction of MLP neurons to remove, [0, 1)."),
    target: str = typer.Option(_defaults.target, help="head, mlp or both."),
    criteria: str = typer.Option(_defaults.criteria, help=f"Unit importance: {', '.join(vc.CRITERIA.names())}."),
    mode: str = typer.Option(_defaults.mode, help="layer-wise or global selection."),
    round_to: int = typer.Option(_defaults.round_to, help="Round kept MLP widths up to a multiple."),
    states: int = typer.Option(_defaults.states, help="Pruning states (one-shot spends them fine-tuning)."),
    epochs_per_state: int = typer.Option(_defaults.epochs_per_state, help="Training epochs per state."),
    finetune_epochs: int = typer.Option(_defaults.finetune_epochs, help="Fine-tuning epochs at the end."),
    lr: float = typer.Option(_defaults.lr, help="Peak learning rate: all passes share one warm-up + cosine schedule."),
    lambda_schedule: str = typer.Option(_defaults.lambda_schedule,
                                        help=f"RSST λ growth: {', '.join(LAMBDA_SCHEDULES.names())}."),
    lambda_max: float = typer.Option(_defaults.lambda_max, help="RSST λ cap."),
    lambda_base: float | None = typer.Option(None, help="RSST λ scale (default: λ reaches the cap half-way through each state)."),
    lambda_exponent: float = typer.Option(_defaults.lambda_exponent, help="k of exp_custom_exponents."),
    penalty: str = typer.Option(_defaults.penalty, help=f"RSST penalty: {', '.join(PENALTIES.names())} "
                                "(fade: decoupled, to --fade-to of the weights' size by each state's end)."),
    fade_to: float = typer.Option(_defaults.fade_to, help="What the fade penalty leaves of the faded weights, (0, 1)."),
    rewind: str = typer.Option(_defaults.rewind, help=f"Refill rewind: {', '.join(REWINDS)}."),
    dense_epochs: int = typer.Option(_defaults.dense_epochs, help="Dense epochs inside the loop (for rewind)."),
    distill: bool = typer.Option(False, "--distill", help="Distil from the dense model while training."),
    target_speedup: float | None = typer.Option(None, "--target-speedup", help="Prune to this measured speed-up "
                                                "instead of ratios (per-block structure from a latency table)."),
    latency_ms: float | None = typer.Option(None, "--latency-ms", help="Prune to this latency (ms per batch) instead "
                                            "of ratios."),
    deploy_batch: int = typer.Option(1, "--deploy-batch", help="Batch size the budget is for."),
    backend: str = typer.Option("ort-cpu", "--backend", help="Backend the budget is for (ort-cpu, torch, ...)."),
    threads: int = typer.Option(1, "--threads", help="Intra-op threads the budget is for."),
    block_removal: str = typer.Option(BudgetRequest.block_removal, "--block-removal",
                                      help="When the budget may remove whole blocks: last-resort (only when "
                                           "widths cannot meet it), free, never."),
    batch_size: int = typer.Option(64, help="Batch size."),
    seed: int = typer.Option(0, help="Seed (initial weights of a preset, data split, order, augmentation)."),
    precision: str = typer.Option("auto", help="auto, fp32, bf16 or fp16 (auto: bf16 where the hardware has it natively)."),
    compile_model: bool = typer.Option(False, "--compile", help="Train through torch.compile."),
    aug: str = AugOption,
    mixup: float = MixupOption,
    cutmix: float = CutmixOption,
    label_smoothing: float = LabelSmoothingOption,
    workers: int | None = WorkersOption,
    checkpoint: Path | None = typer.Option(None, help="Dense weights (.safetensors/.pth) for MODEL."),
    pretrained: bool = PretrainedOption,
    reset_classifier: bool = ResetClassifierOption,
    out: Path = typer.Option(..., "--out", help="Output folder (checkpoints, masks, pruned artifact)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last state."),
    wandb_project: str | None = typer.Option(None, "--wandb-project", help="Also log to wandb."),
    json_out: bool = JsonOption,
) -> None:
    """Prune heads and MLP neurons; writes masks, structure, metrics and the masked model.

    Example: vitcompact prune runs/dense --data digits --method rsst --head-ratio 0.3 --mlp-ratio 0.3 --out runs/rsst
    """
    config = PruneConfig(
        method=method, head_ratio=head_ratio, mlp_ratio=mlp_ratio, target=target, criteria=criteria,
        mode=mode, round_to=round_to, states=states, epochs_per_state=epochs_per_state,
        finetune_epochs=finetune_epochs, lr=lr, lambda_schedule=lambda_schedule, lambda_max=lambda_max,
        lambda_base=lambda_base, lambda_exponent=lambda_exponent,
        penalty=penalty, fade_to=fade_to, rewind=rewind, dense_epochs=dense_epochs, distill=distill,
        train=TrainConfig(precision=precision, compile=compile_model, mixup=mixup, cutmix=cutmix,
                          label_smoothing=label_smoothing, progress=not json_out),
        out_dir=out, resume=resume, seed=seed, wandb_project=wandb_project,
        inputs=run_inputs(model, checkpoint, data, data_root, batch_size, aug, pretrained))
    request = (BudgetRequest(target_speedup, latency_ms, deploy_batch, backend, threads, block_removal)
               if target_speedup is not None or latency_ms is not None else None)
    check_writable(out)
    if not resume and (out / "run.json").exists():
        raise vc.ConfigError(f"{out} already holds a pruning run; pass --resume or choose a new --out")
    m, bundle = vc.model_and_data(model, data, data_root, checkpoint=checkpoint, pretrained=pretrained,
                                  reset_classifier=reset_classifier, seed=seed, batch_size=batch_size, aug=aug,
                                  workers=workers)
    if request is not None:
        say = (lambda line: None) if json_out else (lambda line: console.print(line, markup=False))
        config = dataclasses.replace(config, latency_budget=request.budget(m, config.round_to, progress=say))
    dense = copy.deepcopy(m) if request is not None else None
    with output_folder.lock(out, enabled=distributed.is_main()):
        result = prune_model(m, bundle, config)
        if not distributed.is_main():  # under torchrun every rank holds the same masks; rank 0 writes
            return
        budget = None
        if request is not None:
            report = budget_report(dense, vc.compact(result.model, result.masks), result.structure,
                                   config.latency_budget, request)
            write_budget_report(report, out)
            budget = {k: report[k] for k in ("requested_speedup", "predicted", "measured")}
        vc.save(result.model, out, provenance={"stage": "prune", "data": data, "prune": config.to_dict(),
                                               "val": result.val, "test": result.test,
                                               "structure": result.structure.summary()})
    summary = {"out": str(out), "structure": result.structure.summary(), "val": result.val, "test": result.test,
               **({"latency_budget": budget} if budget is not None else {})}
    if json_out:
        print_json(summary)
        return
    if budget is not None:
        console.print(f"speed-up at batch {deploy_batch} ({backend}): requested {budget['requested_speedup']:.2f}x, "
                      f"predicted {budget['predicted']['speedup']:.2f}x, measured {budget['measured']['speedup']:.2f}x "
                      f"(see {out / 'latency_budget.md'})")
    console.print(f"{result.structure.summary()}  val top1 {result.val['top1']:.4f}  "
                  f"test top1 {result.test['top1']:.4f}  saved to {out}")
