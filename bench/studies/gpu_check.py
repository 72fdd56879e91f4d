#!/usr/bin/env python3
"""One-shot GPU check: dense vs compact vit_small_patch16_224 in PyTorch, ONNX and TensorRT.

Run from the repository root: `python3 bench/gpu_check.py` (GPU) or `--cpu-smoke` (tiny, CPU);
`PYTHONPATH=bench python -m studies.gpu_check` does the same where vitcompact is installed.
Installs vitcompact (editable, no dependencies) when it is not importable, builds a dense model and
a compact one (2 of 6 heads and 30 % of neurons removed per block, random init), then reports
parity and latency at batch 1, 8 and 64: PyTorch eager FP32/FP16, ONNX (onnxruntime CPU parity) and
TensorRT FP32/FP16 engines when `tensorrt` imports; then the bench harness's `torch-cuda-fp16`
backend (CUDA graphs) at batch 1, 8, 64 and 256. Prints a table; writes `$OUT/gpu_check.json`
when OUT is set.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent


def ensure_vitcompact() -> None:
    try:
        import vitcompact  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "-e", str(REPO)], check=True)
        # An editable install is picked up at interpreter start (.pth), so start again.
        os.execv(sys.executable, [sys.executable, *sys.argv])


def interleaved_ms(runs: dict[str, Callable[[], Any]], sync: Callable[[], None], warmup: int,
                   rounds: int) -> dict[str, float]:
    """Median ms per call of each runner, alternating runners every round so drift hits all alike."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    sync()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


@dataclass
class Run:
    """Where and how long to time: the device, its synchronisation, batch sizes and rounds."""

    device: Any
    sync: Callable[[], None]
    batches: tuple[int, ...]
    warmup: int
    rounds: int


Row = tuple[str, str, int, float, float]  # backend, precision, batch, dense ms, compact ms


def torch_rows(dense, masked, compact, run: Run, report: dict) -> list[Row]:
    """PyTorch: compact against the masked dense model (parity), then dense vs compact latency, FP32
    then FP16 (GPU only)."""
    import torch

    rows: list[Row] = []
    shape = tuple(report["input_size"])
    for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        if precision == "fp16" and run.device.type == "cpu":
            continue
        models = {n: copy.deepcopy(m).to(run.device, dtype) for n, m in
                  (("dense", dense), ("masked", masked), ("compact", compact))}
        x = torch.randn(8, *shape, device=run.device, dtype=dtype)
        with torch.no_grad():
            ref = masked.to(run.device)(x.float()).float()
            got = models["compact"](x).float()
            same = models["masked"](x).float()
        masked.cpu()
        report["parity"][f"torch_{precision}"] = {
            "compact_vs_masked_fp32": float((got - ref).abs().max()),
            "masked_same_precision_vs_fp32": float((same - ref).abs().max()),
            "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}
        for batch in run.batches:
            xb = torch.randn(batch, *shape, device=run.device, dtype=dtype)
            with torch.no_grad():
                ms = interleaved_ms({k: (lambda m=models[k]: m(xb)) for k in ("dense", "compact")},
                                    run.sync, run.warmup, run.rounds)
            rows.append(("torch", precision, batch, ms["dense"], ms["compact"]))
        del models
    return rows


def onnx_files(dense, compact, work: Path, report: dict) -> dict[str, Path]:
    """ONNX exports of both (plain graphs, as TensorRT needs), verified on onnxruntime CPU."""
    from vitcompact.export import ExportConfig, to_onnx

    files = {}
    for name, model in (("dense", dense), ("compact", compact)):
        t0 = time.perf_counter()
        res = to_onnx(copy.deepcopy(model).cpu(), work / f"{name}.onnx", ExportConfig(optimize="off"))
        files[name] = res.path
        report["parity"][f"onnx_{name}"] = {**res.parity.to_dict(), "export_s": time.perf_counter() - t0}
    return files


def tensorrt_rows(files: dict[str, Path], work: Path, run: Run, report: dict) -> list[Row]:
    """TensorRT engines for both, FP32 and FP16, parity against onnxruntime, then latency; nothing
    where `tensorrt` does not import."""
    try:
        import tensorrt
    except ImportError:
        print("TensorRT is not installed: engine build and latency skipped")
        return []
    import torch

    from vitcompact.errors import VitCompactError
    from vitcompact.export import EngineRunner, TensorRTConfig, to_tensorrt, verify_tensorrt
    from vitcompact.export.tensorrt import TRT_ATOL

    report["tensorrt"] = {"version": tensorrt.__version__, "engines": {}, "errors": []}
    rows: list[Row] = []
    for precision in ("fp32", "fp16"):
        runners = {}
        try:
            for name, path in files.items():
                t0 = time.perf_counter()
                # Verified separately so a parity miss is reported instead of ending the run.
                eng = to_tensorrt(path, work / f"{name}.{precision}.engine",
                                  TensorRTConfig(precision=precision, min_batch=1, opt_batch=8,
                                                 max_batch=max(run.batches), verify=False))
                build_s = time.perf_counter() - t0
                parity = verify_tensorrt(eng.path, path, (1, 3), TRT_ATOL[precision])
                report["tensorrt"]["engines"][f"{name}_{precision}"] = {**parity.to_dict(), "build_s": build_s}
                runners[name] = EngineRunner(eng.path)
        except VitCompactError as e:
            report["tensorrt"]["errors"].append(f"{precision}: {e}")
            print(f"TensorRT {precision} failed: {e}")
            continue
        for batch in run.batches:
            xb = torch.randn(batch, *report["input_size"], device="cuda")
            ms = interleaved_ms({k: (lambda r=runners[k]: r(xb)) for k in runners}, run.sync, run.warmup, run.rounds)
            rows.append(("tensorrt", precision, batch, ms["dense"], ms["compact"]))
    return rows


def cuda_graph_rows(dense, compact, report: dict) -> list[Row]:
    """The bench harness's own GPU path: FP16, each batch size replayed as a CUDA graph."""
    from vitcompact.bench import BenchConfig, benchmark
    from vitcompact.errors import VitCompactError

    try:
        result = benchmark(dense, compact, BenchConfig(backend="torch-cuda-fp16", batch_sizes=(1, 8, 64, 256)))
    except (VitCompactError, RuntimeError) as e:  # reported, so the checks above still land
        report["torch_cuda_graphs"] = {"error": str(e)}
        print(f"torch-cuda-fp16 bench failed: {e}")
        return []
    report["torch_cuda_graphs"] = result.to_dict()
    print(f"torch-cuda-fp16: CUDA graphs {result.environment['cuda_graphs']} "
          f"{result.environment['eager_fallbacks'] or ''}")
    return [("torch-cuda-fp16", "fp16", b.batch_size, b.dense.p50, b.compact.p50) for b in result.batches]


def print_report(report: dict) -> None:
    params, macs = report["params"], report["macs"]
    print(f"device: {report['device']}  torch {report['versions']['torch']}  heads/block {report['heads_per_block']}  "
          f"neurons/block {report['neurons_per_block'][:1]}...")
    print(f"params dense {params['dense']:,} compact {params['compact']:,}; MACs ideal speed-up "
          f"{macs['ideal_speedup']:.2f}x")
    for key, value in report["parity"].items():
        shown = value.get("max_abs_diff", value.get("compact_vs_masked_fp32"))
        print(f"parity {key}: {json.dumps(shown)}")
    for key, value in (report["tensorrt"] or {}).get("engines", {}).items():
        print(f"parity tensorrt {key}: {json.dumps(value['max_abs_diff'])} (tolerance {value['atol']}, "
              f"{'ok' if value['passed'] else 'FAILED'}), build {value['build_s']:.0f}s")
    print(f"{'backend':15} {'prec':5} {'batch':>5} {'dense ms':>9} {'compact ms':>10} {'speed-up':>8}")
    for r in report["latency_ms"]:
        print(f"{r['backend']:15} {r['precision']:5} {r['batch']:>5} {r['dense']:>9.3f} {r['compact']:>10.3f} "
              f"{r['speedup']:>7.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, to test this script")
    parser.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes (GPU run)")
    args = parser.parse_args()
    ensure_vitcompact()

    import torch

    import vitcompact as vc
    from vitcompact.pruning import PruneMasks

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke for a CPU run of this script")
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    # FP32 means FP32: TF32 would round matmul inputs to 10-bit mantissas.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    run = Run(device, torch.cuda.synchronize if device.type == "cuda" else (lambda: None),
              (1, 2) if smoke else tuple(int(b) for b in args.batches.split(",")), *((1, 3) if smoke else (10, 30)))

    torch.manual_seed(0)
    dense = vc.create_model("vit_small_patch16_224", **(dict(img_size=32, patch_size=8, depth=2) if smoke else {}))
    dense.eval()
    masks = vc.regroup(dense, PruneMasks.ones(dense), vc.RegroupConfig(target="both", head_ratio=2 / 6, mlp_ratio=0.3))
    compact = vc.compact(dense, masks).eval()
    masked = masks.apply_(copy.deepcopy(dense)).eval()
    dc, cc = vc.count(dense), vc.count(compact)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "vitcompact": vc.__version__},
        "input_size": list(vc.input_size(dense)),
        "heads_per_block": [b.attn.num_heads for b in compact.blocks],
        "neurons_per_block": [b.mlp.fc1.out_features for b in compact.blocks],
        "params": {"dense": dc.params, "compact": cc.params},
        "macs": {"dense": dc.macs, "compact": cc.macs, "ideal_speedup": dc.macs / cc.macs},
        "parity": {}, "latency_ms": [], "tensorrt": None, "torch_cuda_graphs": None,
    }
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    rows = torch_rows(dense, masked, compact, run, report)
    files = onnx_files(dense, compact, work, report)
    rows += tensorrt_rows(files, work, run, report)
    if not smoke:
        rows += cuda_graph_rows(dense, compact, report)
    report["latency_ms"] = [{"backend": backend, "precision": precision, "batch": batch, "dense": d_ms,
                             "compact": c_ms, "speedup": d_ms / c_ms}
                            for backend, precision, batch, d_ms, c_ms in rows]
    print_report(report)
    if os.environ.get("OUT"):
        from vitcompact.io import write_json

        out = Path(os.environ["OUT"]) / "gpu_check.json"
        write_json(out, report)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
