"""Data-loader images/s against model training images/s: is loading the bottleneck?

Run: PYTHONPATH=bench python -m studies.data_speed [--model vit-cifar-tiny] [--images 1000 | --data SOURCE --data-root DIR]
Without --data it writes a synthetic image folder of --images 224 px JPEGs (fixed seed) to a
temporary folder. The loader rate iterates the training loader as training does (decode, timm
transforms, `--workers` processes; the first batch of each pass is warm-up and not timed); the
training rate runs forward, backward and AdamW steps on synthetic batches of the model's input
size (on the CPU at the trainer's `auto` precision, on a GPU in fp32). Rounds of the two are interleaved so machine noise hits both alike; medians are reported.
On a CPU-only machine training and loading share the cores, so a real run is slower than either.
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import vitcompact as vc
from vitcompact.data.bundle import AUGMENTATIONS
from vitcompact.errors import ConfigError
from vitcompact.io import write_json
from vitcompact.training.trainer import autocast_dtype

from . import train_speed
from .image_folder import write_image_folder


def loader_rate(loader: DataLoader, batches: int) -> float:
    """Images/s of `batches` batches from `loader`, restarting it when a pass ends; the first
    batch of every pass (worker start-up) is not timed."""
    seen, elapsed, left = 0, 0.0, batches
    while left:
        it = iter(loader)
        if next(it, None) is None:
            break
        started, served = time.perf_counter(), 0
        for _, labels in itertools.islice(it, left):
            seen, served = seen + len(labels), served + 1
        elapsed += time.perf_counter() - started
        del it  # stops the pass's workers before anything else is timed
        if not served:
            break
        left -= served
    if not seen:
        raise ConfigError("the training loader has a single batch; use more images or a smaller --batch-size")
    return seen / elapsed


def _training_rate(net: torch.nn.Module, batch: list, dtype: torch.dtype | None, steps: int) -> float:
    """Images/s of `steps` optimiser steps on one synthetic batch, timed to the device's last kernel."""
    started = time.perf_counter()
    train_speed._rate(net, batch, dtype, steps)
    if batch[0][0].is_cuda:
        torch.cuda.synchronize()
    return steps * len(batch[0][1]) / (time.perf_counter() - started)


def measure(model: str, data: str, root: Path | None, batch_size: int, batches: int, rounds: int,
            workers: int | None, aug: str) -> dict:
    net, bundle = vc.model_and_data(model, data, root, batch_size=batch_size, workers=workers, aug=aug)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = net.to(device).train()
    # The trainer's `auto` precision where the step can autocast it (train_speed's step: CPU only).
    dtype = autocast_dtype("auto", device, net.embed_dim) if device.type == "cpu" else None
    generator = torch.Generator().manual_seed(0)
    batch = [(torch.randn(batch_size, *vc.input_size(net), generator=generator).to(device),
              torch.randint(0, net.num_classes, (batch_size,), generator=generator).to(device))]
    _training_rate(net, batch, dtype, 2)  # warm-up: allocator, AdamW state, kernels
    loader, training = [], []
    for _ in range(rounds):
        loader.append(loader_rate(bundle.train, batches))
        training.append(_training_rate(net, batch, dtype, batches))
    return {"model": model, "data": data, "input_size": list(vc.input_size(net)),
            "train_images": len(bundle.train.dataset), "workers": bundle.train.num_workers, "aug": aug,
            "batch_size": batch_size, "batches": batches, "rounds": rounds, "device": device.type,
            "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
            "loader_images_per_s": statistics.median(loader), "training_images_per_s": statistics.median(training),
            "loader_rounds": loader, "training_rounds": training}


def verdict(result: dict) -> str:
    ratio = result["loader_images_per_s"] / result["training_images_per_s"]
    if ratio < 1:
        return (f"loader / training {ratio:.2f}x: loading IS the bottleneck (the model waits for data; "
                "more --workers, a lighter --aug or smaller images help)")
    return f"loader / training {ratio:.2f}x: loading is not the bottleneck (the model sets the pace)"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit-cifar-tiny", help="preset, timm ViT name or artifact directory")
    p.add_argument("--data", default=None, help="data source (default: a synthetic image folder of --images JPEGs)")
    p.add_argument("--data-root", type=Path, default=None, help="the source's folder")
    p.add_argument("--images", type=int, default=1000, help="training images of the synthetic folder")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: the library's choice)")
    p.add_argument("--aug", default="light", choices=AUGMENTATIONS)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=30, help="batches (and optimiser steps) per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = p.parse_args(argv)
    options = dict(batch_size=args.batch_size, batches=args.batches, rounds=args.rounds, workers=args.workers,
                   aug=args.aug)
    if args.data is None:
        with tempfile.TemporaryDirectory(prefix="vitcompact-data-speed-") as tmp:
            root = write_image_folder(Path(tmp), args.images)
            result = measure(args.model, "imagefolder", root, **options)
        result["data"] = f"synthetic image folder ({args.images} JPEGs of 224 px)"
    else:
        result = measure(args.model, args.data, args.data_root, **options)
    result["ratio"] = result["loader_images_per_s"] / result["training_images_per_s"]
    print(f"model {result['model']} (input {'x'.join(map(str, result['input_size']))}), data {result['data']}, "
          f"{result['train_images']} training images, {result['workers']} workers, aug {result['aug']}, "
          f"batch {result['batch_size']}, {result['device']} {result['precision']}")
    print(f"loader    {result['loader_images_per_s']:8.0f} img/s  (median of {result['rounds']} rounds "
          f"of {result['batches']} batches)")
    print(f"training  {result['training_images_per_s']:8.0f} img/s  (forward + backward + AdamW, synthetic batches)")
    print(verdict(result), flush=True)
    if args.json is not None:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
