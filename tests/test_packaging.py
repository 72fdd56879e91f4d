"""The wheel installs vitcompact and its three sibling folders as one namespace."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from typer.testing import CliRunner

import vitcompact as vc
from vitcompact.cli.app import app

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_all_four_packages(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                    str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("vitcompact-*.whl"))
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


def test_version_and_help():
    runner = CliRunner()
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"vitcompact {vc.__version__}"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("inspect",):
        assert command in result.output


def test_inspect_preset_and_errors():
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", "vit-cifar-tiny", "--json"])
    assert result.exit_code == 0
    assert '"params": 2697610' in result.output and '"heads": 27' in result.output
    result = runner.invoke(app, ["inspect", "resnet18"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: model is a ResNet, not a timm VisionTransformer; vitcompact prunes ViT blocks with "
        "fused qkv attention and a two-layer MLP"]
