"""What a timing depends on: library versions, CPU, cores and GPU, recorded beside every result."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

import torch

from ..version import __version__


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int:
    """Cores this process may use, counting each physical core once (SMT siblings excluded)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        info = Path("/proc/cpuinfo").read_text()
        siblings = int(next(l for l in info.splitlines() if l.startswith("siblings")).split(":")[1])
        cores = int(next(l for l in info.splitlines() if l.startswith("cpu cores")).split(":")[1])
        per_core = max(1, siblings // max(1, cores))
    except (OSError, StopIteration, ValueError):
        per_core = 1
    return max(1, usable // per_core)


def gpu_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def environment(backend_settings: dict) -> dict:
    return {
        "vitcompact": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "tensorrt": _version("tensorrt"),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "gpu": gpu_name(),
        **backend_settings,
    }
