"""`vitcompact train`: train a dense ViT (from scratch or a checkpoint) and save it as an artifact."""

from __future__ import annotations

from pathlib import Path

import typer

import vitcompact as vc
from vitcompact import output_folder
from vitcompact.training import MetricsLog, TrainConfig, distributed, evaluate, train as train_model

from .common import (AugOption, CutmixOption, DataOption, DataRootOption, JsonOption, LabelSmoothingOption,
                     MixupOption, PretrainedOption, ResetClassifierOption, WorkersOption, check_writable, console,
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
    aug: str = AugOption,
    mixup: float = MixupOption,
    cutmix: float = CutmixOption,
    label_smoothing: float = LabelSmoothingOption,
    workers: int | None = WorkersOption,
    checkpoint: Path | None = typer.Option(None, help="Start from these weights (.safetensors/.pth; a timm "
                                           "checkpoint's classifier is reset when the data has another class count)."),
    pretrained: bool = PretrainedOption,
    reset_classifier: bool = ResetClassifierOption,
    out: Path = typer.Option(..., "--out", help="Output artifact directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the artifact in a non-empty --out."),
    json_out: bool = JsonOption,
) -> None:
    """Train a dense model and save it (the starting point of pruning).

    Example: vitcompact train vit-digits --data digits --epochs 10 --out runs/dense
    """
    config = TrainConfig(epochs=epochs, lr=lr, optimizer=optimizer, seed=seed, precision=precision,
                         compile=compile_model, mixup=mixup, cutmix=cutmix, label_smoothing=label_smoothing,
                         progress=not json_out)
    check_writable(out)
    output_folder.claim(out, overwrite, inputs=(model, checkpoint, data_root))
    m, bundle = vc.model_and_data(model, data, data_root, checkpoint=checkpoint, pretrained=pretrained,
                                  reset_classifier=reset_classifier, seed=seed, batch_size=batch_size, aug=aug,
                                  workers=workers)
    with output_folder.lock(out, enabled=distributed.is_main()):
        log = MetricsLog()
        result = train_model(m, bundle, config, on_epoch=log.write, description="train")
        test = evaluate(m, bundle.test)
        if not distributed.is_main():  # under torchrun rank 0 alone writes
            return
        vc.save(m, out, provenance={"stage": "train", "data": data, "aug": aug, "train": config.to_dict(),
                                    "epochs": result.epochs, "val": result.val, "test": test})
        log.save(out / "metrics.jsonl")
    summary = {"out": str(out), "val": result.val, "test": test, "epochs": epochs}
    if json_out:
        print_json(summary)
        return
    console.print(f"val top1 {result.val['top1']:.4f}  test top1 {test['top1']:.4f}  saved to {out}")
