"""The command-line process's memory allocator: large blocks kept for reuse instead of handed back to the kernel.

glibc's malloc serves every block over 32 MiB (at most; its dynamic threshold) with its own mmap and unmaps it on
free, so each large tensor a forward pass allocates (a batch of activations: 150 MB for one of EfficientNet-Lite0's
at 224 px and batch 32) is faulted in anew, page by page, by the kernel. Calibrating that model spent 15-27 s of
its 27-35 s wall in the kernel on an AMD EPYC with AVX2; with the blocks kept, 2-3 s of 19 s (docs/performance.md).
The console script therefore asks glibc to serve blocks up to THRESHOLD from its heap and to keep up to THRESHOLD
of freed memory at the heap's top. The next batch's tensors of the same sizes reuse the freed blocks; the peak
resident size grows by what the heap holds and cannot reuse (that calibrate: 1.54 GB against 0.97 GB).

Only the console script does this (a program that imports quantcli keeps its own allocator settings), only with
glibc, and never over the user's own: MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES in the
environment leave glibc as they set it. A preloaded allocator (jemalloc, tcmalloc) is not glibc's and is untouched.
"""

from __future__ import annotations

import ctypes
import os
import sys

THRESHOLD = 2**30  # bytes: blocks up to this from the heap; up to this much freed memory kept at its top
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_large_blocks() -> bool:
    """Set glibc's thresholds for this process; whether they were set."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _USER_SETTINGS):
        return False
    process = ctypes.CDLL(None)
    if not hasattr(process, "gnu_get_libc_version"):  # not glibc (musl's mallopt does nothing)
        return False
    mallopt = process.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, THRESHOLD))
