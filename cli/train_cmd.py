"""`vitcompact train`: train a dense ViT (from scratch or a checkpoint) and save it as an artifact."""

from __future__ import annotations

from pathlib import Path

import typer

import vitcompact as vc
from vitcompact import output_folder
from vitcompact.training import MetricsLog, TrainConfig, distributed, evaluate, train as train_model

from .common import (DataOption, DataRootOption, JsonOption, check_writable, console, model_and_data,
                     print_json, user_errors)


@user_errors
def train(
    model: str = typer.Argument(..., help="Preset, timm ViT name or artifact directory."),
    data: str = DataOption,
    data_root: Path | None = DataRootOption,
    epochs: int = typer.Option(10, help="Training epochs."),
    lr: float = typer.Option(TrainConfig.lr, help="Peak learning rate (AdamW, cosine with warm-up)."),
    optimizer: str = typer.Option("adamw", help="adamw or sgd."),
    batch_size: int = typer.Option(64, help="Batch size."),
    seed: int = typer.Option(0, help="Seed (initial weights, data split, order, augmentation)."),
    precision: str = typer.Option("auto", help="auto, fp32, bf16 or fp16 (auto: bf16 where the hardware has it natively)."),
    compile_model: bool = typer.Option(False, "--compile", help="Train through torch.compile (worth it for long runs)."),
    checkpoint: Path | None = typer.Option(None, help="Start from these weights (.safetensors/.pth)."),
    out: Path = typer.Option(..., "--out", help="Output artifact directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the artifact in a non-empty --out."),
    json_out: bool = JsonOption,
) -> None:
    """Train a dense model and save it (the starting point of pruning).

    Example: vitcompact train vit-digits --data digits --epochs 10 --out runs/dense
    """
    config = TrainConfig(epochs=epochs, lr=lr, optimizer=optimizer, seed=seed, precision=precision,
                         compile=compile_model, progress=not json_out)
    check_writable(out)
    output_folder.claim(out, overwrite, inputs=(model, checkpoint, data_root))
    m, bundle = model_and_data(model, checkpoint, data, data_root, batch_size, seed)
    with output_folder.lock(out, enabled=distributed.is_main()):
        log = MetricsLog()
        result = train_model(m, bundle, config, on_epoch=log.write, description="train")
        test = evaluate(m, bundle.test)
        if not distributed.is_main():  # under torchrun rank 0 alone writes
            return
        vc.save(m, out, provenance={"stage": "train", "data": data, "train": config.to_dict(),
                                    "epochs": result.epochs, "val": result.val, "test": test})
        log.save(out / "metrics.jsonl")
    summary = {"out": str(out), "val": result.val, "test": test, "epochs": epochs}
    if json_out:
        print_json(summary)
        return
    console.print(f"val top1 {result.val['top1']:.4f}  test top1 {test['top1']:.4f}  saved to {out}")
