"""Study: how many calibration images the refit needs (`--calib-images`), on two data sets.

    PYTHONPATH=bench .venv/bin/python -m studies.refit_calibration --dense runs/reference_fashion/dense \\
        --out docs/refit-calibration        (or `make bench-refit-calibration`)

Prunes the converged Fashion-MNIST reference with `RefitConfig` at its defaults but for
`calib_images` and the choice of units (activation scores, layer-wise: `EARLIER_SELECTION`, with
which this study was measured), at each head/MLP ratio and calibration count (the first N images
of the training split, unaugmented, labels unused; the split of docs/refit-fashion), and reports
validation and test top-1 and the seconds each run took. Then the same on digits (validation
only, as studies.refit: a 30-epoch vit-digits model per seed; its training split holds about
1,000 images, so its counts stop there). No training anywhere but the digits dense models: a
refit reads no random numbers, so one run per count. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

import vitcompact as vc
from vitcompact.io import ensure_dir, save_figure

from studies import pareto
from studies.cases import ints, write_study
from studies.refit import EARLIER_SELECTION, REFIT_QUIET, digits_dense

SCHEMA = "vitcompact.refit-calibration/1"


def refit_run(dense: torch.nn.Module, bundle: vc.DataBundle, ratio: tuple[float, float], images: int,
              test: bool) -> dict:
    config = vc.RefitConfig(head_ratio=ratio[0], mlp_ratio=ratio[1], calib_images=images, train=REFIT_QUIET,
                            **EARLIER_SELECTION)
    started = time.perf_counter()
    result = vc.prune(copy.deepcopy(dense), bundle, config)
    seconds = time.perf_counter() - started
    row = {"ratio": pareto.ratio_text(ratio), "images": min(images, len(bundle.train.dataset)),
           "val_top1": result.val["top1"], "seconds": seconds}
    if test:
        row["test_top1"] = vc.evaluate(result.model, bundle.test)["top1"]
    return row


def fashion_rows(args: argparse.Namespace) -> tuple[list[dict], dict]:
    study = pareto.parse_args(["--dense", str(args.dense), "--shift", "0", "--limit", str(max(args.counts))])
    dense, split = pareto.dense_model(study)
    bundle = pareto.pruning_bundle(split, study)
    reference = {"val_top1": vc.evaluate(dense, bundle.val)["top1"], "test_top1": vc.evaluate(dense, bundle.test)["top1"]}
    rows = []
    for ratio in args.ratios:
        for n in args.counts:
            row = {"data": "fashion-mnist", **refit_run(dense, bundle, ratio, n, test=True)}
            rows.append(row)
            print(f"fashion-mnist {row['ratio']} {n:>6} images: val {100 * row['val_top1']:.2f} "
                  f"test {100 * row['test_top1']:.2f} ({row['seconds']:.0f} s)", flush=True)
    return rows, reference


def digits_rows(args: argparse.Namespace) -> tuple[list[dict], dict]:
    rows, dense_val = [], []
    for seed in args.digits_seeds:
        dense, data = digits_dense(seed, args.digits_epochs)
        dense_val.append(vc.evaluate(dense, data.val)["top1"])
        for ratio in args.ratios:
            for n in args.digits_counts:
                row = {"data": "digits", "seed": seed, **refit_run(dense, data, ratio, n, test=False)}
                rows.append(row)
                print(f"digits seed {seed} {row['ratio']} {row['images']:>5} images: val "
                      f"{100 * row['val_top1']:.2f}", flush=True)
    return rows, {"val_top1": statistics.fmean(dense_val)}


def curves(rows: list[dict], data: str, key: str) -> dict[str, dict[int, float]]:
    """Per ratio: calibration images -> the mean of `key` over seeds."""
    out: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        if r["data"] == data and key in r:
            out.setdefault(r["ratio"], {}).setdefault(r["images"], []).append(r[key])
    return {ratio: {n: statistics.fmean(v) for n, v in sorted(by.items())} for ratio, by in out.items()}


def to_markdown(report: dict) -> str:
    lines = []
    for data, keys, note in (("fashion-mnist", ("val_top1", "test_top1"), "validation / test"),
                             ("digits", ("val_top1",), "validation, mean over seeds")):
        table = {key: curves(report["rows"], data, key) for key in keys}
        ratios = list(table[keys[0]])
        if not ratios:
            continue
        dense = " / ".join(f"{100 * report['dense'][data][k]:.2f}" for k in keys)
        lines += [f"{data}: top-1 (%), {note}; dense {dense}.", "",
                  "| calibration images | " + " | ".join(ratios) + " |", "|---:|" + "---:|" * len(ratios)]
        for n in table[keys[0]][ratios[0]]:
            cells = [" / ".join(f"{100 * table[k][r][n]:.2f}" for k in keys) for r in ratios]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("fashion-mnist", "test_top1", "Fashion-MNIST reference (test)"), ("digits", "val_top1", "digits (validation)")]
    panels = [p for p in panels if curves(report["rows"], p[0], p[1])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (data, key, title) in zip(axes[0], panels):
        for ratio, curve in curves(report["rows"], data, key).items():
            ax.plot(list(curve), [100 * v for v in curve.values()], marker="o", label=f"heads/MLP {ratio}")
        ax.axhline(100 * report["dense"][data][key], color="grey", linestyle="--", label="dense")
        ax.set(xscale="log", xlabel="calibration images", ylabel="top-1 (%)", title=title)
        ax.legend(fontsize=7)
    fig.suptitle("refit without training: accuracy against calibration images")
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", type=Path, default=Path("runs/reference_fashion/dense"))
    p.add_argument("--counts", type=ints, default=ints("128,256,512,1024,2048,4000,8000,16000"))
    p.add_argument("--ratios", type=pareto.parse_ratios, default=pareto.parse_ratios("0.3/0.3,0.5/0.5,0.7/0.7"))
    p.add_argument("--digits-counts", type=ints, default=ints("64,128,256,512,1024"))
    p.add_argument("--digits-seeds", type=ints, default=ints("0,1,2"))
    p.add_argument("--digits-epochs", type=int, default=30)
    p.add_argument("--skip-fashion", action="store_true", help="digits only (no Fashion-MNIST reference needed)")
    p.add_argument("--out", type=Path, default=Path("runs/refit-calibration"))
    args = p.parse_args(argv)
    started = time.perf_counter()
    rows, dense = [], {}
    if not args.skip_fashion:
        fashion, dense["fashion-mnist"] = fashion_rows(args)
        rows += fashion
    digits, dense["digits"] = digits_rows(args)
    rows += digits
    report = {"schema": SCHEMA, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "dense": dense,
              "seconds": time.perf_counter() - started}
    print(to_markdown(report))
    return write_study(ensure_dir(args.out), "refit-calibration", report, torch.get_num_threads(), to_markdown, plot,
                       backend="torch-cpu")


if __name__ == "__main__":
    main()
