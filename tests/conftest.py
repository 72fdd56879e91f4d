"""Shared test fixtures: small models of every supported ViT family."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

import vitcompact as vc
from export_cache import exports_once, real_export_program

# The research studies (bench/studies/, not installed) import as `studies.NAME`, as the Makefile runs them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

# Every adapter family the issue names, shrunk to 32 px / patch 8 / 2 blocks to stay fast.
FAMILIES: dict[str, tuple[str, dict]] = {
    "vit_tiny": ("vit_tiny_patch16_224", {}),
    "vit_small": ("vit_small_patch16_224", {}),
    "deit_small": ("deit_small_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "reg4": ("vit_little_patch16_reg4_gap_256", {}),
    "layerscale": ("deit3_small_patch16_224", {}),
    "qk_norm": ("vit_tiny_patch16_224", {"qk_norm": True}),
    "gap_no_cls": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}),
}


# One thread per test worker (`make test` runs a worker per core): torch's, set below, and onnxruntime's,
# which vitcompact takes from OMP_NUM_THREADS (export/verify.py: its default is every core, and its idle
# threads spin), as do the subprocesses the tests start.
THREADS = os.environ.get("VITCOMPACT_TEST_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", THREADS)
# OpenVINO's converter (`openvino.convert_model`) forks the process to send telemetry on every call
# unless the user opted out or CI is set (openvino_telemetry's own switch): the tests run offline, and
# forking a test worker that many times cost about 40 s of CPU.
os.environ.setdefault("CI", "true")


# `make test` hands each xdist worker whole files in collection order (--dist loadfile
# --no-loadscope-reorder), so a long file collected last keeps one worker busy while the other has
# finished. The longest files (measured with --durations=0, December 2026) go first; the rest follow.
LONGEST_FIRST = ("test_token_merge_tool.py", "test_wheel.py", "test_latency_tokens.py", "test_pareto.py",
                 "test_reproducible.py", "test_openvino.py", "test_token_merge.py", "test_bench.py", "test_int8.py",
                 "test_faults.py", "test_budget_cli.py", "test_pipeline.py", "test_export.py", "test_packaging.py",
                 "test_data_pipeline.py", "test_loop.py", "test_hostile_inputs.py", "test_budget_accuracy.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(int(THREADS))


@pytest.fixture(autouse=True, scope="session")
def _exports_once(tmp_path_factory):
    """Torch's exporter runs once per distinct model and export setting in the session (export_cache.py):
    the xdist workers' temporary folders share a parent, which holds the graphs."""
    base = tmp_path_factory.getbasetemp()
    with exports_once((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "exports"):
        yield


@pytest.fixture(autouse=True)
def _real_export(request, monkeypatch):
    """A test marked `real_export` (one that breaks the exporter or what it writes) runs torch's exporter."""
    if request.node.get_closest_marker("real_export") is not None:
        from vitcompact.export import onnx as onnx_export
        monkeypatch.setattr(onnx_export, "export_program", real_export_program())


@pytest.fixture(autouse=True, scope="session")
def _latency_cache(tmp_path_factory):
    """Latency tables are cached in a folder of this session (of each xdist worker), never in the
    user's ~/.cache: a test sees only tables measured in this run."""
    os.environ["VITCOMPACT_CACHE"] = str(tmp_path_factory.mktemp("vitcompact-cache"))


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give biases and LayerScale gammas non-trivial values so equality tests mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or name.endswith(".gamma"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith(".gamma") else 0.0))
    return model.eval()


def make_family(key: str, depth: int = 2, seed: int = 0, **overrides) -> torch.nn.Module:
    name, extra = FAMILIES[key]
    torch.manual_seed(seed)
    model = vc.create_model(name, img_size=32, patch_size=8, depth=depth, num_classes=10,
                            **{**extra, **overrides})
    return randomize_(model, seed)


def input_for(model: torch.nn.Module, batch: int, seed: int = 0) -> torch.Tensor:
    c = model.patch_embed.proj.in_channels
    h, w = model.patch_embed.img_size
    return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(seed))


def calibration(model: torch.nn.Module, batches: int = 2, batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    num_classes = model.num_classes
    return [(input_for(model, batch, seed + i), torch.randint(0, num_classes, (batch,), generator=g))
            for i in range(batches)]


@pytest.fixture(scope="module")
def bundle():
    """160 digits images (train/val/test split as load_data makes it), batch 32."""
    return vc.load_data("digits", batch_size=32, limit=160)


def tiny():
    """The demo preset cut to two blocks, seeded."""
    torch.manual_seed(0)
    return vc.create_model("vit-digits", depth=2)


@pytest.fixture(scope="module")
def digits_two_blocks(tmp_path_factory) -> str:
    """`tiny()` saved as an artifact folder: a model to give the pipeline and the commands where a test
    needs no more than two blocks (each block costs time in every stage, the ONNX exports most)."""
    path = tmp_path_factory.mktemp("model") / "vit-digits-2"
    vc.save(tiny(), path)
    return str(path)


def one_line_error(result, expected: str) -> None:
    """A CLI result that failed as a user error should: exit code 2, one `error:` line holding
    `expected`, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output


# A holder process runs vitcompact's own lock code, `vitcompact/output_folder.py`, but imports that
# module alone: it needs only `errors` and `io` beside it (plain Python), so the package's __init__
# (torch, timm: seconds of start-up per holder) stays out of the holder.
LOCK_MODULE_ONLY = f"""
import sys, types
package = types.ModuleType("vitcompact")
package.__path__ = [{str(Path(vc.__file__).parent)!r}]
sys.modules["vitcompact"] = package
from vitcompact import output_folder
assert "torch" not in sys.modules
"""

HOLD_FILE = LOCK_MODULE_ONLY + """
import time
with output_folder.lock_file(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""

HOLD_FOLDER = LOCK_MODULE_ONLY + """
import time
with output_folder.lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@contextlib.contextmanager
def held_by_another_process(path: Path, script: str) -> Iterator[subprocess.Popen]:
    """Another process holding `path`'s lock (`script`: HOLD_FILE or HOLD_FOLDER) for the block;
    the lock goes with the process."""
    holder = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def file_held(path: Path) -> contextlib.AbstractContextManager[subprocess.Popen]:
    """Another process holding the output file `path` as its writer (`output_folder.lock_file`) for
    the block; the lock goes with the process."""
    return held_by_another_process(path, HOLD_FILE)


ROOT = Path(__file__).resolve().parents[1]
# What a build needs no copy of; build/ would also let stale files of an old build into the wheel.
NOT_SOURCE = (".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".pytest_cache", ".whl")


@pytest.fixture(scope="session")
def wheel_file(tmp_path_factory) -> Path:
    """vitcompact's wheel, built once per session (per xdist worker) from a copy of the checkout, so
    that the build writes nothing into it; offline, with this environment's setuptools."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    args = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
            "-w", str(tmp / "dist"), str(source)]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return next((tmp / "dist").glob("vitcompact-*.whl"))
