"""Budgeted vs uniform structures at equal measured latency: does the latency allocator keep more
accuracy than the same cut in every block?

Run: PYTHONPATH=bench python -m studies.budget_accuracy [--dense DIR] --out docs/budget-4000 (or
`make bench-budget-accuracy`). On the accuracy study's data (Fashion-MNIST, the first `--limit`
training images of the dense model's split), per pruning seed: the uniform layer-wise structure
at `--ratio` (every block loses the same share) is pruned, compacted and its onnxruntime CPU
speed-up over the dense model measured (interleaved, `--bench-batch`, `--threads`); then the same
method with the same epochs prunes to a latency budget of exactly that measured speed-up (the
allocator on the measured latency table), and its speed-up and test top-1 are measured the same
way. Without `--dense` a dense model is trained here on the pruning images. Writes
`budget_accuracy.json`, `.md` and `.png`. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
from pathlib import Path

import torch.nn as nn

import vitcompact as vc
from vitcompact.pruning.configs import IterativeConfig, same_budget
from vitcompact.io import ensure_dir, scratch, write_json, write_text
from vitcompact.training.seeding import seed_everything

from . import pareto
from vitcompact.latency import environment
from vitcompact.bench.harness import BenchConfig
from vitcompact.latency import BudgetRequest
from vitcompact.io import save_figure

SCHEMA = "vitcompact.budget_accuracy/1"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", type=Path, default=None, help="trained dense artifact (default: train one here)")
    p.add_argument("--model", default="vit-fashion-tiny")
    p.add_argument("--dense-epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of dense training here")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--root", default=None)
    p.add_argument("--limit", type=int, default=4000, help="training images of each run")
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="data split seed")
    p.add_argument("--seeds", default="0,1,2", help="pruning seeds")
    p.add_argument("--method", default=vc.OneShotConfig.method)
    p.add_argument("--ratio", type=float, default=0.5, help="uniform head and MLP ratio")
    p.add_argument("--round-to", type=int, default=1)
    p.add_argument("--states", type=int, default=IterativeConfig.states)
    p.add_argument("--epochs-per-state", type=int, default=IterativeConfig.epochs_per_state)
    p.add_argument("--finetune-epochs", type=int, default=IterativeConfig.finetune_epochs,
                   help="with --states and --epochs-per-state, the epoch budget (one-shot spends it all fine-tuning)")
    p.add_argument("--block-removal", default=BudgetRequest.block_removal,
                   help="when the allocator may remove whole blocks")
    p.add_argument("--bench-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bench-seconds", type=float, default=8.0)
    p.add_argument("--out", type=Path, default=Path("docs/budget-4000"))
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.root is None and args.data == "fashion-mnist":
        args.root = pareto.FASHION_ROOT
    # What pareto's helpers read.
    args.batch_size, args.val_fraction, args.shift, args.patch_size = 128, 0.1, None, None
    return args


def dense_and_data(args: argparse.Namespace) -> tuple[nn.Module, vc.DataBundle]:
    if args.dense is not None:
        model = vc.load(args.dense)
        return model, pareto.pruning_bundle(pareto.load_split(args, model), args)
    seed_everything(args.seed)
    model = vc.create_model(args.model)
    bundle = pareto.pruning_bundle(pareto.load_split(args, model), args)
    vc.train(model, bundle, vc.TrainConfig(epochs=args.dense_epochs, lr=args.lr, seed=args.seed, progress=False),
             description="dense")
    return model.cpu().eval(), bundle


def run(dense: nn.Module, bundle: vc.DataBundle, config: vc.PruneConfig, speedups: pareto.SpeedupCache,
        kind: str, seed: int) -> dict:
    result = vc.prune(copy.deepcopy(dense), bundle, config)
    compact = vc.compact(result.model, result.masks)
    measurement = speedups.measure(compact, result.structure)
    return {"kind": kind, "seed": seed, "test_top1": vc.evaluate(compact, bundle.test)["top1"],
            "val_top1": vc.evaluate(compact, bundle.val)["top1"], "measured_speedup": measurement["speedup"],
            "measurement": measurement["id"], "heads_per_block": measurement["heads_per_block"],
            "neurons_per_block": measurement["neurons_per_block"]}


def summarise(rows: list[dict]) -> dict:
    out = {}
    for kind in ("uniform", "budgeted"):
        acc = [r["test_top1"] for r in rows if r["kind"] == kind]
        speed = [r["measured_speedup"] for r in rows if r["kind"] == kind]
        out[kind] = {"test_top1_mean": statistics.mean(acc), "test_top1_min": min(acc), "test_top1_max": max(acc),
                     "speedup_mean": statistics.mean(speed)}
    out["budgeted_at_least_uniform"] = out["budgeted"]["test_top1_mean"] >= out["uniform"]["test_top1_mean"]
    return out


def to_markdown(report: dict) -> str:
    a = report["args"]
    lines = [f"# Budgeted vs uniform at equal measured latency ({a['method']}, {a['data']})", "",
             f"Uniform: layer-wise heads {a['ratio']} / MLP {a['ratio']}. Budgeted: the same method and epochs, "
             f"pruned to the uniform structure's measured speed-up ({report['target_speedup']:.3f}x, onnxruntime "
             f"CPU, batch {a['bench_batch']}, {a['threads']} thread(s); block removal "
             f"{a.get('block_removal', 'free')}). {a['limit']:,} training images; test "
             f"{report['test_images']:,} images.", "",
             "| seed | kind | val top-1 | test top-1 | measured speed-up | heads per block | MLP width per block |",
             "|---|---|---:|---:|---:|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['seed']} | {r['kind']} | {r['val_top1']:.4f} | {r['test_top1']:.4f} | "
                     f"{r['measured_speedup']:.3f}x | "
                     f"{r['heads_per_block']} | {r['neurons_per_block']} |")
    s = report["summary"]
    lines += ["", "| | mean val top-1 | mean test top-1 | min | max | mean speed-up |",
              "|---|---:|---:|---:|---:|---:|"]
    for kind in ("uniform", "budgeted"):
        k = s[kind]
        val = statistics.mean(r["val_top1"] for r in report["rows"] if r["kind"] == kind)
        lines.append(f"| {kind} | {val:.4f} | {k['test_top1_mean']:.4f} | {k['test_top1_min']:.4f} | "
                     f"{k['test_top1_max']:.4f} | {k['speedup_mean']:.3f}x |")
    lines += ["", f"Target (budgeted mean ≥ uniform mean): {'met' if s['budgeted_at_least_uniform'] else 'missed'}.",
              "", "![budget](budget_accuracy.png)", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for kind, colour in (("uniform", "tab:blue"), ("budgeted", "tab:red")):
        rows = [r for r in report["rows"] if r["kind"] == kind]
        ax.scatter([r["measured_speedup"] for r in rows], [100 * r["test_top1"] for r in rows], color=colour,
                   label=f"{kind} (seeds {', '.join(str(r['seed']) for r in rows)})")
    ax.axhline(100 * report["dense_test_top1"], color="grey", linestyle="--", label="dense")
    ax.set(xlabel="measured speed-up (onnxruntime CPU)", ylabel="test top-1 (%)",
           title="Budgeted vs uniform structure at equal latency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dense, bundle = dense_and_data(args)
    base = same_budget(args.method, args.states, args.epochs_per_state, args.finetune_epochs, head_ratio=args.ratio,
                       mlp_ratio=args.ratio, round_to=args.round_to, train=vc.TrainConfig(progress=False))
    bench = BenchConfig(batch_sizes=(args.bench_batch,), threads=args.threads, time_budget_s=args.bench_seconds)
    rows, target = [], None
    with scratch("vitcompact-budget-") as folder:
        speedups = pareto.SpeedupCache(dense, Path(folder), bench)
        for seed in args.seeds:
            uniform = run(dense, bundle, dataclasses.replace(base, seed=seed), speedups, "uniform", seed)
            rows.append(uniform)
            print(f"seed {seed} uniform: test {uniform['test_top1']:.4f}, {uniform['measured_speedup']:.3f}x, heads "
                  f"{uniform['heads_per_block']}, widths {uniform['neurons_per_block']}", flush=True)
            if target is None:  # the uniform structure (and so its latency) is the same for every seed
                target = uniform["measured_speedup"]
                request = BudgetRequest(target_speedup=target, deploy_batch=args.bench_batch, threads=args.threads,
                                        block_removal=args.block_removal)
            budgeted = run(dense, bundle, dataclasses.replace(base, seed=seed, budget=request), speedups,
                           "budgeted", seed)
            rows.append(budgeted)
            print(f"seed {seed} budgeted: test {budgeted['test_top1']:.4f}, {budgeted['measured_speedup']:.3f}x, heads "
                  f"{budgeted['heads_per_block']}, widths {budgeted['neurons_per_block']}", flush=True)
    report = {"schema": SCHEMA, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "target_speedup": target, "dense_test_top1": vc.evaluate(dense, bundle.test)["top1"],
              "test_images": len(bundle.test.dataset), "rows": rows, "summary": summarise(rows),
              "environment": environment({"backend": "ort-cpu", "threads": args.threads})}
    out = ensure_dir(args.out)
    write_json(out / "budget_accuracy.json", report)
    write_text(out / "budget_accuracy.md", to_markdown(report))
    plot(report, out / "budget_accuracy.png")
    print(to_markdown(report))
    return report


if __name__ == "__main__":
    main()
