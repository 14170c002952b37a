"""Which int8 kernels ONNX Runtime's CPU provider will pick here (no torch import)."""

from __future__ import annotations

import platform
from pathlib import Path

# Checked in order: the first flag present names the CPU class.
_FLAG_CLASSES = (
    ("avx512_vnni", "vnni"),
    ("avx_vnni", "vnni"),
    ("avx512f", "avx512"),
    ("avx2", "avx2"),
)


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first processor listed in a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def classify(machine: str, flags: set[str]) -> str:
    """The target_cpu name for a machine string (platform.machine()) and its CPU flags."""
    if machine.lower() in ("aarch64", "arm64"):
        return "arm64"
    for flag, name in _FLAG_CLASSES:
        if flag in flags:
            return name
    return "avx2"


def detect_cpu(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """Classify the local CPU as vnni, avx512, avx2 or arm64."""
    path = Path(cpuinfo_path)
    text = path.read_text() if path.is_file() else ""
    return classify(platform.machine(), cpu_flags(text))


def saturates_u8s8(target_cpu: str) -> bool:
    """True where ORT's u8 x s8 kernels add pairs in int16 and saturate (x86 without VNNI).

    There 7-bit weights (reduce_range) keep the pairwise sums in range.
    """
    return target_cpu in ("avx2", "avx512")
