"""`vitcompact train`: train a dense ViT (from scratch or a checkpoint) and save it as an artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

import vitcompact as vc
from vitcompact import output_folder
from vitcompact.training import MetricsLog, TrainConfig, distributed, evaluate, train as train_model

from .common import (AugOption, DataOption, DataRootOption, JsonOption, PretrainedOption, ResetClassifierOption,
                     WorkersOption, check_writable, console, print_json, user_errors)
from .options import Fields, config_options, split


@user_errors
@config_options(Fields(TrainConfig, "train.", exclude=("progress",)))
def train(
    model: str = typer.Argument(..., help="Preset, timm ViT name or artifact directory."),
    data: str = DataOption,
    data_root: Path | None = DataRootOption,
    batch_size: int = typer.Option(64, help="Batch size."),
    aug: str = AugOption,
    workers: int | None = WorkersOption,
    checkpoint: Path | None = typer.Option(None, help="Start from these weights (.safetensors/.pth; a timm "
                                           "checkpoint's classifier is reset when the data has another class count)."),
    pretrained: bool = PretrainedOption,
    reset_classifier: bool = ResetClassifierOption,
    out: Path = typer.Option(..., "--out", help="Output artifact directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the artifact in a non-empty --out."),
    json_out: bool = JsonOption,
    given: dict[str, Any] | None = None,
) -> None:
    """Train a dense model and save it (the starting point of pruning).

    Example: vitcompact train vit-digits --data digits --epochs 10 --out runs/dense
    """
    config = TrainConfig(progress=not json_out, **split(given or {}, "train."))
    seed, epochs = config.seed, config.epochs
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
