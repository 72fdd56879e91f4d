"""Which RSST change helps: validation top-1 of pruning variants from one dense model, over seeds.

Run: PYTHONPATH=bench python -m studies.rsst_ablation --data digits --ratios 0.3/0.3,0.5/0.5,0.7/0.7
Trains the dense model once (or loads `--dense`), then prunes a copy with each variant at each
head/MLP ratio and seed, all with the same epoch budget, and reports *validation* top-1 (the test
set is not read: this is where defaults are chosen). Variants are method config fields; the
built-in list compares the gradient penalty with the decoupled fade, the state split of the
budget, the learning rate and distillation, against one-shot. Writes `ablation.json` and
`ablation.md`. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import vitcompact as vc
from vitcompact.pruning.configs import same_budget
from vitcompact.io import ensure_dir, write_json, write_text
from vitcompact.training.seeding import seed_everything

BUDGET_SPLIT_3 = {"states": 3, "epochs_per_state": 2, "finetune_epochs": 2}
BUDGET_SPLIT_2 = {"states": 2, "epochs_per_state": 2, "finetune_epochs": 4}
BUDGET_SPLIT_1x2 = {"states": 1, "epochs_per_state": 2, "finetune_epochs": 6}
BUDGET_SPLIT_2x1 = {"states": 2, "epochs_per_state": 1, "finetune_epochs": 6}
BUDGET_SPLIT_1x1 = {"states": 1, "epochs_per_state": 1, "finetune_epochs": 7}
VARIANTS: dict[str, dict] = {
    "one-shot": {"method": "oneshot"},
    "RSST gradient 3x2+2": {"method": "rsst", "penalty": "gradient", **BUDGET_SPLIT_3},
    "RSST fade 3x2+2": {"method": "rsst", "penalty": "fade", **BUDGET_SPLIT_3},
    "RSST fade 2x2+4": {"method": "rsst", "penalty": "fade", **BUDGET_SPLIT_2},
    "RSST fade to 0.1 2x2+4": {"method": "rsst", "penalty": "fade", "fade_to": 0.1, **BUDGET_SPLIT_2},
    "RSST fade 2x2+4 lr 5e-4": {"method": "rsst", "penalty": "fade", "lr": 5e-4, **BUDGET_SPLIT_2},
    "Refill 2x2+4": {"method": "refill", **BUDGET_SPLIT_2},
    "one-shot distilled": {"method": "oneshot", "distill": True},
    "RSST fade 2x2+4 distilled": {"method": "rsst", "penalty": "fade", "distill": True, **BUDGET_SPLIT_2},
    "RSST fade 1x2+6": {"method": "rsst", "penalty": "fade", **BUDGET_SPLIT_1x2},
    "RSST fade 2x1+6": {"method": "rsst", "penalty": "fade", **BUDGET_SPLIT_2x1},
    "RSST fade 1x1+7": {"method": "rsst", "penalty": "fade", **BUDGET_SPLIT_1x1},
}


def variant_config(variant: dict, **fields) -> vc.PruneConfig:
    """A variant's method config: its split of the 8-epoch budget (one-shot spends it fine-tuning)."""
    variant = dict(variant)
    method = variant.pop("method", vc.OneShotConfig.method)
    split = [variant.pop(k, None) for k in ("states", "epochs_per_state", "finetune_epochs")]
    return same_budget(method, *split, **variant, **fields)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits")
    p.add_argument("--root", default=None)
    p.add_argument("--dense", type=Path, default=None, help="trained dense artifact (default: train one here)")
    p.add_argument("--model", default="vit-digits")
    p.add_argument("--dense-epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-3, help="dense training's peak learning rate")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--shift", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--ratios", default="0.3/0.3,0.5/0.5,0.7/0.7")
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--variants", default=",".join(VARIANTS), help="names from the built-in list, comma-separated")
    p.add_argument("--overrides", default=None, help='extra variants as JSON: {"name": {"method": ..., config fields}}')
    p.add_argument("--out", type=Path, default=Path("runs/rsst_ablation"))
    return p.parse_args(argv)


def dense_and_data(args: argparse.Namespace):
    seed_everything(0)
    model = vc.load(args.dense) if args.dense else vc.create_model(args.model)
    c, h, _ = vc.input_size(model)
    bundle = vc.load_data(args.data, root=args.root, img_size=h, in_chans=c, batch_size=args.batch_size,
                          limit=args.limit, shift=args.shift)
    if not args.dense:
        vc.train(model, bundle, vc.TrainConfig(epochs=args.dense_epochs, lr=args.lr, progress=False))
    return model, bundle


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    variants = {name: VARIANTS[name] for name in args.variants.split(",") if name}
    variants.update(json.loads(args.overrides) if args.overrides else {})
    seeds = [int(s) for s in args.seeds.split(",")]
    dense, bundle = dense_and_data(args)
    dense_val = vc.evaluate(dense, bundle.val)["top1"]
    print(f"dense: val top1 {dense_val:.4f} on {len(bundle.val.dataset)} images", flush=True)
    quiet = vc.TrainConfig(progress=False)
    rows = []
    for ratio in args.ratios.split(","):
        head, mlp = (float(v) for v in ratio.split("/"))
        for name, fields in variants.items():
            started = time.perf_counter()
            vals = []
            for seed in seeds:
                config = variant_config(fields, head_ratio=head, mlp_ratio=mlp, seed=seed, train=quiet)
                vals.append(vc.prune(copy.deepcopy(dense), bundle, config).val["top1"])
            rows.append({"ratio": ratio, "variant": name, "config": fields, "val_top1": vals,
                         "mean": statistics.fmean(vals)})
            print(f"{ratio} {name:<32} val {' '.join(f'{100 * v:.2f}' for v in vals)}  mean "
                  f"{100 * rows[-1]['mean']:.2f}  ({time.perf_counter() - started:.0f} s)", flush=True)
    lines = [f"Validation top-1 (%), dense {100 * dense_val:.2f}, seeds {', '.join(map(str, seeds))}:", "",
             "| ratio | variant | mean | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|---:|" + "---:|" * len(seeds)]
    lines += [f"| {r['ratio']} | {r['variant']} | {100 * r['mean']:.2f} | "
              + " | ".join(f"{100 * v:.2f}" for v in r["val_top1"]) + " |" for r in rows]
    out = ensure_dir(args.out)
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "dense_val_top1": dense_val, "rows": rows}
    write_json(out / "ablation.json", report)
    write_text(out / "ablation.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
