"""Study: how long compaction without training (`--method refit`) takes, and its peak memory.

    PYTHONPATH=bench .venv/bin/python -m studies.refit_timing --model vit_small_patch16_224 --images 512

Issue 26's targets on a 2-core CPU: vit_small_patch16_224 with 512 calibration images in under 5
minutes, vit_base_patch16_224 in under 15 minutes with a peak memory under 6 GB. The model is
built with random weights (the time does not depend on them) and the calibration images are
random, or the digits upsampled to the model's input (`--data digits`). What is timed is what the
refit method runs in a prune: the units scored on the calibration images and selected
(`vc.regroup` with the config's own regroup settings), then every block refit (`refit`). Peak
memory is the process's maximum resident set (`getrusage`), model and images included.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import torch

import vitcompact as vc
from vitcompact.cpu_features import cpu_features
from vitcompact.io import write_json
from vitcompact.pruning.refit import refit


def calibration(model: torch.nn.Module, source: str, images: int, batch_size: int) -> list[torch.Tensor]:
    """`images` calibration images in batches: random ones, or the digits at the model's input."""
    c, h, w = vc.input_size(model)
    if source == "random":
        g = torch.Generator().manual_seed(0)
        return [torch.randn(min(batch_size, images - i), c, h, w, generator=g) for i in range(0, images, batch_size)]
    val = 0.1  # the bundle keeps a validation split out of the `limit` images; read enough for `images`
    data = vc.load_data(source, img_size=(h, w), in_chans=c, batch_size=batch_size, aug="none", val_fraction=val,
                        limit=int(images / (1 - val)) + 2)
    batches, count = [], 0
    for x, _ in data.calibration():
        batches.append(x[:images - count])
        count += len(batches[-1])
        if count >= images:
            break
    return batches


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def time_refit(model: torch.nn.Module, batches: list[torch.Tensor], config: vc.RefitConfig,
               batch_size: int) -> dict[str, float | int]:
    """Seconds to score and select the units, and to refit the blocks (wall clock, and the CPU time
    of all the process's threads: on a shared machine the wall clock also counts the others' jobs);
    what the refit reports."""
    wall, cpu = time.perf_counter(), time.process_time()
    regroup = config.regroup_config(config.head_ratio, config.mlp_ratio, num_batches=len(batches))
    masks = vc.regroup(model, vc.PruneMasks.ones(model), regroup, data=batches)
    scored_wall, scored_cpu = time.perf_counter(), time.process_time()
    report = refit(model, masks, batches, config.settings(batch_size))
    done_wall, done_cpu = time.perf_counter(), time.process_time()
    return {"scores_s": scored_wall - wall, "refit_s": done_wall - scored_wall, "total_s": done_wall - wall,
            "scores_cpu_s": scored_cpu - cpu, "refit_cpu_s": done_cpu - scored_cpu, "total_cpu_s": done_cpu - cpu,
            "images": report.images, "fallbacks": len(report.fallbacks)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--ratio", default="0.5/0.5", help="heads/MLP neurons removed")
    p.add_argument("--target", default="global", choices=["local", "global", "mix"])
    p.add_argument("--data", default="random", help="random, or a built-in data source (digits)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--extrapolate", type=int, default=None, help="also estimate the time at this many images")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: runs/refit_timing/MODEL_IMAGES.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = vc.create_model(args.model).eval()
    batches = calibration(model, args.data, args.images, args.batch_size)
    head, mlp = (float(v) for v in args.ratio.split("/"))
    config = vc.RefitConfig(head_ratio=head, mlp_ratio=mlp, calib_images=args.images, refit_target=args.target)
    rss_before = _peak_rss_mb()
    timing = time_refit(model, batches, config, args.batch_size)
    report = {"model": args.model, "data": args.data, "ratio": args.ratio, "target": args.target,
              "criteria": config.criteria, "mode": config.mode,
              "batch_size": args.batch_size, "threads": torch.get_num_threads(), **timing,
              "peak_rss_mb": _peak_rss_mb(), "peak_rss_before_mb": rss_before,
              "cpu": cpu_features().model, "logical_cpus": os.cpu_count(),
              "load_average": list(os.getloadavg()), "torch": torch.__version__}
    if args.extrapolate:  # linear in the images: the solves, a fixed cost, make it a slight overestimate
        report["extrapolated_images"] = args.extrapolate
        report["extrapolated_total_s"] = timing["total_s"] * args.extrapolate / timing["images"]
    out = args.out or Path("runs/refit_timing") / f"{args.model}_{args.images}.json"
    write_json(out, report)
    print(f"{args.model}, {timing['images']} images, {report['threads']} threads on {report['cpu']}: "
          f"scores {timing['scores_s']:.1f} s, refit {timing['refit_s']:.1f} s, total {timing['total_s']:.1f} s "
          f"(CPU {timing['total_cpu_s']:.1f} s), peak RSS {report['peak_rss_mb']:.0f} MB")
    return report


if __name__ == "__main__":
    main()
