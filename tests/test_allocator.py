"""The console script keeps large freed blocks for reuse (quantcli.allocator), unless the user set glibc's own."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import cli

# A process that allocates, touches and frees a 64 MiB block ten times through glibc's malloc, as PyTorch's CPU
# allocator does (a batch's activations, ten times over), and prints whether the thresholds were set and the
# minor page faults the loop cost. Each block is advised off transparent huge pages (MADV_NOHUGEPAGE) before it is
# touched, so that it faults in 4 KiB pages whatever the machine's THP setting ("always" would fault a fresh
# mapping in 2 MiB pages, 32 a block, and hide what the kernel's work is).
LOOP = """
import ctypes, mmap, resource, sys
from quantcli.allocator import keep_large_blocks
kept = keep_large_blocks() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes, libc.memset.argtypes = (ctypes.c_void_p,), (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
SIZE, PAGE = 2**26, mmap.PAGESIZE
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    block = libc.malloc(SIZE)
    start = -(-block // PAGE) * PAGE
    libc.madvise(start, (block + SIZE - start) // PAGE * PAGE, 15)  # MADV_NOHUGEPAGE
    libc.memset(block, 1, SIZE)
    libc.free(block)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _loop(mode: str, **env: str) -> tuple[bool, int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", LOOP, mode], env={**environ, **env}, capture_output=True, text=True, check=True
    )
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


def test_large_blocks_are_reused_instead_of_faulted_in_again():
    kept, faults = _loop("keep")
    plain_kept, plain_faults = _loop("plain")
    assert kept and not plain_kept
    # each mmap'd block faults in its 16384 pages anew; a kept one only the first time
    assert faults * 5 < plain_faults, (faults, plain_faults)


def test_the_users_own_glibc_settings_are_left_alone():
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        kept, _ = _loop("keep", **{name: "131072" if name.startswith("MALLOC") else "glibc.malloc.check=0"})
        assert not kept, name


def test_the_console_script_sets_them(monkeypatch):
    calls = []
    monkeypatch.setattr("quantcli.cli.keep_large_blocks", lambda: calls.append(True))
    run = cli("inspect", "--help")
    assert run.rc == 0 and calls == [True]
