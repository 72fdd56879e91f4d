"""The wheel installs vitcompact and its three sibling folders as one namespace."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from typer.testing import CliRunner

import vitcompact as vc
from vitcompact.cli.app import app


def test_wheel_installs_all_four_packages(tmp_path, wheel_file):
    wheel = wheel_file  # built from a copy of the checkout (conftest)
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("vitcompact/__init__.py", "vitcompact/cli/app.py", "vitcompact/export/onnx.py",
                   "vitcompact/bench/__init__.py"):
        assert module in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    code = ("import vitcompact, vitcompact.cli, vitcompact.export, vitcompact.bench, sys;"
            "print(all(m.__file__.startswith(sys.argv[1]) for m in "
            "(vitcompact, vitcompact.cli, vitcompact.export, vitcompact.bench)))")
    out = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


COMMANDS = ["train", "prune", "compact", "inspect", "bench", "deploy", "pipeline", "demo", "export"]


def help_rows(text: str) -> dict[str, str]:
    """The rows of a help screen's Commands panel: name -> one-line description."""
    panel = text[text.index("Commands"):]
    return {m[1]: m[2].strip() for m in re.finditer(r"^│ (\w+) +(.+?) *│$", panel, flags=re.M)}


def test_version_and_help():
    runner = CliRunner()
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"vitcompact {vc.__version__}"
    # The installed console script, wide enough that every description fits on its row.
    script = Path(sys.executable).with_name("vitcompact")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    rows = help_rows(done.stdout)
    assert list(rows) == COMMANDS
    for command, description in rows.items():
        # Each row is that command's own help: its usage line and the description it opens with.
        own = runner.invoke(app, [command, "--help"], terminal_width=200)
        assert own.exit_code == 0, command
        assert f"Usage: vitcompact {command} [OPTIONS]" in own.output, command
        assert description.endswith(".") and description in " ".join(own.output.split()), command
    assert list(help_rows(runner.invoke(app, ["export", "--help"], terminal_width=200).output)) == ["onnx", "openvino", "tensorrt"]


def test_inspect_preset_and_errors():
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", "vit-cifar-tiny", "--json"])
    assert result.exit_code == 0
    count = json.loads(result.output)["count"]
    # vit-cifar-tiny by hand: 32 px in 4 px patches of 3 channels -> 64 patches + class token,
    # width d = 192, 9 blocks of 3 heads, MLP 2d, 10 classes.
    d, hidden, tokens, blocks = 192, 384, 65, 9
    block = (2 * 2 * d                   # norm1, norm2 (weight and bias)
             + d * 3 * d + 3 * d         # qkv
             + d * d + d                 # proj
             + d * hidden + hidden       # fc1
             + hidden * d + d)           # fc2
    outside = (d * 3 * 4 * 4 + d         # patch embedding
               + d + tokens * d          # class token, position embedding
               + 2 * d                   # final norm
               + d * 10 + 10)            # head
    assert count["params"] == outside + blocks * block
    assert [b["params"] for b in count["blocks"]] == [block] * blocks
    block_macs = tokens * d * 3 * d + 2 * tokens * tokens * d + tokens * d * d + 2 * tokens * d * hidden
    assert count["macs"] == blocks * block_macs + 64 * (d * 3 * 4 * 4) + d * 10
    assert (count["heads"], count["neurons"]) == (blocks * 3, blocks * hidden)
    result = runner.invoke(app, ["inspect", "resnet18"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: model is a ResNet, not a timm VisionTransformer; vitcompact prunes ViT blocks with "
        "fused qkv attention and a two-layer MLP"]
