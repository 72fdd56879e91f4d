"""Accuracy evidence: dense vs RSST vs Refill vs one-shot on Fashion-MNIST, same epoch budget.

Run: python -m vitcompact.bench.accuracy_fashion --out runs/accuracy_fashion
The dense model is trained once; each method prunes a copy of it to heads 0.3 / MLP 0.3 with
`states * epochs_per_state + finetune_epochs` epochs (one-shot spends them all fine-tuning), once
per pruning seed (the seed sets data order and augmentation). Writes `accuracy.json`,
`accuracy.md` and `accuracy.png` (test top-1; the test set is used only for this report).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import vitcompact as vc
from vitcompact.io import atomic_path, ensure_dir, write_json, write_text

LABELS = {"dense": "dense", "rsst": "RSST", "refill": "Refill", "oneshot": "one-shot"}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion-mnist", help="data source (digits makes a quick smoke run)")
    p.add_argument("--root", default=None, help="IDX folder (default: Debian's Fashion-MNIST path)")
    p.add_argument("--model", default="vit-fashion-tiny")
    p.add_argument("--patch-size", type=int, default=None,
                   help="override the preset's patch (7 gives 17 tokens instead of 50: a CPU budget)")
    p.add_argument("--limit", type=int, default=None, help="cap training pool and test set (CPU budget)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dense-epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of dense training")
    p.add_argument("--prune-lr", type=float, default=None, help="peak learning rate of the pruning budget (default: --lr)")
    p.add_argument("--head-ratio", type=float, default=0.3)
    p.add_argument("--mlp-ratio", type=float, default=0.3)
    p.add_argument("--states", type=int, default=2)
    p.add_argument("--epochs-per-state", type=int, default=1)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--lambda-schedule", default="x")
    p.add_argument("--lambda-max", type=float, default=1.0)
    p.add_argument("--lambda-base", type=float, default=None)
    p.add_argument("--lambda-exponent", type=float, default=4.0)
    p.add_argument("--methods", default="rsst,refill,oneshot")
    p.add_argument("--seeds", default="0", help="pruning seeds, comma-separated; the table shows their mean")
    p.add_argument("--out", type=Path, default=Path("runs/accuracy_fashion"))
    p.add_argument("--seed", type=int, default=0, help="seed of the data split and dense training")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    out = ensure_dir(args.out)
    model = vc.create_model(args.model, **({"patch_size": args.patch_size} if args.patch_size else {}))
    bundle = vc.load_data(args.data, root=args.root, img_size=int(model.patch_embed.img_size[0]),
                          in_chans=model.patch_embed.proj.in_channels, batch_size=args.batch_size,
                          seed=args.seed, limit=args.limit)
    started = time.perf_counter()
    vc.train(model, bundle, vc.TrainConfig(epochs=args.dense_epochs, lr=args.lr, seed=args.seed), description="dense")
    dense = vc.evaluate(model, bundle.test)["top1"]
    print(f"dense: test top1 {dense:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    budget = args.states * args.epochs_per_state + args.finetune_epochs
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in seeds:
        for method in methods:
            config = vc.PruneConfig(
                method=method, head_ratio=args.head_ratio, mlp_ratio=args.mlp_ratio, states=args.states,
                epochs_per_state=args.epochs_per_state, finetune_epochs=args.finetune_epochs,
                lr=args.prune_lr or args.lr, lambda_schedule=args.lambda_schedule, lambda_max=args.lambda_max,
                lambda_base=args.lambda_base, lambda_exponent=args.lambda_exponent, seed=seed,
                out_dir=out / f"{method}_seed{seed}")
            result = vc.prune(copy.deepcopy(model), bundle, config)
            runs[method].append({"seed": seed, "top1": result.test["top1"], "val_top1": result.val["top1"],
                                 "structure": result.structure.summary()})
            print(f"{method} seed {seed}: test top1 {result.test['top1']:.4f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    rows = [{"method": "dense", "epochs": args.dense_epochs, "top1": dense, "runs": []}]
    rows += [{"method": m, "epochs": budget, "top1": statistics.fmean(r["top1"] for r in runs[m]),
              "runs": runs[m], "structure": runs[m][0]["structure"]} for m in methods]
    means = {r["method"]: r["top1"] for r in rows}
    targets = {}
    if "rsst" in means:
        targets["rsst_within_1pt_of_dense"] = means["rsst"] >= dense - 0.01
        if "oneshot" in means:
            targets["rsst_not_below_oneshot"] = means["rsst"] >= means["oneshot"]
    report = {"data": args.data, "model": args.model, "patch_size": int(model.patch_embed.patch_size[0]),
              "train_images": len(bundle.train.dataset), "test_images": len(bundle.test.dataset),
              "dense_epochs": args.dense_epochs, "prune_epochs": budget, "seeds": seeds,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "seconds": time.perf_counter() - started, "rows": rows, "targets": targets}
    write_json(out / "accuracy.json", report)
    table = to_markdown(rows, seeds)
    write_text(out / "accuracy.md", table + "".join(f"\n{k}: {v}" for k, v in targets.items()) + "\n")
    plot(rows, out / "accuracy.png")
    print(table)
    for name, met in targets.items():
        print(f"{name}: {met}")
    return report


def to_markdown(rows: list[dict], seeds: list[int]) -> str:
    seed_cols = "".join(f" seed {s} |" for s in seeds)
    lines = [f"| method | epochs after dense | test top-1 (mean) |{seed_cols} structure |",
             "|---|---:|---:|" + "---:|" * len(seeds) + "---|"]
    for r in rows:
        per_seed = "".join(f" {100 * x['top1']:.2f} |" for x in r["runs"]) or " – |" * len(seeds)
        epochs = f"{r['epochs']} in all" if r["method"] == "dense" else str(r["epochs"])
        lines.append(f"| {LABELS.get(r['method'], r['method'])} | {epochs} | {100 * r['top1']:.2f} |"
                     f"{per_seed} {r.get('structure', 'dense')} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    """Bars of mean test top-1 per method, one dot per pruning seed, dense as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [r for r in rows if r["method"] != "dense"]
    dense = next(r["top1"] for r in rows if r["method"] == "dense")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    xs = range(len(methods))
    ax.bar(xs, [100 * r["top1"] for r in methods], color="#7aa6c2", width=0.6)
    for x, r in zip(xs, methods):
        ax.scatter([x] * len(r["runs"]), [100 * s["top1"] for s in r["runs"]], color="black", s=12, zorder=3)
    ax.axhline(100 * dense, color="#c0504d", linestyle="--", label=f"dense {100 * dense:.2f}")
    ax.axhline(100 * dense - 1, color="#c0504d", linestyle=":", label="dense − 1 pt")
    low = min([100 * s["top1"] for r in methods for s in r["runs"]] + [100 * dense - 1])
    ax.set_ylim(low - 2, 100 * dense + 2)
    ax.set_xticks(list(xs), [LABELS.get(r["method"], r["method"]) for r in methods])
    ax.set_ylabel("test top-1 (%)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)


if __name__ == "__main__":
    main()
