"""What vitcompact leaves on disk and in the process: file modes, stale temporaries, wandb."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys

import pytest

import vitcompact as vc
from vitcompact.export.files import staging
from vitcompact.io import write_json


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def model():
    return vc.create_model("vit-digits", depth=2)


@pytest.fixture
def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_written_files_and_staged_folders_honour_the_umask(model, tmp_path, mask, file_mode, folder_mode):
    with umask(mask):
        vc.save(model, tmp_path / "art")
        with staging(tmp_path / "model.onnx") as stage:
            staged_mode = mode(stage)
    assert {p.name: mode(p) for p in (tmp_path / "art").iterdir()} == {
        "config.json": file_mode, "model.safetensors": file_mode}
    assert staged_mode == folder_mode


def test_atomic_write_sweeps_only_dead_temporaries_of_its_target(tmp_path, dead_pid):
    dead = tmp_path / f".metrics.json.tmp-{dead_pid}-a1b2c3.tmp"
    live = tmp_path / f".metrics.json.tmp-{os.getpid()}-a1b2c3.tmp"
    other = tmp_path / f".report.json.tmp-{dead_pid}-a1b2c3.tmp"
    for leftover in (dead, live, other):
        leftover.write_text("half")
    write_json(tmp_path / "metrics.json", {"ok": True})
    assert not dead.exists()
    assert live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["metrics.json", live.name, other.name])


def test_export_staging_sweeps_only_dead_folders_of_its_target(tmp_path, dead_pid):
    dead = tmp_path / f".model.onnx.tmp-{dead_pid}-x7y8z9"
    live = tmp_path / f".model.onnx.tmp-{os.getpid()}-x7y8z9"
    for leftover in (dead, live):
        leftover.mkdir()
        (leftover / "model.onnx").write_bytes(b"half")
    with staging(tmp_path / "model.onnx") as stage:
        assert stage.name.startswith(f".model.onnx.tmp-{os.getpid()}-")
        assert not dead.exists() and live.exists()
    assert not stage.exists() and live.exists()


def test_importing_the_cli_does_not_import_wandb():
    check = "import sys, vitcompact.cli.app; assert 'wandb' not in sys.modules, 'wandb was imported'"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
