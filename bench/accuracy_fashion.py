"""Accuracy evidence: dense vs RSST vs Refill vs one-shot on Fashion-MNIST, same epoch budget.

Run: python -m vitcompact.bench.accuracy_fashion --out runs/accuracy_fashion
The dense model is trained once; each method prunes a copy of it to heads 0.3 / MLP 0.3 with
`states * epochs_per_state + finetune_epochs` epochs (one-shot spends them all fine-tuning).
Writes `accuracy.json` and `accuracy.md` (test top-1; the test set is used only for this report).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import vitcompact as vc
from vitcompact.io import ensure_dir, write_json, write_text


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="Fashion-MNIST IDX folder (default: Debian's path)")
    p.add_argument("--model", default="vit-fashion-tiny")
    p.add_argument("--patch-size", type=int, default=None,
                   help="override the preset's patch (7 gives 17 tokens instead of 50: a CPU budget)")
    p.add_argument("--limit", type=int, default=None, help="cap training pool and test set (CPU budget)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dense-epochs", type=int, default=10)
    p.add_argument("--states", type=int, default=2)
    p.add_argument("--epochs-per-state", type=int, default=1)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--methods", default="rsst,refill,oneshot")
    p.add_argument("--out", type=Path, default=Path("runs/accuracy_fashion"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = ensure_dir(args.out)
    model = vc.create_model(args.model, **({"patch_size": args.patch_size} if args.patch_size else {}))
    bundle = vc.load_data("fashion-mnist", root=args.root, img_size=int(model.patch_embed.img_size[0]),
                          in_chans=model.patch_embed.proj.in_channels, batch_size=args.batch_size,
                          seed=args.seed, limit=args.limit)
    started = time.perf_counter()
    vc.train(model, bundle, vc.TrainConfig(epochs=args.dense_epochs, lr=args.lr, seed=args.seed), description="dense")
    rows = [{"method": "dense", "epochs": args.dense_epochs, **_row(vc.evaluate(model, bundle.test))}]
    print(f"dense: test top1 {rows[0]['top1']:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    budget = args.states * args.epochs_per_state + args.finetune_epochs
    for method in args.methods.split(","):
        config = vc.PruneConfig(method=method, head_ratio=0.3, mlp_ratio=0.3, states=args.states,
                                epochs_per_state=args.epochs_per_state, finetune_epochs=args.finetune_epochs,
                                lr=args.lr, seed=args.seed, out_dir=out / method)
        result = vc.prune(copy.deepcopy(model), bundle, config)
        rows.append({"method": method, "epochs": budget, **_row(result.test),
                     "structure": result.structure.summary()})
        print(f"{method}: test top1 {result.test['top1']:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    report = {"model": args.model, "patch_size": int(model.patch_embed.patch_size[0]), "train_images": len(bundle.train.dataset), "test_images": len(bundle.test.dataset),
              "dense_epochs": args.dense_epochs, "prune_epochs": budget, "seconds": time.perf_counter() - started,
              "rows": rows}
    write_json(out / "accuracy.json", report)
    lines = ["| method | epochs after dense | test top-1 | structure |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['epochs']} | {100 * r['top1']:.2f} | {r.get('structure', 'dense')} |" for r in rows]
    write_text(out / "accuracy.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


def _row(metrics: dict) -> dict:
    return {"top1": metrics["top1"], "top5": metrics.get("top5")}


if __name__ == "__main__":
    main()
