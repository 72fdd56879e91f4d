"""Accuracy vs measured speed-up of the pruning methods: the Pareto study on Fashion-MNIST.

Run: PYTHONPATH=bench python -m studies.pareto --dense runs/reference_fashion/dense --out docs/pareto
(or `make bench-pareto`). Every method prunes a copy of one trained dense model at each head/MLP
ratio (layer-wise selection; refit at its own, global) and pruning seed; `--global-at` adds global
selection and `--distill-at` distillation from the dense model, at one ratio each, as extra series.
RSST, Refill and one-shot run through `vc.prune` with PruneConfig's defaults for everything the
study does not vary (one epoch budget for all three); `magnitude` regroups the dense weights by
magnitude and cuts them, without training (one run: it has no seed); `refit` is `RefitConfig` (no
training, at its defaults: Fisher scores on calibration images from the pruning split selected
globally, least-squares refit of each block's layers) and `refit-ft` the same followed by
`--refit-finetune` epochs (docs/refit-fashion, issue 26). Each result is compacted; the compact
model's test top-1, its ideal (MAC) speed-up and its onnxruntime CPU speed-up against the dense
ONNX, timed interleaved, are reported. Layer-wise structures at one ratio have the same shapes, so
each distinct shape is timed once and its points share that measurement. The pruning runs train on
the first `--limit` images of the dense model's own training split (same split seed, same
normalisation); validation and test sets stay whole.
Writes `pareto.json`, `pareto.md` and `pareto.png`. A benchmark, not a test.
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

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

import vitcompact as vc
from vitcompact.errors import VitCompactError
from vitcompact.export import ExportConfig, to_onnx
from vitcompact.io import ensure_dir, read_json, scratch, write_json, write_text
from vitcompact.pruning.configs import method_fields, same_budget
from vitcompact.pruning.loop import apply_hard
from vitcompact.training.seeding import seed_everything

from vitcompact.latency import environment
from vitcompact.bench.harness import BenchConfig, benchmark
from vitcompact.io import save_figure

SCHEMA = "vitcompact.pareto/1"
FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
TRAINING_METHODS = ("rsst", "refill", "oneshot")
REFIT_METHODS = ("refit", "refit-ft")
METHODS = TRAINING_METHODS + ("magnitude",) + REFIT_METHODS
LABELS = {"rsst": "RSST", "refill": "Refill", "oneshot": "one-shot", "magnitude": "magnitude (no fine-tuning)",
          "refit": "refit (no training)", "refit-ft": "refit + fine-tune"}
COLOURS = {"rsst": "#c0504d", "refill": "#4f81bd", "oneshot": "#9bbb59", "magnitude": "#8064a2",
           "refit": "#f79646", "refit-ft": "#4bacc6"}
VARIANT_MARKERS = {"": "o", "global": "s", "distill": "^"}
# Where the RSST-vs-one-shot claims are checked.
HIGH_RATIO, LOW_RATIO = (0.7, 0.7), (0.3, 0.3)
BEATS_ONESHOT_BY, NEAR_DENSE_WITHIN = 0.01, 0.005
# Issue 26's refit targets: no training within 3 points of dense at 0.3/0.3 and 30 points above
# magnitude at 0.5/0.5; refit + fine-tune within 0.5 point of dense at 0.3/0.3.
MID_RATIO, REFIT_NEAR_DENSE, REFIT_ABOVE_MAGNITUDE = (0.5, 0.5), 0.03, 0.30


@dataclass(frozen=True)
class Point:
    """One setting of the study: a method at a head/MLP ratio, with its selection mode and teacher."""

    method: str
    head_ratio: float
    mlp_ratio: float
    mode: str = "layer-wise"
    distill: bool = False

    @property
    def variant(self) -> str:
        return "global" if self.mode == "global" else "distill" if self.distill else ""

    @property
    def series(self) -> str:
        return f"{self.method}-{self.variant}" if self.variant else self.method

    @property
    def seeded(self) -> bool:
        return self.method != "magnitude"

    @property
    def ratio(self) -> str:
        return ratio_text((self.head_ratio, self.mlp_ratio))


def ratio_text(ratio: tuple[float, float]) -> str:
    return f"{ratio[0]:g}/{ratio[1]:g}"


def series_label(series: str) -> str:
    if series in LABELS:
        return LABELS[series]
    method, _, variant = series.partition("-")
    return LABELS.get(method, method) + (f" {variant}" if variant else "")


def parse_ratios(text: str) -> list[tuple[float, float]]:
    """`0.3/0.3,0.5/0.5` -> [(0.3, 0.3), (0.5, 0.5)]; an empty string or `none` -> []."""
    if text.strip().lower() in ("", "none"):
        return []
    ratios = []
    for part in text.split(","):
        head, sep, mlp = part.partition("/")
        try:
            ratios.append((float(head), float(mlp if sep else head)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad ratio {part!r}; write head/mlp, e.g. 0.5/0.5") from None
    return ratios


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", type=Path, default=None, help="trained dense artifact (default: train one here)")
    p.add_argument("--model", default="vit-fashion-tiny", help="preset to train when --dense is not given")
    p.add_argument("--patch-size", type=int, default=None, help="patch of the model trained here")
    p.add_argument("--dense-epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of dense training here")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--root", default=None, help=f"data folder (default for fashion-mnist: {FASHION_ROOT})")
    p.add_argument("--limit", type=int, default=None, help="training images of each pruning run (CPU budget)")
    p.add_argument("--test-limit", type=int, default=None, help="cap the test set (smoke runs only)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--shift", type=int, default=None,
                   help="random-shift augmentation in pixels (default: load_data's); the dense model's own")
    p.add_argument("--seed", type=int, default=0, help="data split seed: the one the dense model was trained with")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--ratios", type=parse_ratios, default=parse_ratios("0.3/0.3,0.5/0.5,0.7/0.7"),
                   help="head/mlp ratios, layer-wise selection")
    p.add_argument("--global-at", type=parse_ratios, default=parse_ratios("0.5/0.5"),
                   help="ratios at which the training methods also run with global selection")
    p.add_argument("--distill-at", type=parse_ratios, default=parse_ratios("0.7/0.7"),
                   help="ratios at which the training methods also run distilled from the dense model")
    p.add_argument("--seeds", default="0,1,2", help="pruning seeds (data order and augmentation)")
    # None: PruneConfig's default, whatever it is.
    p.add_argument("--states", type=int, default=None)
    p.add_argument("--epochs-per-state", type=int, default=None)
    p.add_argument("--finetune-epochs", type=int, default=None)
    p.add_argument("--refit-finetune", type=int, default=1, help="epochs of refit-ft after the refit")
    p.add_argument("--calib-images", type=int, default=None, help="refit calibration images (RefitConfig's default)")
    p.add_argument("--prune-lr", type=float, default=None)
    p.add_argument("--lambda-schedule", default=None)
    p.add_argument("--lambda-max", type=float, default=None)
    p.add_argument("--lambda-base", type=float, default=None)
    p.add_argument("--lambda-exponent", type=float, default=None)
    p.add_argument("--bench-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--bench-seconds", type=float, default=8.0, help="timing budget per distinct shape")
    p.add_argument("--bench-min-rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("docs/pareto"))
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.root is None and args.data == "fashion-mnist":
        args.root = FASHION_ROOT
    return args


def study_points(args: argparse.Namespace) -> list[Point]:
    """Layer-wise points for every method, then the global and distilled extras (training methods)."""
    training = [m for m in args.methods if m in TRAINING_METHODS]
    points = [Point(m, h, r) for h, r in args.ratios for m in args.methods]
    points += [Point(m, h, r, mode="global") for h, r in args.global_at for m in training]
    points += [Point(m, h, r, distill=True) for h, r in args.distill_at for m in training]
    return points


def prune_overrides(args: argparse.Namespace, method: str) -> dict:
    """`method`'s config fields set by a flag (the λ flags are RSST's); the rest keep its defaults."""
    flags = {"lr": args.prune_lr, "lambda_schedule": args.lambda_schedule, "lambda_max": args.lambda_max,
             "lambda_base": args.lambda_base, "lambda_exponent": args.lambda_exponent}
    own = method_fields(method)
    return {k: v for k, v in flags.items() if v is not None and k in own}


def prune_config(point: Point, seed: int, args: argparse.Namespace) -> vc.PruneConfig:
    """The method's config at the study's epoch budget (one-shot spends it all fine-tuning), the
    flags' overrides, and no progress bars; refit at its own defaults (`--refit-finetune` epochs
    for refit-ft)."""
    quiet = dataclasses.replace(vc.TrainConfig(), progress=False)
    if point.method in REFIT_METHODS:
        calib = {} if args.calib_images is None else {"calib_images": args.calib_images}
        # Its own selection too (global): the ratios, not each block's share, are the study's.
        return vc.RefitConfig(head_ratio=point.head_ratio, mlp_ratio=point.mlp_ratio, seed=seed,
                              train=dataclasses.replace(vc.RefitConfig().train, progress=False),
                              finetune_epochs=args.refit_finetune if point.method == "refit-ft" else 0, **calib)
    return same_budget(point.method, args.states, args.epochs_per_state, args.finetune_epochs, train=quiet,
                       head_ratio=point.head_ratio, mlp_ratio=point.mlp_ratio, mode=point.mode,
                       distill=point.distill, seed=seed, **prune_overrides(args, point.method))


def load_split(args: argparse.Namespace, model: nn.Module) -> vc.DataBundle:
    """The dense model's split: the same seed and validation fraction give the same images and
    the same normalisation statistics as its training."""
    c, h, _ = vc.input_size(model)
    return vc.load_data(args.data, root=args.root, img_size=h, in_chans=c, batch_size=args.batch_size,
                        val_fraction=args.val_fraction, seed=args.seed, shift=args.shift)


def first(loader: DataLoader, n: int | None, shuffle: bool) -> DataLoader:
    """`loader` over its first `n` images (the split's order is already a seeded permutation)."""
    if n is None or n >= len(loader.dataset):
        return loader
    return DataLoader(Subset(loader.dataset, range(n)), batch_size=loader.batch_size, shuffle=shuffle,
                      collate_fn=loader.collate_fn)


def pruning_bundle(split: vc.DataBundle, args: argparse.Namespace) -> vc.DataBundle:
    return dataclasses.replace(split, train=first(split.train, args.limit, True),
                               test=first(split.test, args.test_limit, False))


def dense_model(args: argparse.Namespace) -> tuple[nn.Module, vc.DataBundle]:
    """The loaded (or here trained) dense model and its data split."""
    if args.dense is not None:
        model = vc.load(args.dense)
        warn_split_mismatch(args)
        return model, load_split(args, model)
    seed_everything(args.seed)  # the initial weights, as the reference run does
    model = vc.create_model(args.model, **({"patch_size": args.patch_size} if args.patch_size else {}))
    split = load_split(args, model)
    vc.train(model, split, vc.TrainConfig(epochs=args.dense_epochs, lr=args.lr, seed=args.seed, progress=False),
             description="dense")
    return model.cpu().eval(), split


def warn_split_mismatch(args: argparse.Namespace) -> None:
    """The artifact records its data and training seed; another split seed would fine-tune on the
    dense model's validation images and normalise with other statistics."""
    provenance = ((read_json(args.dense / "config.json").get("vitcompact") or {}).get("provenance") or {})
    data, seed = provenance.get("data"), (provenance.get("train") or {}).get("seed")
    if data not in (None, args.data) or seed not in (None, args.seed):
        print(f"warning: {args.dense} was trained on {data} with seed {seed}, the study uses {args.data} "
              f"with --seed {args.seed}", flush=True)


def shape_of(structure: vc.Structure) -> tuple[tuple[int, int], ...]:
    """Per block (kept heads, kept neurons): what the compact model's latency depends on."""
    return tuple(structure.shape())


def export_quiet(model: nn.Module, path: Path) -> Path:
    # The bench's own choice: no graph fusion, so dense and compact run the same kind of graph.
    with contextlib.redirect_stdout(io.StringIO()):
        return to_onnx(model.cpu().eval(), path, ExportConfig(optimize="off")).path


class SpeedupCache:
    """Measured onnxruntime speed-up of each distinct compact shape against the dense ONNX."""

    def __init__(self, dense: nn.Module, folder: Path, config: BenchConfig):
        self.folder, self.config = folder, config
        self.dense_onnx = export_quiet(dense, folder / "dense.onnx")
        self.measurements: dict[tuple, dict] = {}

    def measure(self, compact: nn.Module, structure: vc.Structure) -> dict:
        shape = shape_of(structure)
        if shape not in self.measurements:
            index = len(self.measurements)
            path = export_quiet(compact, self.folder / f"compact-{index}.onnx")
            batch = benchmark(self.dense_onnx, path, self.config).batches[0]
            self.measurements[shape] = {
                "id": index, "heads_per_block": [h for h, _ in shape], "neurons_per_block": [n for _, n in shape],
                "speedup": batch.speedup.value, "speedup_low": batch.speedup.low,
                "speedup_high": batch.speedup.high, "dense_p50_ms": batch.dense.p50,
                "compact_p50_ms": batch.compact.p50, "rounds": batch.rounds, "runs": []}
        return self.measurements[shape]


def prune_with_training(dense: nn.Module, bundle: vc.DataBundle, point: Point, seed: int,
                        args: argparse.Namespace) -> tuple[nn.Module, vc.PruneMasks]:
    result = vc.prune(copy.deepcopy(dense), bundle, prune_config(point, seed, args))
    return result.model, result.masks


def prune_by_magnitude(dense: nn.Module, point: Point) -> tuple[nn.Module, vc.PruneMasks]:
    """Whole heads and neurons ranked by weight magnitude and cut, no training."""
    defaults = vc.PruneConfig()
    model = copy.deepcopy(dense)
    config = dataclasses.replace(defaults.regroup_config(point.head_ratio, point.mlp_ratio), criteria="magnitude",
                                 mode=point.mode)
    masks = vc.regroup(model, vc.PruneMasks.ones(model), config)
    apply_hard(model, masks)
    return model, masks


def run_point(dense: nn.Module, bundle: vc.DataBundle, point: Point, seed: int | None,
              args: argparse.Namespace, speedups: SpeedupCache, dense_macs: int) -> dict:
    """Prune, compact, evaluate and time one point; returns its run row."""
    started = time.perf_counter()
    if point.method == "magnitude":
        model, masks = prune_by_magnitude(dense, point)
    else:
        model, masks = prune_with_training(dense, bundle, point, seed, args)
    compact = vc.compact(model, masks)
    structure = masks.structure()
    test, val = vc.evaluate(compact, bundle.test), vc.evaluate(compact, bundle.val)
    measurement = speedups.measure(compact, structure)
    row = {"series": point.series, "method": point.method, "head_ratio": point.head_ratio,
           "mlp_ratio": point.mlp_ratio, "mode": point.mode, "distill": point.distill, "seed": seed,
           "test_top1": test["top1"], "val_top1": val["top1"], "kept_heads": structure.kept_heads,
           "kept_neurons": structure.kept_neurons, "heads_per_block": [len(b.heads) for b in structure.blocks],
           "neurons_per_block": [len(b.neurons) for b in structure.blocks],
           "ideal_speedup": dense_macs / vc.count(compact).macs, "measured_speedup": measurement["speedup"],
           "measurement": measurement["id"], "seconds": time.perf_counter() - started}
    measurement["runs"].append(f"{point.series} {point.ratio} seed {seed}")
    return row


def aggregate(rows: list[dict]) -> list[dict]:
    """Per series and ratio: test top-1 over seeds (mean, min, max, std) and the speed-ups."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["series"], r["head_ratio"], r["mlp_ratio"]), []).append(r)
    out = []
    for (series, head, mlp), group in groups.items():
        top1 = [r["test_top1"] for r in group]
        out.append({"series": series, "method": group[0]["method"], "mode": group[0]["mode"],
                    "distill": group[0]["distill"], "head_ratio": head, "mlp_ratio": mlp,
                    "seeds": [r["seed"] for r in group], "test_top1": top1,
                    "mean": statistics.fmean(top1), "min": min(top1), "max": max(top1),
                    "std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                    "kept_heads": statistics.fmean(r["kept_heads"] for r in group),
                    "kept_neurons": statistics.fmean(r["kept_neurons"] for r in group),
                    "ideal_speedup": statistics.fmean(r["ideal_speedup"] for r in group),
                    "measured_speedup": statistics.fmean(r["measured_speedup"] for r in group),
                    "measurements": sorted({r["measurement"] for r in group})})
    return out


def find(aggregates: list[dict], series: str, ratio: tuple[float, float]) -> dict | None:
    return next((a for a in aggregates if a["series"] == series and (a["head_ratio"], a["mlp_ratio"]) == ratio),
                None)


def check_targets(aggregates: list[dict], dense_top1: float) -> dict:
    """RSST vs one-shot at the high ratio (mean ahead by a point, ahead on every seed) and RSST
    near dense at the low ratio; None where the study did not run the points."""
    targets: dict[str, dict | None] = {}
    rsst, oneshot = find(aggregates, "rsst", HIGH_RATIO), find(aggregates, "oneshot", HIGH_RATIO)
    if rsst and oneshot:
        theirs = dict(zip(oneshot["seeds"], oneshot["test_top1"]))
        ahead = [mine > theirs[s] for s, mine in zip(rsst["seeds"], rsst["test_top1"]) if s in theirs]
        margin = rsst["mean"] - oneshot["mean"]
        targets[f"rsst_beats_oneshot_at_{ratio_text(HIGH_RATIO)}"] = {
            "rsst_mean": rsst["mean"], "oneshot_mean": oneshot["mean"], "margin_pt": 100 * margin,
            "seeds_ahead": f"{sum(ahead)}/{len(ahead)}",
            "met": margin >= BEATS_ONESHOT_BY - 1e-9 and bool(ahead) and all(ahead)}
    else:
        targets[f"rsst_beats_oneshot_at_{ratio_text(HIGH_RATIO)}"] = None
    low = find(aggregates, "rsst", LOW_RATIO)
    targets[f"rsst_near_dense_at_{ratio_text(LOW_RATIO)}"] = None if low is None else {
        "rsst_mean": low["mean"], "dense": dense_top1, "gap_pt": 100 * (dense_top1 - low["mean"]),
        "met": low["mean"] >= dense_top1 - NEAR_DENSE_WITHIN - 1e-9}
    return {**targets, **refit_targets(aggregates, dense_top1)} if any(
        a.get("method") in REFIT_METHODS for a in aggregates) else targets


def refit_targets(aggregates: list[dict], dense_top1: float) -> dict:
    """Issue 26's targets where the study ran their points: refit near dense at the low ratio, far
    above magnitude at the middle one, and refit + fine-tune nearer still at the low ratio."""
    def near(series: str, within: float) -> dict | None:
        point = find(aggregates, series, LOW_RATIO)
        return None if point is None else {
            "series": series, "mean": point["mean"], "dense": dense_top1, "gap_pt": 100 * (dense_top1 - point["mean"]),
            "needs_pt": 100 * within, "met": point["mean"] >= dense_top1 - within - 1e-9}
    refit, magnitude = find(aggregates, "refit", MID_RATIO), find(aggregates, "magnitude", MID_RATIO)
    above = None if not (refit and magnitude) else {
        "series": "refit", "mean": refit["mean"], "magnitude": magnitude["mean"],
        "margin_pt": 100 * (refit["mean"] - magnitude["mean"]), "needs_pt": 100 * REFIT_ABOVE_MAGNITUDE,
        "met": refit["mean"] - magnitude["mean"] >= REFIT_ABOVE_MAGNITUDE - 1e-9}
    return {f"refit_near_dense_at_{ratio_text(LOW_RATIO)}": near("refit", REFIT_NEAR_DENSE),
            f"refit_above_magnitude_at_{ratio_text(MID_RATIO)}": above,
            f"refit_ft_near_dense_at_{ratio_text(LOW_RATIO)}": near("refit-ft", NEAR_DENSE_WITHIN)}


def target_lines(targets: dict) -> list[str]:
    lines = []
    for name, t in targets.items():
        if t is None:
            lines.append(f"{name}: not run")
        elif "series" in t:
            lines.append(f"{name}: {'met' if t['met'] else 'NOT met'} ({series_label(t['series'])} "
                         f"{100 * t['mean']:.2f} vs " + (f"dense {100 * t['dense']:.2f}: {t['gap_pt']:.2f} pt below; "
                         f"needs <= {t['needs_pt']:g} pt)" if "gap_pt" in t else f"magnitude {100 * t['magnitude']:.2f}: "
                         f"{t['margin_pt']:+.2f} pt; needs >= +{t['needs_pt']:g} pt)"))
        elif "margin_pt" in t:
            lines.append(f"{name}: {'met' if t['met'] else 'NOT met'} (RSST {100 * t['rsst_mean']:.2f} vs "
                         f"one-shot {100 * t['oneshot_mean']:.2f}: {t['margin_pt']:+.2f} pt, "
                         f"ahead on {t['seeds_ahead']} seeds; needs >= +{100 * BEATS_ONESHOT_BY:g} pt "
                         "and every seed)")
        else:
            lines.append(f"{name}: {'met' if t['met'] else 'NOT met'} (RSST {100 * t['rsst_mean']:.2f} vs "
                         f"dense {100 * t['dense']:.2f}: {t['gap_pt']:.2f} pt below; needs <= "
                         f"{100 * NEAR_DENSE_WITHIN:g} pt)")
    return lines


def to_markdown(report: dict) -> str:
    dense, aggregates, seeds = report["dense"], report["aggregates"], report["seeds"]
    lines = [f"Dense: test top-1 {100 * dense['test_top1']:.2f} %, {dense['macs']:,} MACs per image.", "",
             "| series | head/MLP ratio | kept heads | kept neurons | test top-1 mean | min | max | std | runs "
             "| ideal speed-up | measured speed-up | measurement |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for a in aggregates:
        lines.append(f"| {series_label(a['series'])} | {ratio_text((a['head_ratio'], a['mlp_ratio']))} "
                     f"| {a['kept_heads']:g} | {a['kept_neurons']:g} | {100 * a['mean']:.2f} | {100 * a['min']:.2f} "
                     f"| {100 * a['max']:.2f} | {100 * a['std']:.2f} | {len(a['seeds'])} "
                     f"| {a['ideal_speedup']:.2f}x | {a['measured_speedup']:.2f}x "
                     f"| {', '.join(f'#{m}' for m in a['measurements'])} |")
    lines += ["", "Test top-1 per pruning seed (magnitude has no seed: one run):", "",
              "| series | head/MLP ratio |" + "".join(f" seed {s} |" for s in seeds),
              "|---|---|" + "---:|" * len(seeds)]
    for a in aggregates:
        # A seedless run (magnitude) stands for every seed.
        by_seed = {s: a["mean"] for s in seeds} if a["seeds"] == [None] else dict(zip(a["seeds"], a["test_top1"]))
        cells = "".join(f" {100 * by_seed[s]:.2f} |" if s in by_seed else " – |" for s in seeds)
        lines.append(f"| {series_label(a['series'])} | {ratio_text((a['head_ratio'], a['mlp_ratio']))} |{cells}")
    b = report["budget"]
    lines += ["", f"Budget: every training method gets {b['states']} states x {b['epochs_per_state']} epochs "
              f"+ {b['finetune_epochs']} fine-tuning = {b['epochs']} epochs after the dense model (one-shot "
              f"spends them all fine-tuning), on {b['train_images']:,} training images; validation "
              f"{b['val_images']:,}, test {b['test_images']:,} images. Speed-up: onnxruntime CPU, batch "
              f"{b['bench_batch']}, {b['threads']} thread(s), dense and compact timed interleaved, "
              f"{len(report['measurements'])} distinct shapes timed (same shape, same measurement #).", ""]
    lines += target_lines(report["targets"])
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path:
    """Test top-1 (mean, min-max bars) against measured speed-up; ideal MAC speed-ups dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    dense = 100 * report["dense"]["test_top1"]
    ax.scatter([1.0], [dense], marker="*", s=160, color="black", zorder=4, label=f"dense {dense:.2f}")
    # Layer-wise structures at a ratio share their ideal speed-up: a dotted line. Global ones keep
    # floor(N (1 - r)) units in all, not a sum of per-block floors: a hollow marker at their ideal.
    ideal_lines = {ratio_text((a["head_ratio"], a["mlp_ratio"])): a["ideal_speedup"]
                   for a in report["aggregates"] if a["mode"] == "layer-wise"}
    for text, x in ideal_lines.items():
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"ideal {text}", (x, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                    fontsize=7, color="grey", ha="right", va="top")
    labelled = set()
    for a in report["aggregates"]:
        method, _, variant = a["series"].partition("-")
        mean = 100 * a["mean"]
        style = dict(color=COLOURS.get(method, "black"), marker=VARIANT_MARKERS.get(variant, "D"))
        ax.errorbar([a["measured_speedup"]], [mean], yerr=[[mean - 100 * a["min"]], [100 * a["max"] - mean]],
                    linestyle="none", capsize=3, markersize=6, zorder=3,
                    label=None if a["series"] in labelled else series_label(a["series"]), **style)
        labelled.add(a["series"])
        if a["mode"] == "global":
            ax.scatter([a["ideal_speedup"]], [mean], facecolors="none", edgecolors=style["color"],
                       marker=style["marker"], s=36, zorder=3)
    ax.set_xlabel("measured speed-up vs dense (onnxruntime CPU; dotted: ideal from MACs)")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return Path(path)


def budget(args: argparse.Namespace, bundle: vc.DataBundle) -> dict:
    config = prune_config(Point("rsst", 0.0, 0.0), 0, args)  # the split every method's budget follows
    return {"states": config.states, "epochs_per_state": config.epochs_per_state,
            "finetune_epochs": config.finetune_epochs,
            "epochs": config.states * config.epochs_per_state + config.finetune_epochs, "lr": config.lr,
            "train_images": len(bundle.train.dataset), "val_images": len(bundle.val.dataset),
            "test_images": len(bundle.test.dataset), "bench_batch": args.bench_batch, "threads": args.threads}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = ensure_dir(args.out)
    started = time.perf_counter()
    dense, split = dense_model(args)
    bundle = pruning_bundle(split, args)
    dense_top1 = vc.evaluate(dense, bundle.test)["top1"]
    dense_macs = vc.count(dense).macs
    print(f"dense: test top1 {dense_top1:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    bench = BenchConfig(backend="ort-cpu", batch_sizes=(args.bench_batch,), threads=args.threads,
                        time_budget_s=args.bench_seconds, min_rounds=args.bench_min_rounds)
    rows = []
    with scratch("vitcompact-pareto-") as folder:
        speedups = SpeedupCache(dense, Path(folder), bench)
        for point in study_points(args):
            for seed in (args.seeds if point.seeded else [None]):
                rows.append(run_point(dense, bundle, point, seed, args, speedups, dense_macs))
                r = rows[-1]
                print(f"{point.series} {point.ratio} seed {seed}: test top1 {r['test_top1']:.4f}, speed-up "
                      f"{r['measured_speedup']:.2f}x (ideal {r['ideal_speedup']:.2f}x) "
                      f"[{r['seconds']:.0f} s, {time.perf_counter() - started:.0f} s in all]", flush=True)
    aggregates = aggregate(rows)
    report = {"schema": SCHEMA,
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "environment": environment({"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                          "bench": dataclasses.asdict(bench)}),
              "dense": {"source": str(args.dense) if args.dense else f"trained here: {args.model}",
                        "test_top1": dense_top1, "val_top1": vc.evaluate(dense, bundle.val)["top1"],
                        "macs": dense_macs, "params": vc.count(dense).params},
              "seeds": args.seeds, "budget": budget(args, bundle),
              "prune_config": {k: v for k, v in prune_config(Point("rsst", 0.0, 0.0), 0, args).to_dict().items()
                               if k not in ("method", "head_ratio", "mlp_ratio", "mode", "distill", "seed")},
              "runs": rows, "aggregates": aggregates, "measurements": list(speedups.measurements.values()),
              "targets": check_targets(aggregates, dense_top1), "seconds": time.perf_counter() - started}
    table = to_markdown(report)
    write_json(out / "pareto.json", report)
    write_text(out / "pareto.md", table)
    plot(report, out / "pareto.png")
    print(table, flush=True)
    return report


if __name__ == "__main__":
    try:
        main()
    except VitCompactError as e:
        raise SystemExit(f"error: {e}") from None
