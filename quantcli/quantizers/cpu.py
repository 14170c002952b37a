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


# reduce_range's value for weights narrowed per output channel only as far as int16 pair sums need.
PAIR_SAFE = "pair_safe"


def saturates_u8s8(target_cpu: str) -> bool:
    """True where ORT's u8 x s8 kernels add pairs in int16 and saturate (x86 without VNNI).

    There pair-safe weights (or reduce_range's 7 bits everywhere) keep the pair sums in range.
    """
    return target_cpu in ("avx2", "avx512")


def saturates_only_here(target_cpu: str, here: str) -> bool:
    """Whether CPU `here` saturates pairs that `target_cpu` computes exactly (an AVX2 machine running a VNNI or arm64
    model): there ORT gives the target's products only with its graph optimizations off (unfused)."""
    return saturates_u8s8(here) and not saturates_u8s8(target_cpu)


_WEIGHTS = {
    False: "8-bit weights (-127..127)",
    True: "7-bit weights (-63..63) everywhere",
    PAIR_SAFE: "8-bit weights, narrowed per output channel where a pair of adjacent products could "
    "overflow int16 (|q[k] + q[k+1]| <= 128); depthwise convs keep the full range",
}


def describe(target_cpu: str, reduce_range: bool | str) -> str:
    """One sentence: the resolved target, its weight range and the CPUs the model computes right on."""
    weights = _WEIGHTS[reduce_range]
    if reduce_range is False and saturates_u8s8(target_cpu):
        where = (
            f"WRONG on {target_cpu} itself and every x86 CPU without VNNI (int16 pair sums can saturate); "
            "right on VNNI and arm64 CPUs"
        )
    elif reduce_range is False and target_cpu == "vnni":
        where = "right on VNNI and arm64 CPUs; x86 CPUs without VNNI (AVX2, AVX-512 before Ice Lake) can saturate"
    else:
        where = "right on every x86 CPU (AVX2, AVX-512, VNNI) and arm64"
    return f"target_cpu {target_cpu}: {weights}; {where}"
