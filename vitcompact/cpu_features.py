"""The instruction sets of this machine's CPU that decide which runtime and precision run fastest.

Read from the kernel's `/proc/cpuinfo` flags (what the CPU offers and the kernel enabled) and from
`torch.backends.cpu.get_cpu_capability()` (the kernels torch itself dispatches to). AMX runs bf16
and int8 matrix tiles, AVX-512 VNNI int8 dot products, AVX-512 BF16 bf16 dot products; a CPU with
none of them runs reduced precisions mostly by conversion, so measurements, not assumptions, pick.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

# Flag names as Linux spells them in /proc/cpuinfo.
AMX_FLAGS = ("amx_tile", "amx_bf16", "amx_int8")
ISA_FLAGS = (*AMX_FLAGS, "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "avx512f", "avx2")


@dataclass(frozen=True)
class CPUFeatures:
    """The CPU's model name and the instruction sets that matter for inference."""

    model: str
    amx_tile: bool = False
    amx_bf16: bool = False
    amx_int8: bool = False
    avx512_vnni: bool = False
    avx512_bf16: bool = False
    avx512_fp16: bool = False
    avx_vnni: bool = False
    avx512f: bool = False
    avx2: bool = False
    torch_capability: str | None = None  # e.g. "AVX512", "AVX2", "DEFAULT"

    @property
    def amx(self) -> bool:
        return self.amx_tile and (self.amx_bf16 or self.amx_int8)

    @property
    def native_bf16(self) -> bool:
        """bf16 matrix arithmetic in hardware (AMX or AVX-512 BF16), not by conversion to f32."""
        return self.amx_bf16 or self.avx512_bf16

    @property
    def native_int8(self) -> bool:
        """int8 dot products in hardware (AMX, AVX-512 VNNI or AVX-VNNI)."""
        return self.amx_int8 or self.avx512_vnni or self.avx_vnni

    @property
    def best_isa(self) -> str:
        """The widest matrix instruction set present, in words: AMX, AVX-512 BF16, ..., or none."""
        for present, name in ((self.amx, "AMX"), (self.avx512_bf16, "AVX-512 BF16"),
                              (self.avx512_vnni, "AVX-512 VNNI"), (self.avx512f, "AVX-512"),
                              (self.avx_vnni, "AVX-VNNI"), (self.avx2, "AVX2")):
            if present:
                return name
        return "none of AVX2, AVX-512, AMX"

    def to_dict(self) -> dict:
        return {**asdict(self), "amx": self.amx, "native_bf16": self.native_bf16,
                "native_int8": self.native_int8, "best_isa": self.best_isa}


def _cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """The first processor's model name and flags in `/proc/cpuinfo` text (x86 spells them
    `model name` / `flags`)."""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def torch_capability() -> str | None:
    try:
        import torch
        return torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError, RuntimeError):  # old torch, or a build without the query
        return None


def cpu_features(cpuinfo: str | None = None) -> CPUFeatures:
    """This machine's CPU features; `cpuinfo` replaces the contents of /proc/cpuinfo (tests, other
    machines' records). Without /proc/cpuinfo (not Linux) every ISA flag reads False."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            cpuinfo = ""
    model, flags = _cpuinfo(cpuinfo)
    return CPUFeatures(model=model or platform.processor() or platform.machine(),
                       **{flag: flag in flags for flag in ISA_FLAGS},
                       torch_capability=torch_capability())
