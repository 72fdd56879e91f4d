"""A plain install of the wheel runs the main job: `vitcompact demo` in a fresh virtual environment
that holds the wheel and the required dependencies, without scikit-learn and without this checkout
(`demo --quick`: every stage of the demo, with less training and timing).

The dependencies are not installed again (the test runs offline): the new environment sees this
environment's site-packages through a filtered view, a folder of links to every entry except
scikit-learn, vitcompact's own (editable) install and the .pth files.
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

# Hidden from the new environment: scikit-learn (a plain install lacks it) and this checkout's
# editable vitcompact (its finder would import the sources instead of the wheel's files).
HIDDEN = ("sklearn", "scikit_learn*", "vitcompact*", "__editable__*", "*.pth")


def _run(args: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _dependency_view(tmp_path: Path) -> Path:
    view = tmp_path / "dependencies"
    view.mkdir()
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for entry in Path(site).iterdir():
            if not any(fnmatch.fnmatch(entry.name, p) for p in HIDDEN) and not (view / entry.name).exists():
                (view / entry.name).symlink_to(entry)
    return view


def _venv(tmp_path: Path, wheel: Path) -> tuple[Path, dict[str, str]]:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    # This environment's pip installs into the new one (`--python`), so it needs no pip of its own.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # A .pth entry comes after the environment's own site-packages: the wheel's vitcompact wins anyway.
    (Path(site) / "vitcompact_test_dependencies.pth").write_text(f"{_dependency_view(tmp_path)}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    # One torch thread, as each test worker has one core (`make test`): threads beyond the cores this
    # run gets only spin, and cost the other worker its core.
    env.update(PYTHONNOUSERSITE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1")
    return venv, env


@pytest.mark.slow
def test_demo_runs_from_the_wheel_without_scikit_learn(tmp_path, wheel_file):
    wheel = wheel_file  # built from a copy of the checkout (conftest), so the test writes nothing into it
    assert "vitcompact/data/digits.npz" in zipfile.ZipFile(wheel).namelist()
    venv, env = _venv(tmp_path, wheel)

    probe = ("import importlib.util, sys, vitcompact, vitcompact.data.sources as s;"
             "print(vitcompact.__file__); print(s.__file__);"
             "print(importlib.util.find_spec('sklearn')); print('sklearn' in sys.modules)")
    lines = _run([venv / "bin" / "python", "-c", probe], env=env, cwd=tmp_path).stdout.split()
    installed = venv.resolve()
    assert all(Path(f).resolve().is_relative_to(installed) for f in lines[:2]), lines
    assert lines[2:] == ["None", "False"], lines

    out = tmp_path / "demo"
    # --quick: the demo's every stage with short training and timing (its settings: test_pipeline.py).
    result = subprocess.run([venv / "bin" / "vitcompact", "demo", "--quick", "--out", out], capture_output=True,
                            text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "report.md").is_file() and (out / "compact.onnx").is_file()
