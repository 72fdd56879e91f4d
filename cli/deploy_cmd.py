"""`vitcompact deploy`: the fastest runtime and precision on this machine, within the accuracy guard."""

from __future__ import annotations

from pathlib import Path

import typer

import vitcompact as vc
from vitcompact import output_folder
from vitcompact.data import DATA_SOURCES
from vitcompact.export import DeployConfig, deploy

from .bench_cmd import parse_batch_sizes
from .common import DataRootOption, JsonOption, console, err_console, print_json, user_errors


@user_errors
def deploy_cmd(
    model: str = typer.Argument(..., help="Artifact directory, preset name or timm ViT name."),
    out: Path = typer.Argument(..., help="Folder to write the chosen model and deploy.md / deploy.json to."),
    data: str = typer.Option(..., "--data", help=f"Data source whose training split calibrates INT8 and whose "
                             f"validation split measures accuracy: {', '.join(DATA_SOURCES.names())}."),
    data_root: Path | None = DataRootOption,
    batch_sizes: str = typer.Option("1,8", help="Comma-separated batch sizes to time, e.g. 1,8."),
    threads: int | None = typer.Option(None, help="Threads of every runtime (default: all physical cores)."),
    max_accuracy_drop: float = typer.Option(DeployConfig.max_accuracy_drop, help="Refuse a candidate losing more "
                                            "validation top-1 points than onnxruntime FP32."),
    time_budget: float = typer.Option(DeployConfig.time_budget_s, help="Seconds per candidate, batch size and "
                                      "timing that cap the rounds."),
    seed: int = typer.Option(0, help="Seed of the validation split (the one the model was trained with)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty OUT."),
    json_out: bool = JsonOption,
) -> None:
    """Time every runtime and precision on this machine; write the fastest within the accuracy guard.

    The candidates: onnxruntime FP32 and static INT8, and OpenVINO f32, bf16 and INT8 where OpenVINO is
    installed. deploy.md and deploy.json hold the table of all of them, with the CPU named.

    Example: vitcompact deploy runs/demo/compact runs/deploy --data digits --batch-sizes 1,8 --threads 1
    """
    config = DeployConfig(batch_sizes=parse_batch_sizes(batch_sizes), threads=threads,
                          max_accuracy_drop=max_accuracy_drop, time_budget_s=time_budget)
    output_folder.claim(out, overwrite, inputs=(model, data_root))
    loaded = vc.create_model(model)
    bundle = vc.load_data_for(loaded, data, data_root, batch_size=64, seed=seed, aug="none")
    progress = None if json_out else (lambda line: err_console.print(line, markup=False))
    with output_folder.lock(out):
        output_folder.claim(out, overwrite, inputs=(model, data_root))  # again, as its only writer
        result = deploy(loaded, out, config, bundle, progress=progress)
    if json_out:
        print_json(result.to_dict())
        return
    console.print(result.to_markdown(), markup=False, soft_wrap=True)
    console.print(f"written: {', '.join(str(p) for p in result.files)}, {out / 'deploy.md'}, "
                  f"{out / 'deploy.json'}", markup=False)
