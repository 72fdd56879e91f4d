"""Training images/s of each speed option on this machine, measured in one run.

Run: PYTHONPATH=bench python -m studies.train_speed [--models vit-fashion-tiny:7,vit-digits]
Options: the data path (per-sample `__getitem__` + default collate, as a plain Dataset does, vs
the batched `__getitems__` path), fp32 vs bf16 autocast (bf16 only where the CPU or GPU has it
natively, unless `--force-bf16`), eager vs `torch.compile`, and the thread count. Each option
trains the same model on the same batches; rounds of every option are interleaved so machine
noise hits them alike, and the median round is reported. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import vitcompact as vc
from vitcompact.training.trainer import native_bf16


class PerSample(Dataset):
    """The same images served one sample at a time (what a Dataset without `__getitems__` costs)."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        return self.inner[i]


def _model(spec: str) -> torch.nn.Module:
    name, _, patch = spec.partition(":")
    torch.manual_seed(0)
    return vc.create_model(name, **({"patch_size": int(patch)} if patch else {}))


def _rate(model, loader, dtype, steps: int) -> float:
    """Images/s of `steps` optimiser steps (forward, backward, clip, AdamW) over `loader`."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seen, started = 0, time.perf_counter()
    it = iter(loader)
    for _ in range(steps):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += len(y)
    return seen / (time.perf_counter() - started)


def measure(spec: str, batch_size: int, steps: int, rounds: int, force_bf16: bool, threads: list[int]) -> list[dict]:
    model = _model(spec)
    in_chans, size, _ = vc.input_size(model)
    bundle = vc.load_data("digits" if size <= 8 else "fashion-mnist", img_size=size,
                          in_chans=in_chans, batch_size=batch_size,
                          limit=batch_size * (steps + 1) * 2)
    batched = bundle.train
    per_sample = DataLoader(PerSample(batched.dataset), batch_size=batch_size, shuffle=True)
    bf16 = force_bf16 or native_bf16(torch.device("cpu"))
    options = {"fp32 eager, per-sample loader": (model, per_sample, None),
               "fp32 eager, batched loader": (model, batched, None)}
    if bf16:
        options["bf16 eager, batched loader"] = (model, batched, torch.bfloat16)
    compiled = torch.compile(model)
    warm = {}
    for name, dtype in [("fp32 compiled, batched loader", None)] + (
            [("bf16 compiled, batched loader", torch.bfloat16)] if bf16 else []):
        started = time.perf_counter()
        _rate(compiled, batched, dtype, 2)
        warm[name] = time.perf_counter() - started
        options[name] = (compiled, batched, dtype)
    default_threads = torch.get_num_threads()
    rates: dict[tuple[str, int], list[float]] = {}
    for name, (m, loader, dtype) in options.items():
        _rate(m, loader, dtype, 2)
    for _ in range(rounds):
        for n in threads:
            torch.set_num_threads(n)
            for name, (m, loader, dtype) in options.items():
                rates.setdefault((name, n), []).append(_rate(m, loader, dtype, steps))
    torch.set_num_threads(default_threads)
    base = statistics.median(rates[("fp32 eager, per-sample loader", threads[-1])])
    rows = []
    for (name, n), values in rates.items():
        rate = statistics.median(values)
        rows.append({"model": spec, "option": name, "threads": n, "images_per_s": rate,
                     "vs_fp32_eager_per_sample": rate / base, "compile_warmup_s": warm.get(name)})
    if not bf16:
        rows.append({"model": spec, "option": "bf16", "skipped": "this CPU has no native bf16 (AVX-512 BF16 "
                     "or AMX); emulated bf16 runs many times slower than fp32"})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit-fashion-tiny:7,vit-digits", help="presets, NAME:PATCH to override the patch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="optimiser steps per round and option")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and all cores)")
    p.add_argument("--force-bf16", action="store_true", help="time bf16 even without native support")
    args = p.parse_args(argv)
    cores = torch.get_num_threads()
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
          f"{native_bf16(torch.device('cpu'))}, torch {torch.__version__}, {cores} threads by default")
    rows = []
    for spec in args.models.split(","):
        for row in measure(spec, args.batch_size, args.steps, args.rounds, args.force_bf16, threads):
            rows.append(row)
            if "skipped" in row:
                print(f"{row['model']:<20} {row['option']:<32} skipped: {row['skipped']}")
                continue
            warm = f"  (compile {row['compile_warmup_s']:.0f} s once)" if row["compile_warmup_s"] else ""
            print(f"{row['model']:<20} {row['option']:<32} threads {row['threads']}  "
                  f"{row['images_per_s']:8.0f} img/s  {row['vs_fp32_eager_per_sample']:.2f}x{warm}", flush=True)
    return rows


if __name__ == "__main__":
    main()
