"""What a timing depends on: library versions, CPU (and its instruction sets), cores and GPU, recorded
beside every result."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

import torch

from ..cpu_features import cpu_features
from ..validate import integer
from ..version import __version__


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def package_version(package: str) -> str | None:
    """The installed version of `package`; None when it is not installed."""
    return _version(package)


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask where the OS has one): the most
    threads a timing can use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_threads(threads: int) -> int:
    """`threads` for a timing on this machine: at most `usable_cpus()`, since more would time the
    threads' contention (and take minutes doing so)."""
    return integer("threads (--threads)", threads, 1, usable_cpus(), note="the CPUs this process may use")


def physical_cores() -> int:
    """Cores this process may use, counting each physical core once (SMT siblings excluded)."""
    usable = usable_cpus()
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
    features = cpu_features()
    return {
        "vitcompact": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "tensorrt": _version("tensorrt"),
        "openvino": _version("openvino"),
        "platform": platform.platform(),
        "cpu": features.model,
        "cpu_features": features.to_dict(),  # AMX, AVX-512 VNNI / BF16, AVX2: they decide the fastest precision
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "gpu": gpu_name(),
        **backend_settings,
    }
