#!/usr/bin/env python3
"""Accuracy effect of the ONNX variants: test-set top-1 of PyTorch vs fp32, fp16 and int8 ONNX.

Example: python bench/export_variants.py runs/demo/compact --data digits --out runs/demo/variants
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


import vitcompact as vc
from vitcompact.data import load_data
from vitcompact.export import ExportConfig, Int8Config, to_fp16, to_int8, to_onnx
from vitcompact.export.verify import loader_top1 as top1, onnx_runner, ort_session, torch_runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", help="artifact directory of a trained (compact) model")
    parser.add_argument("--data", default="digits", help="built-in data source (default digits)")
    parser.add_argument("--root", default=None, help="folder of the data source, where it needs one")
    parser.add_argument("--out", default=None, help="folder for the ONNX files (default: a temp folder)")
    parser.add_argument("--per-channel", action="store_true", help="per-channel INT8 weight scales")
    args = parser.parse_args()

    model = vc.load(args.artifact).eval()
    c, h, _ = vc.input_size(model)
    bundle = load_data(args.data, root=args.root, img_size=h, in_chans=c, batch_size=256, aug="none")
    out = Path(args.out or tempfile.mkdtemp(prefix="variants-"))

    fp32 = to_onnx(model, out / "model.onnx", ExportConfig(optimize="off"))
    variants = [fp32, to_fp16(fp32.path), to_int8(fp32.path, config=Int8Config(per_channel=args.per_channel))]
    results = {"pytorch": top1(torch_runner(model), bundle.test)}
    for v in variants:
        results[f"onnx_{v.precision}"] = top1(onnx_runner(ort_session(v.path)), bundle.test)
    sizes = {v.precision: v.path.stat().st_size for v in variants}
    print(f"{'variant':12} {'top-1':>7} {'delta':>7} {'file':>10}")
    for name, acc in results.items():
        size = sizes.get(name.removeprefix("onnx_"))
        print(f"{name:12} {acc:7.4f} {acc - results['pytorch']:+7.4f} "
              f"{f'{size / 1e6:.2f} MB' if size else '':>10}")
    print(json.dumps({"data": args.data, "top1": results, "bytes": sizes}))


if __name__ == "__main__":
    main()
