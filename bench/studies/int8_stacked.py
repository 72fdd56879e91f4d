"""Stacked deployment: compaction plus INT8, against the dense FP32 model (a benchmark, not a test).

Run: PYTHONPATH=bench python -m studies.int8_stacked --out docs/int8 (or `make bench-int8`).

Speed: for `vit_small_patch16_224` at batch 8 and `vit-cifar-tiny` at batch 1 (random weights;
a third of the heads and 30 % of the neurons removed per block), the compact model in FP32, with
dynamic INT8 and with static INT8 (scopes "linear" and "all") is timed against the dense FP32
ONNX, onnxruntime CPU, one thread, each pair interleaved in one run. Static INT8 calibrates on
Fashion-MNIST images resized to the model's input (the timing does not depend on what they show).

Accuracy: a trained dense model (`--dense`, default the Fashion-MNIST reference) is pruned one-shot
to the same ratios and fine-tuned on `--limit` training images, compacted, and exported; each INT8
variant (dynamic; static with each calibration method and scope) is measured on the validation
and test splits beside the FP32 compact file, and timed against the dense FP32 ONNX at batch 8.
The defaults of `Int8Config` are chosen from these validation numbers. Writes int8.json, int8.md
and int8.png.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
from pathlib import Path

import torch.nn as nn

import vitcompact as vc
from vitcompact.export import Int8Config, to_int8
from vitcompact.io import ensure_dir, save_figure, scratch

from .cases import RESEARCH, calibration_data, compact_model, dense_model, describe, time_pair, write_study
from .pareto import FASHION_ROOT, Point, export_quiet, first, prune_with_training

SCHEMA = "vitcompact.int8/1"
SPEED_CASES = (("vit_small_patch16_224", 8), ("vit-cifar-tiny", 1))
# Random weights: accuracy means nothing in the speed cases, so nothing is refused for it.
UNGUARDED = {"max_accuracy_drop": None}
SPEED_VARIANTS = {"int8 dynamic": Int8Config(mode="dynamic", **UNGUARDED),
                  "int8 static linear": Int8Config(mode="static", scope="linear", **UNGUARDED),
                  "int8 static linear, FP32 ends": Int8Config(mode="static", fp32_ends=True, **UNGUARDED),
                  "int8 static all": Int8Config(mode="static", scope="all", **UNGUARDED)}


def accuracy_variants() -> dict[str, Int8Config]:
    variants = {"int8 dynamic": Int8Config(mode="dynamic", **UNGUARDED)}
    for scope in ("linear", "all"):
        for method in ("minmax", "entropy", "percentile"):
            variants[f"int8 static {scope} {method}"] = Int8Config(mode="static", scope=scope, calibration=method,
                                                                    **UNGUARDED)
    variants["int8 static linear minmax, FP32 ends"] = Int8Config(mode="static", fp32_ends=True, **UNGUARDED)
    return variants


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", type=Path, default=Path("runs/reference_fashion/dense"),
                   help="trained dense artifact for the accuracy part (skipped if missing)")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--root", default=FASHION_ROOT)
    p.add_argument("--seed", type=int, default=0, help="the dense model's data split seed")
    p.add_argument("--limit", type=int, default=4000, help="training images of the one-shot fine-tuning")
    p.add_argument("--finetune-epochs", type=int, default=None, help="default: PruneConfig's")
    p.add_argument("--calib-images", type=int, default=512, help="images loaded to calibrate the speed cases")
    p.add_argument("--round-to", type=int, default=16, help="MLP widths of the speed cases, a multiple of")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seconds", type=float, default=20.0, help="timing budget per pair")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--out", type=Path, default=Path("docs/int8"))
    args = p.parse_args(argv)
    if args.skip_speed and (args.skip_accuracy or not args.dense.is_dir()):
        p.error("nothing to measure: --skip-speed, and " + ("--skip-accuracy" if args.skip_accuracy else
                                                            f"no dense reference at {args.dense}"))
    return args


def speed_case(name: str, batch: int, args: argparse.Namespace, folder: Path) -> dict:
    dense = dense_model(name)
    compact = compact_model(dense, RESEARCH, args.round_to)
    data = calibration_data(dense, args.data, args.root, args.calib_images)
    dense_onnx = export_quiet(dense, folder / f"{name}-dense.onnx")
    compact_onnx = export_quiet(compact, folder / f"{name}-compact.onnx")
    files = {"compact fp32": compact_onnx}
    for label, config in SPEED_VARIANTS.items():
        with contextlib.redirect_stdout(io.StringIO()):
            files[label] = to_int8(compact_onnx, folder / f"{name}-{label.replace(' ', '-')}.onnx", config,
                                   data=data if config.mode == "static" else None, verify=False).path
    rows = []
    for label, path in files.items():
        row = {"variant": label, **time_pair(dense_onnx, path, batch, args.threads, args.seconds)}
        rows.append(row)
        print(f"{name} batch {batch}: {label:20} {row['p50_ms']:8.2f} ms, {row['speedup']:.2f}x "
              f"[{row['speedup_low']:.2f}, {row['speedup_high']:.2f}] vs dense fp32 {row['dense_p50_ms']:.2f} ms",
              flush=True)
    return {"model": name, "batch": batch, "dense": describe(dense), "compact": describe(compact),
            "ideal_speedup": vc.count(dense).macs / vc.count(compact).macs, "rows": rows}


def trained_compact(args: argparse.Namespace) -> tuple[nn.Module, nn.Module, vc.DataBundle]:
    dense = vc.load(args.dense).eval()
    c, h, _ = vc.input_size(dense)
    split = vc.load_data(args.data, root=args.root, img_size=h, in_chans=c, batch_size=128, seed=args.seed)
    bundle = vc.DataBundle(first(split.train, args.limit, True), split.val, split.test, split.num_classes,
                           split.mean, split.std, split.class_names, split.source)
    point = Point("oneshot", RESEARCH.head_ratio, RESEARCH.mlp_ratio)
    overrides = argparse.Namespace(**{k: None for k in ("states", "epochs_per_state", "prune_lr", "lambda_schedule",
                                                        "lambda_max", "lambda_base", "lambda_exponent")},
                                   finetune_epochs=args.finetune_epochs)
    model, masks = prune_with_training(dense, bundle, point, args.seed, overrides)
    return dense, vc.compact(model, masks).eval(), split


def accuracy_case(args: argparse.Namespace, folder: Path) -> dict:
    started = time.perf_counter()
    dense, compact, split = trained_compact(args)
    dense_onnx = export_quiet(dense, folder / "trained-dense.onnx")
    compact_onnx = export_quiet(compact, folder / "trained-compact.onnx")
    rows = []
    fp32_row = None
    for label, config in accuracy_variants().items():
        with contextlib.redirect_stdout(io.StringIO()):
            result = to_int8(compact_onnx, folder / f"trained-{label.replace(' ', '-')}.onnx", config,
                             data=split, verify=False)
        acc = result.int8["accuracy"]
        if fp32_row is None:
            fp32_row = {"variant": "compact fp32", "val_top1": acc["val"]["fp32"], "test_top1": acc["test"]["fp32"],
                        **time_pair(dense_onnx, compact_onnx, 8, args.threads, args.seconds)}
            rows.append(fp32_row)
        row = {"variant": label, "val_top1": acc["val"]["int8"], "test_top1": acc["test"]["int8"],
               "val_drop_points": acc["val"]["drop_points"], "test_drop_points": acc["test"]["drop_points"],
               **time_pair(dense_onnx, result.path, 8, args.threads, args.seconds)}
        rows.append(row)
        print(f"trained {args.data}: {label:30} val {row['val_top1']:.4f} ({-row['val_drop_points']:+.2f}) "
              f"test {row['test_top1']:.4f} ({-row['test_drop_points']:+.2f}) {row['speedup']:.2f}x at batch 8",
              flush=True)
    dense_test = vc.evaluate(dense, split.test)["top1"]
    return {"dense": str(args.dense), "data": args.data, "dense_test_top1": dense_test,
            "structure": describe(compact), "limit": args.limit, "rows": rows,
            "seconds": round(time.perf_counter() - started, 1)}


def to_markdown(report: dict) -> str:
    lines = ["# Stacked INT8: compaction plus INT8 against the dense FP32 model", "",
             f"onnxruntime {report['environment'].get('onnxruntime')} CPU, {report['threads']} thread, "
             f"{report['environment'].get('cpu_capability', '')}; each row timed interleaved with the dense "
             "FP32 ONNX in one run (median ratio with its 95% interval).", ""]
    for case in report["speed"]:
        lines += [f"## {case['model']}, batch {case['batch']} (dense {case['dense']}, compact {case['compact']}, "
                  f"ideal {case['ideal_speedup']:.2f}x)", "", "| variant | p50 ms | speed-up vs dense FP32 |",
                  "|---|---:|---:|"]
        lines += [f"| {r['variant']} | {r['p50_ms']:.2f} | {r['speedup']:.2f}x [{r['speedup_low']:.2f}, "
                  f"{r['speedup_high']:.2f}] |" for r in case["rows"]]
        lines.append("")
    acc = report.get("accuracy")
    if acc:
        lines += [f"## Accuracy on {acc['data']} (dense test top-1 {acc['dense_test_top1']:.4f}; one-shot to "
                  f"{acc['structure']}, fine-tuned on {acc['limit']} images)", "",
                  "| variant | val top-1 | test top-1 | test Δ vs FP32 compact (points) | speed-up at batch 8 |",
                  "|---|---:|---:|---:|---:|"]
        for r in acc["rows"]:
            delta = "" if "test_drop_points" not in r else f"{-r['test_drop_points']:+.2f}"
            lines.append(f"| {r['variant']} | {r['val_top1']:.4f} | {r['test_top1']:.4f} | {delta} | "
                         f"{r['speedup']:.2f}x |")
        lines.append("")
    lines += ["![speed-ups](int8.png)", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(f"{c['model']} b{c['batch']}", c["rows"], c["ideal_speedup"]) for c in report["speed"]]
    if report.get("accuracy"):
        panels.append(("trained, b8", report["accuracy"]["rows"], None))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, rows, ideal) in zip(axes[0], panels):
        ax.barh([r["variant"] for r in rows], [r["speedup"] for r in rows], color="#4f81bd")
        if ideal:
            ax.axvline(ideal, color="grey", linestyle="--", label=f"ideal compaction {ideal:.2f}x")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("speed-up vs dense FP32")
        ax.invert_yaxis()
    fig.tight_layout()
    save_figure(fig, path)
    return path


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = ensure_dir(args.out)
    report: dict = {"schema": SCHEMA, "threads": args.threads, "speed": [], "accuracy": None}
    with scratch("vitcompact-int8-") as folder:
        if not args.skip_speed:
            report["speed"] = [speed_case(name, batch, args, folder) for name, batch in SPEED_CASES]
        if not args.skip_accuracy and args.dense.is_dir():
            report["accuracy"] = accuracy_case(args, folder)
    return write_study(out, "int8", report, args.threads, to_markdown, plot)


if __name__ == "__main__":
    main()
