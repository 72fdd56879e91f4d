"""Token merging stacked with compaction and static INT8: accuracy against measured speed-up (a benchmark,
not a test).

Run: PYTHONPATH=bench python -m studies.tokens --out docs/tokens   (or `make bench-tokens`)

Speed (`vit_small_patch16_224`, random weights, batch 8 and 1): dense + ToMe r=13, compact (a third of
the heads, 30 % of the neurons, widths a multiple of 16), compact + r=13, and each with static INT8,
timed against the dense FP32 ONNX, onnxruntime CPU, one thread, each pair interleaved in one run.

Accuracy, on three trained references: the Fashion-MNIST reference (`--dense`, 16 patches + class
token) and two 196-patch ones (56 px, patch 4, 6 blocks of 3 heads) the study trains when missing:
narrow (`--dense196`, 96 wide, MLP x2) and wide (`--dense196w`, 192 wide, MLP x4). Per reference:
dense + ToMe at each r off the shelf (no training, the same for every seed). On the 16-patch and the
narrow reference, per seed, the one-shot compact model fine-tuned on `--limit` images, then ToMe at
each r applied off the shelf; and at `r*` (the largest r) the dense model and the one-shot compact
model fine-tuned with merging on. On both 196-patch references (merging on the decreasing schedule)
also the deployment stack: refit compaction (no training), on the narrow one at `--stack-head-ratio`
/ `--stack-mlp-ratio` (2/3 of the heads: with 3 heads of 32 the 4x needs 1 head, measured) fine-tuned
with merging at `r*` on `--stack-limit` images, distilled from the dense model; on the wide one at
`--stack196w-head-ratio` / `--stack196w-mlp-ratio` with merging off the shelf at every r (or
fine-tuned, `--stack196w-epochs`). Every model is exported to ONNX and quantised (static INT8,
calibrated on its training images); test top-1 of both files comes from onnxruntime. Speed-ups are
measured once per (model, r, precision) on the first seed's file against the dense FP32 ONNX at
batch 8: the accuracy phase runs first, the timing phase after it, so run the study alone.

Finished units (their rows) are kept in `--work` (default runs/tokens) and read back when the study runs
again: `--skip-timing` first, then the timing alone on a quiet machine. Delete the folder after changing
`--limit`, `--finetune-epochs` or a reference.
Writes tokens.json, tokens.md and tokens.png.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn
from timm.layers import resample_abs_pos_embed

import vitcompact as vc
from vitcompact.export import Int8Config, to_int8
from vitcompact.io import ensure_dir, read_json, save_figure, write_json
from vitcompact.training.seeding import seed_everything

from .cases import RESEARCH, calibration_data, compact_model, dense_model, describe, ints, time_pair, write_study
from .pareto import FASHION_ROOT, export_quiet, first
from .refit import EARLIER_SELECTION

SCHEMA = "vitcompact.tokens/1"
SPEED_MODEL, SPEED_R = "vit_small_patch16_224", 13
STATIC = Int8Config(mode="static", max_accuracy_drop=None)
# The 196-patch references: Fashion-MNIST at 56 px with patch 4, 6 blocks of 3 heads. Trained in two
# stages so that two cores afford them: at 28 px (49 patches, a quarter of the tokens) to near
# convergence, then at 56 px (position embeddings resampled to 14 x 14) for a short fine-tune.
# The narrow one (96 wide, MLP x2) spends much of its time outside the linear layers, the wide one
# (192 wide, MLP x4) mostly in them: there compaction and INT8 buy more (docs/results/tokens.md).
NARROW_196 = {"patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3, "mlp_ratio": 2.0}
WIDE_196 = {"patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3, "mlp_ratio": 4.0}


@dataclass(frozen=True)
class Recipe:
    """How the study trains a 196-patch reference it does not find: `dims` (its shape), `epochs` at
    half the input size, then `finetune_epochs` at full size on the first `finetune_images` training
    images (None: all)."""

    dims: dict
    epochs: int
    finetune_epochs: int
    finetune_images: int | None = None


@dataclass(frozen=True)
class Stack:
    """A reference's deployment stack: refit compaction at `head_ratio` / `mlp_ratio` (no training),
    then `epochs` with merging on at r* on `limit` training images, distilled from the dense model at
    `lr`. With no epochs the refit model is merged off the shelf at every r (one model for every seed)."""

    head_ratio: float
    mlp_ratio: float
    epochs: int
    lr: float
    limit: int


@dataclass(frozen=True)
class Reference:
    name: str
    slug: str  # its folder and unit names
    dense: Path
    r_values: tuple[int, ...]
    test_limit: int | None = None  # test images evaluated (None: all)
    schedule: str = "constant"  # the merge schedule at every r
    one_shot: bool = True  # the one-shot compact model and the fine-tunes with merging, per seed
    stack: Stack | None = None  # also the deployment stack

    @property
    def r_finetune(self) -> int:
        return max(self.r_values)

    def merge(self, r: int) -> vc.TokenMergeConfig | None:
        return vc.TokenMergeConfig(r=r, schedule=self.schedule) if r else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", type=Path, default=Path("runs/reference_fashion/dense"),
                   help="the Fashion-MNIST reference (`make bench-reference`); skipped if missing")
    p.add_argument("--dense196", type=Path, default=Path("runs/reference_fashion196/dense"),
                   help="the 196-patch reference; trained here when missing")
    p.add_argument("--data", default="fashion-mnist", help="data source of both references")
    p.add_argument("--root", default=FASHION_ROOT)
    p.add_argument("--r-values", default="1", help="r of the Fashion-MNIST reference (16 patches, 9 blocks)")
    p.add_argument("--r-values196", default="20,26",
                   help="r of the 196-patch reference (6 blocks; decreasing schedule: at most 31, constant: 28)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--limit", type=int, default=4000, help="training images of every fine-tune")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--dense-finetune-lr", type=float, default=1e-4,
                   help="peak lr of the dense model's fine-tune with merging (the compact one uses OneShotConfig's)")
    p.add_argument("--val-limit", type=int, default=2000, help="validation images evaluated")
    p.add_argument("--test-limit", type=int, default=None, help="test images of the 16-patch reference (default all)")
    p.add_argument("--test-limit196", type=int, default=5000, help="test images of the 196-patch reference")
    p.add_argument("--img196", type=int, default=56, help="input size of the 196-patch reference (patch 4)")
    p.add_argument("--train196-epochs", type=int, default=8, help="its epochs at half the input size")
    p.add_argument("--train196-finetune-epochs", type=int, default=1, help="then its epochs at --img196")
    p.add_argument("--train196-finetune-lr", type=float, default=3e-4)
    p.add_argument("--schedule196", default="decreasing", choices=("constant", "decreasing"),
                   help="merge schedule of the 196-patch reference")
    p.add_argument("--stack-head-ratio", type=float, default=2 / 3, help="heads the deployment stack removes "
                   "(196-patch reference; 2/3 keeps 1 of 3: the 4x needs it, measured)")
    p.add_argument("--stack-mlp-ratio", type=float, default=0.5)
    p.add_argument("--stack-epochs", type=int, default=2, help="the stack's fine-tune with merging on")
    p.add_argument("--stack-lr", type=float, default=3e-4)
    p.add_argument("--stack-limit", type=int, default=20000, help="the stack's training images")
    p.add_argument("--dense196w", type=Path, default=Path("runs/reference_fashion196w/dense"),
                   help="the wide 196-patch reference (192 wide, MLP x4); trained here when missing")
    p.add_argument("--skip-wide", action="store_true", help="no wide 196-patch reference")
    p.add_argument("--r-values196w", default="20,24", help="r of the wide 196-patch reference")
    p.add_argument("--train196w-epochs", type=int, default=8, help="its epochs at half the input size")
    p.add_argument("--train196w-finetune-images", type=int, default=16000,
                   help="then one epoch at --img196 on this many training images")
    p.add_argument("--stack196w-head-ratio", type=float, default=0.0, help="heads its deployment stack removes")
    p.add_argument("--stack196w-mlp-ratio", type=float, default=0.5)
    p.add_argument("--stack196w-epochs", type=int, default=0,
                   help="its fine-tune with merging on (0: the refit model, merging off the shelf at every r)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads of the timing")
    p.add_argument("--seconds", type=float, default=10.0, help="timing budget per pair (trained references)")
    p.add_argument("--speed-seconds", type=float, default=20.0, help="timing budget per pair (vit_small)")
    p.add_argument("--skip-speed", action="store_true", help="no vit_small speed case")
    p.add_argument("--skip-timing", action="store_true", help="accuracy only (time later, alone)")
    p.add_argument("--work", type=Path, default=Path("runs/tokens"))
    p.add_argument("--out", type=Path, default=Path("docs/tokens"))
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


def merged(model: nn.Module, merge: vc.TokenMergeConfig | None) -> nn.Module:
    return vc.merge_tokens(copy.deepcopy(model), merge).eval()


def quiet() -> vc.TrainConfig:
    return dataclasses.replace(vc.TrainConfig(), progress=False)


def split_of(model: nn.Module, args: argparse.Namespace) -> vc.DataBundle:
    """The split the references were trained on (seed 0, 10 % validation)."""
    c, h, _ = vc.input_size(model)
    return vc.load_data(args.data, root=None if args.data == "digits" else args.root, img_size=h, in_chans=c,
                        batch_size=128, seed=0)


def train_reference196(args: argparse.Namespace, recipe: Recipe, path: Path) -> None:
    """A 196-patch reference trained by `recipe` and saved at `path`: its epochs at half of `--img196` (a
    quarter of the tokens), then at `--img196` with the position embeddings resampled."""
    started = time.perf_counter()

    def fit(net: nn.Module, epochs: int, lr: float, warmup: float, images: int | None = None) -> vc.DataBundle:
        seed_everything(0)
        split = split_of(net, args)
        split = dataclasses.replace(split, train=first(split.train, images, True))
        vc.train(net, split, vc.TrainConfig(epochs=epochs, lr=lr, warmup_epochs=warmup, seed=0),
                 description=f"196-patch reference, {vc.input_size(net)[1]} px")
        return split

    seed_everything(0)
    low = vc.create_model("vit-fashion-tiny", img_size=args.img196 // 2, **recipe.dims)
    model = vc.create_model("vit-fashion-tiny", img_size=args.img196, **recipe.dims)
    fit(low, recipe.epochs, 1e-3, 1.0)
    state = low.state_dict()
    side = args.img196 // recipe.dims["patch_size"]
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=(side, side), num_prefix_tokens=1)
    model.load_state_dict(state)
    test = vc.evaluate(model, fit(model, recipe.finetune_epochs, args.train196_finetune_lr, 0.1,
                                  recipe.finetune_images).test)
    images = "" if recipe.finetune_images is None else f" on {recipe.finetune_images} images"
    vc.save(model.eval(), path, provenance={
        "stage": "train", "data": args.data, "test": test, "seconds": round(time.perf_counter() - started, 1),
        "train": f"{recipe.epochs} epochs at {args.img196 // 2} px (lr 1e-3), then "
                 f"{recipe.finetune_epochs} at {args.img196} px{images} (lr {args.train196_finetune_lr})"})
    print(f"196-patch reference: test top-1 {test['top1']:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)


def one_shot(dense: nn.Module, bundle: vc.DataBundle, seed: int, epochs: int,
             merge: vc.TokenMergeConfig | None = None) -> nn.Module:
    """The one-shot compact model (the research ratios), fine-tuned with `merge` on when there is one."""
    merge = {"token_merge": merge, "finetune_token_merge": True} if merge else {}
    config = vc.OneShotConfig(head_ratio=RESEARCH.head_ratio, mlp_ratio=RESEARCH.mlp_ratio, finetune_epochs=epochs,
                              seed=seed, train=quiet(), **merge)
    result = vc.prune(copy.deepcopy(dense), bundle, config)
    return vc.compact(result.model, result.masks).eval()


STACK_MODEL, STACK_TRAINING = "refit compact", "refit, fine-tuned with merging"
STACK_NO_TRAINING = "refit, no training"


def refit_stack(dense: nn.Module, bundle: vc.DataBundle, seed: int, merge: vc.TokenMergeConfig | None,
                stack: Stack) -> nn.Module:
    """The deployment stack's compact model: refit at the stack's ratios (no training), then its epochs
    (if any) with `merge` on, distilled from the dense model, on `bundle`'s training images."""
    tune = {"token_merge": merge, "finetune_token_merge": True} if stack.epochs else {}
    config = vc.RefitConfig(head_ratio=stack.head_ratio, mlp_ratio=stack.mlp_ratio, seed=seed,
                            finetune_epochs=stack.epochs, lr=stack.lr, **EARLIER_SELECTION,  # as measured
                            train=dataclasses.replace(vc.RefitConfig().train, progress=False), **tune)
    result = vc.prune(copy.deepcopy(dense), bundle, config)
    return vc.compact(result.model, result.masks).eval()


def dense_finetuned(dense: nn.Module, bundle: vc.DataBundle, seed: int, merge: vc.TokenMergeConfig,
                    args: argparse.Namespace) -> nn.Module:
    model = merged(dense, merge).train()
    vc.train(model, bundle, dataclasses.replace(quiet(), epochs=args.finetune_epochs, lr=args.dense_finetune_lr,
                                                seed=seed), description=f"dense fine-tune (r={merge.r})")
    return model.eval()


def evaluate(net: nn.Module, label: str, folder: Path, data: vc.DataBundle, **key) -> list[dict]:
    """FP32 and static INT8 ONNX of `net`: test (and validation) top-1 from onnxruntime."""
    fp32 = export_quiet(net, folder / f"{label}.onnx")
    with contextlib.redirect_stdout(io.StringIO()):
        result = to_int8(fp32, folder / f"{label}.int8.onnx", STATIC, data=data, verify=False)
    acc = result.int8["accuracy"]
    rows = [{**key, "precision": p, "test_top1": acc["test"][p], "val_top1": acc["val"][p],
             "file": str(path)} for p, path in (("fp32", fp32), ("int8", result.path))]
    print(f"  {label:40} fp32 test {acc['test']['fp32']:.4f}  int8 test {acc['test']['int8']:.4f}", flush=True)
    return rows


class Units:
    """Finished units of work (their rows), kept in the work folder so an interrupted study resumes."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, list[dict]] = read_json(path) if path.exists() else {}

    def run(self, key: str, work) -> list[dict]:
        if key not in self.done:
            started = time.perf_counter()
            print(f"{key} ...", flush=True)
            self.done[key] = work()
            print(f"{key}: {time.perf_counter() - started:.0f} s", flush=True)
            write_json(self.path, self.done)
        return self.done[key]


def one_shot_rows(ref: Reference, dense: nn.Module, tune: vc.DataBundle, data: vc.DataBundle, folder: Path,
                  seed: int, args: argparse.Namespace, units: Units) -> list[dict]:
    """One seed's trained series: the dense model fine-tuned with merging at r*, the one-shot compact
    model with merging off the shelf at every r, and the one-shot compact model fine-tuned with merging
    at r*."""
    r_star = ref.r_finetune
    rows = [*units.run(f"{ref.slug}/seed{seed}/dense-ft-r{r_star}", lambda: evaluate(
        dense_finetuned(dense, tune, seed, ref.merge(r_star), args), f"s{seed}-dense-ft-r{r_star}", folder, data,
        model="dense", r=r_star, training="fine-tuned with merging", seed=seed))]  # a copy: units keeps its own

    def compact_rows():
        compact = one_shot(dense, tune, seed, args.finetune_epochs)
        return [row for r in (0, *ref.r_values) for row in evaluate(
            merged(compact, ref.merge(r)), f"s{seed}-compact-r{r}", folder, data, model="compact", r=r,
            training="one-shot fine-tune" + (", merging off the shelf" if r else ""), seed=seed)]

    rows += units.run(f"{ref.slug}/seed{seed}/compact", compact_rows)
    return rows + units.run(f"{ref.slug}/seed{seed}/compact-ft-r{r_star}", lambda: evaluate(
        one_shot(dense, tune, seed, args.finetune_epochs, ref.merge(r_star)), f"s{seed}-compact-ft-r{r_star}", folder,
        data, model="compact", r=r_star, training="one-shot fine-tune with merging", seed=seed))


def reference_rows(ref: Reference, args: argparse.Namespace, units: Units) -> tuple[list[dict], dict]:
    dense = vc.load(ref.dense).eval()
    split = split_of(dense, args)
    data = dataclasses.replace(split, val=first(split.val, args.val_limit, False),
                               test=first(split.test, ref.test_limit, False))
    tune = dataclasses.replace(data, train=first(split.train, args.limit, True))  # its checks on the same images
    stack = ref.stack
    stack_data = dataclasses.replace(data, train=first(split.train, stack.limit, True)) if stack else None
    folder = ensure_dir(args.work / ref.slug)
    for r in ref.r_values:
        vc.models.token_merge.check_token_merge(dense, ref.merge(r))
    r_star = ref.r_finetune
    rows = []
    for r in (0, *ref.r_values):  # no training: the same for every seed
        rows += units.run(f"{ref.slug}/dense-r{r}", lambda r=r: evaluate(
            merged(dense, ref.merge(r)), f"dense-r{r}", folder, data, model="dense", r=r, training="none", seed=None))
    if stack is not None and not stack.epochs:  # no training: one model for every seed
        def stack_rows():
            compact = refit_stack(dense, stack_data, 0, None, stack)
            return [row for r in (0, *ref.r_values) for row in evaluate(
                merged(compact, ref.merge(r)), f"stack-r{r}", folder, data, model=STACK_MODEL, r=r,
                training=STACK_NO_TRAINING, seed=None)]

        rows += units.run(f"{ref.slug}/stack", stack_rows)
    for seed in args.seeds:
        if ref.one_shot:
            rows += one_shot_rows(ref, dense, tune, data, folder, seed, args, units)
        if stack is not None and stack.epochs:
            rows += units.run(f"{ref.slug}/seed{seed}/stack-r{r_star}", lambda seed=seed: evaluate(
                refit_stack(dense, stack_data, seed, ref.merge(r_star), stack), f"s{seed}-stack-r{r_star}", folder,
                data, model=STACK_MODEL, r=r_star, training=STACK_TRAINING, seed=seed))
    info = {"name": ref.name, "dense": str(ref.dense), "test_images": len(data.test.dataset),
            "r_values": list(ref.r_values), "r_finetune": r_star,
            "tokens": vc.models.token_merge.model_token_counts(dense), "dense_macs": vc.count(dense).macs,
            "token_counts": {str(r): vc.models.token_merge.model_token_counts(dense, ref.merge(r))
                             for r in ref.r_values},
            "dense_structure": describe(dense), "schedule": ref.schedule}
    if stack is not None:
        trained = bool(stack.epochs)
        info["stack"] = {"head_ratio": stack.head_ratio, "mlp_ratio": stack.mlp_ratio, "r": r_star if trained else None,
                         "epochs": stack.epochs, "lr": stack.lr if trained else None,
                         "images": len(stack_data.train.dataset) if trained else None}
    return rows, info


def timing_key(row: dict) -> str:
    return f"{row['model']} r{row['r']} {row['precision']}"


def time_reference(rows: list[dict], args: argparse.Namespace) -> dict[str, dict]:
    """Speed-up of each (model, r, precision) against the dense FP32 ONNX at batch 8, on the first file
    of each (the shapes do not depend on the seed or on how the model was trained)."""
    files: dict[str, str] = {}
    for row in rows:
        files.setdefault(timing_key(row), row["file"])
    dense = files.pop("dense r0 fp32")
    timings = {"dense r0 fp32": {"speedup": 1.0, "speedup_low": 1.0, "speedup_high": 1.0}}
    for key, path in files.items():
        timings[key] = time_pair(dense, path, 8, args.threads, args.seconds)
        print(f"  {key:24} {timings[key]['speedup']:.2f}x [{timings[key]['speedup_low']:.2f}, "
              f"{timings[key]['speedup_high']:.2f}] at batch 8", flush=True)
    return timings


def aggregate(rows: list[dict], timings: dict[str, dict]) -> list[dict]:
    """Per (model, r, training, precision): test top-1 over seeds and the measured speed-up."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["r"], row["training"], row["precision"]), []).append(row)
    out = []
    for (model, r, training, precision), group in groups.items():
        top1 = [g["test_top1"] for g in group]
        speed = timings.get(f"{model} r{r} {precision}", {})
        out.append({"model": model, "r": r, "training": training, "precision": precision,
                    "seeds": [g["seed"] for g in group], "test_top1": top1, "mean": statistics.fmean(top1),
                    "min": min(top1), "max": max(top1), "speedup": speed.get("speedup"),
                    "speedup_low": speed.get("speedup_low"), "speedup_high": speed.get("speedup_high")})
    return out


def full_stack_target(aggregates: list[dict], r_star: int) -> dict:
    """Compaction + merging + static INT8 at least 4x faster than dense FP32 within 1 point of its test top-1."""
    dense = next(a for a in aggregates if a["model"] == "dense" and a["r"] == 0 and a["precision"] == "fp32")
    stacks = [a for a in aggregates if a["model"] != "dense" and a["r"] and a["precision"] == "int8"]
    rows = [{"r": a["r"], "training": a["training"], "mean": a["mean"], "drop_points": 100 * (dense["mean"] - a["mean"]),
             "speedup": a["speedup"], "met": bool(a["speedup"] and a["speedup"] >= 4.0
                                                   and 100 * (dense["mean"] - a["mean"]) <= 1.0)} for a in stacks]
    return {"dense_test_top1": dense["mean"], "r_finetune": r_star, "stacks": rows, "met": any(r["met"] for r in rows)}


def speed_case(batch: int, args: argparse.Namespace, folder: Path) -> dict:
    """vit_small: dense + ToMe, compact, compact + ToMe, with static INT8, against dense FP32."""
    dense = dense_model(SPEED_MODEL)
    compact = compact_model(dense, RESEARCH, 16)
    data = calibration_data(dense, args.data, args.root, 256)
    dense_onnx = export_quiet(dense, folder / "vit_small-dense.onnx")
    files = {}
    for label, model in ((f"dense + ToMe r={SPEED_R}", merged(dense, vc.TokenMergeConfig(r=SPEED_R))),
                         ("compact", compact),
                         (f"compact + ToMe r={SPEED_R}", merged(compact, vc.TokenMergeConfig(r=SPEED_R)))):
        path = folder / f"vit_small-{len(files)}.onnx"
        if not path.exists():
            export_quiet(model, path)
        files[label] = path
        int8 = path.with_suffix(".int8.onnx")
        if not int8.exists():
            with contextlib.redirect_stdout(io.StringIO()):
                to_int8(path, int8, STATIC, data=data, verify=False)
        files[f"{label} + static INT8"] = int8
    rows = []
    for label, path in files.items():
        rows.append({"variant": label, **time_pair(dense_onnx, path, batch, args.threads, args.speed_seconds)})
        print(f"{SPEED_MODEL} batch {batch}: {label:34} {rows[-1]['p50_ms']:8.2f} ms {rows[-1]['speedup']:.2f}x "
              f"[{rows[-1]['speedup_low']:.2f}, {rows[-1]['speedup_high']:.2f}]", flush=True)
    return {"model": SPEED_MODEL, "batch": batch, "dense": describe(dense), "compact": describe(compact), "r": SPEED_R,
            "rows": rows}


def speed_targets(cases: list[dict]) -> dict:
    wanted = {8: 5.0, 1: 4.5}
    label = f"compact + ToMe r={SPEED_R} + static INT8"
    out = {}
    for case in cases:
        row = next(r for r in case["rows"] if r["variant"] == label)
        out[f"batch {case['batch']}"] = {"speedup": row["speedup"], "target": wanted[case["batch"]],
                                         "met": row["speedup"] >= wanted[case["batch"]]}
    return out


def pct(v: float) -> str:
    return f"{100 * v:.2f}"


def to_markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["# Token merging stacked with compaction and static INT8", "",
             f"onnxruntime {env.get('onnxruntime')} CPU, {report['threads']} thread, {env.get('cpu', '')} "
             f"({env.get('cpu_capability', '')}); each speed-up is timed interleaved with the dense FP32 ONNX in one "
             f"run (median ratio, 95 % interval). Test top-1 from onnxruntime"
             f"; {len(report['seeds'])} seeds, fine-tunes of {report['finetune_epochs']} epochs on {report['limit']} "
             "training images.", ""]
    for case in report["speed"]:
        lines += [f"## {case['model']} (random weights), batch {case['batch']}: dense {case['dense']}, compact "
                  f"{case['compact']}", "", "| variant | p50 ms | speed-up vs dense FP32 |", "|---|---:|---:|"]
        lines += [f"| {r['variant']} | {r['p50_ms']:.2f} | {r['speedup']:.2f}x [{r['speedup_low']:.2f}, "
                  f"{r['speedup_high']:.2f}] |" for r in case["rows"]]
        lines.append("")
    for target, t in report.get("speed_targets", {}).items():
        lines.append(f"- Target {target}: compact + r={SPEED_R} + static INT8 {t['speedup']:.2f}x "
                     f"(wanted >= {t['target']}x): {'met' if t['met'] else 'not met'}.")
    lines.append("")
    for ref in report["references"]:
        info = ref["info"]
        lines += [f"## {info['name']} ({info['dense_structure']}, tokens per block without merging "
                  f"{info['tokens'][0]}; test top-1 on {info['test_images']} test images)", "",
                  "Tokens per block: " + "; ".join(f"r={r}: {counts}" for r, counts in info["token_counts"].items()),
                  "", "| model | r | training | precision | test top-1 % (mean [min, max]) | Δ vs dense FP32 | "
                  "speed-up at batch 8 |", "|---|---:|---|---|---:|---:|---:|"]
        dense = ref["target"]["dense_test_top1"] if ref.get("target") else None
        for a in ref["aggregates"]:
            spread = f" [{pct(a['min'])}, {pct(a['max'])}]" if len(a["test_top1"]) > 1 else ""
            delta = f"{100 * (a['mean'] - dense):+.2f}" if dense is not None else ""
            speed = (f"{a['speedup']:.2f}x [{a['speedup_low']:.2f}, {a['speedup_high']:.2f}]"
                     if a["speedup"] is not None else "")
            lines.append(f"| {a['model']} | {a['r']} | {a['training']} | {a['precision']} | {pct(a['mean'])}{spread} | "
                         f"{delta} | {speed} |")
        lines.append("")
        if ref.get("target"):
            met = ", ".join(f"r={s['r']} ({s['training']})" for s in ref["target"]["stacks"] if s["met"])
            lines += [f"Full stack (compaction + merging + static INT8) at least 4x faster than dense FP32 within 1 "
                      f"point of its test top-1: {'met by ' + met if met else 'not met'}.", ""]
    lines += ["![accuracy against speed-up](tokens.png)", ""]
    return "\n".join(lines)


SERIES = {("dense", "none"): ("o", "#1f77b4"), ("dense", "fine-tuned with merging"): ("s", "#1f77b4"),
          ("compact", "one-shot fine-tune"): ("o", "#d62728"),
          ("compact", "one-shot fine-tune, merging off the shelf"): ("^", "#d62728"),
          ("compact", "one-shot fine-tune with merging"): ("s", "#d62728"), (STACK_MODEL, STACK_TRAINING): ("D", "#2ca02c"),
          (STACK_MODEL, STACK_NO_TRAINING): ("v", "#2ca02c")}


def plot(report: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = report["references"]
    fig, axes = plt.subplots(1, max(1, len(refs)), figsize=(6.5 * max(1, len(refs)), 4.5), squeeze=False)
    for ax, ref in zip(axes[0], refs):
        for a in ref["aggregates"]:
            if a["speedup"] is None:
                continue
            marker, color = SERIES.get((a["model"], a["training"]), ("x", "grey"))
            face = color if a["precision"] == "int8" else "none"
            ax.errorbar(a["speedup"], 100 * a["mean"], yerr=[[100 * (a["mean"] - a["min"])], [100 * (a["max"] - a["mean"])]],
                        fmt=marker, color=color, mfc=face, ms=7, capsize=2)
            ax.annotate(f"r={a['r']}", (a["speedup"], 100 * a["mean"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        for (model, training), (marker, color) in SERIES.items():
            ax.plot([], [], marker, color=color, mfc="none", label=f"{model}, {training}")
        ax.plot([], [], "o", color="black", label="filled: static INT8")
        ax.set_title(ref["info"]["name"])
        ax.set_xlabel("speed-up vs dense FP32 (onnxruntime, batch 8, 1 thread)")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, path)
    return path


def references(args: argparse.Namespace) -> list[Reference]:
    refs = []
    if args.dense.is_dir():
        refs.append(Reference("Fashion-MNIST reference (16 patches)", "fashion16", args.dense, ints(args.r_values),
                              args.test_limit))
    else:
        print(f"{args.dense} missing (make bench-reference): the 16-patch reference is skipped", flush=True)
    patches = (args.img196 // NARROW_196["patch_size"]) ** 2
    narrow = Recipe(NARROW_196, args.train196_epochs, args.train196_finetune_epochs)
    wide = Recipe(WIDE_196, args.train196w_epochs, 1, args.train196w_finetune_images)
    for label, slug, path, recipe, r_values, stack, trained_series in (
            ("", "", args.dense196, narrow, args.r_values196,
             Stack(args.stack_head_ratio, args.stack_mlp_ratio, args.stack_epochs, args.stack_lr, args.stack_limit), True),
            (", wide", "w", args.dense196w, wide, args.r_values196w,
             Stack(args.stack196w_head_ratio, args.stack196w_mlp_ratio, args.stack196w_epochs, args.stack_lr,
                   args.stack_limit), False)):
        if slug and args.skip_wide:
            continue
        if not path.is_dir():
            train_reference196(args, recipe, path)
        dims = recipe.dims
        refs.append(Reference(f"{patches}-patch reference{label} ({args.img196} px, patch {dims['patch_size']}, "
                              f"{dims['embed_dim']} wide, MLP x{dims['mlp_ratio']:g})", f"fashion{patches}{slug}",
                              path, ints(r_values), args.test_limit196, args.schedule196, trained_series, stack))
    return refs


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out, work = ensure_dir(args.out), ensure_dir(args.work)
    units = Units(work / "units.json")
    report: dict = {"schema": SCHEMA, "threads": args.threads, "seeds": args.seeds, "limit": args.limit,
                    "finetune_epochs": args.finetune_epochs, "speed": [], "references": []}
    measured = [(ref, *reference_rows(ref, args, units)) for ref in references(args)]
    if not args.skip_timing:
        print("timing (run alone)", flush=True)
        if not args.skip_speed:
            report["speed"] = [speed_case(batch, args, ensure_dir(work / "vit_small")) for batch in (8, 1)]
            report["speed_targets"] = speed_targets(report["speed"])
    for ref, rows, info in measured:
        timings = {} if args.skip_timing else time_reference(rows, args)
        aggregates = aggregate(rows, timings)
        report["references"].append({"info": info, "rows": rows, "timings": timings, "aggregates": aggregates,
                                     "target": full_stack_target(aggregates, ref.r_finetune)
                                     if timings else None})
    return write_study(out, "tokens", report, args.threads, to_markdown, plot)


if __name__ == "__main__":
    main()
