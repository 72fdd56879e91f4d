"""Peak memory of `vitcompact train` on image folders of growing size: does it stay flat?

Run: PYTHONPATH=bench python -m studies.data_memory [--images 1000,4000] [--json OUT]
For each size it writes a synthetic folder of 224 px JPEGs (10 classes, fixed seed), runs
`vitcompact train vit-cifar-tiny --data imagefolder --epochs 1` in a subprocess and samples the
memory of its whole process tree (the trainer and its DataLoader workers) every 0.1 s. Memory is
the sum of PSS (/proc/<pid>/smaps_rollup), not RSS: pages the forked workers share with the
trainer count once, as they occupy the machine once. Linux only. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vitcompact.io import write_json

from .image_folder import write_image_folder

TARGET_GROWTH_MB = 150  # issue 15: from 1,000 to 4,000 images
SAMPLE_S = 0.1


def _children() -> dict[int, list[int]]:
    """Every process's children, from each /proc/<pid>/stat's parent pid."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Field 4 is the parent; the command name before it may hold spaces and parentheses.
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        children.setdefault(parent, []).append(int(stat.parent.name))
    return children


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass  # ended while we looked: it holds nothing now
    return 0


def tree_pss_mb(root: int) -> float:
    """PSS of `root` and all its descendants, in MB."""
    children, pending, total = _children(), [root], 0
    while pending:
        pid = pending.pop()
        total += _pss_kb(pid)
        pending += children.get(pid, [])
    return total / 1024


def peak_train_memory(root: Path, out: Path, workers: int | None) -> dict:
    """Run `vitcompact train` on the folder `root`; its peak tree PSS (MB) and wall time."""
    command = [sys.executable, "-m", "vitcompact.cli", "train", "vit-cifar-tiny", "--data", "imagefolder",
               "--data-root", str(root), "--epochs", "1", "--out", str(out), "--json",
               *(["--workers", str(workers)] if workers is not None else [])]
    log = out.with_suffix(".log")
    started, peak = time.perf_counter(), 0.0
    with open(log, "w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        while process.poll() is None:
            peak = max(peak, tree_pss_mb(process.pid))
            time.sleep(SAMPLE_S)
    if process.returncode:
        sys.exit(f"vitcompact train failed (exit {process.returncode}):\n{log.read_text()[-3000:]}")
    return {"peak_mb": peak, "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default="1000,4000", help="comma-separated training-image counts")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: the library's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = p.parse_args(argv)
    sizes = [int(n) for n in args.images.split(",")]
    runs = []
    with tempfile.TemporaryDirectory(prefix="vitcompact-data-memory-") as tmp:
        for images in sizes:
            folder = write_image_folder(Path(tmp) / f"images-{images}", images)
            run = {"images": images, **peak_train_memory(folder, Path(tmp) / f"out-{images}", args.workers)}
            runs.append(run)
            print(f"{images:6d} images  peak {run['peak_mb']:7.0f} MB (PSS of trainer + workers)  "
                  f"train {run['seconds']:.0f} s", flush=True)
    result = {"runs": runs, "workers": args.workers}
    if len(runs) > 1:
        growth = runs[-1]["peak_mb"] - runs[0]["peak_mb"]
        met = growth < TARGET_GROWTH_MB
        print(f"growth {sizes[0]} -> {sizes[-1]} images: {growth:+.0f} MB; target < {TARGET_GROWTH_MB} MB "
              f"{'met' if met else 'NOT met'}")
        result.update(growth_mb=growth, target_mb=TARGET_GROWTH_MB, target_met=met)
    if args.json is not None:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
