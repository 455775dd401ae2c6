"""The C allocator's behaviour during a CPU run (glibc on Linux; elsewhere nothing changes).

A CPU training step allocates and frees the same large activations every step. By default glibc gives each block of
32 MB or more its own mmap and unmaps it when freed, so the next step faults every page in again: measured on a
full-size SD1.5 step (256 px, one thread), 11 million minor page faults and as much system time as compute. While a
run trains on the CPU, freed blocks stay in the heap for the next step instead; afterwards the defaults come back
and the free pages are handed back to the system (`trim`), so the process is as large as before the run.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from contextlib import contextmanager

# glibc's mallopt parameters and their defaults (malloc/malloc.c)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _glibc():
    """glibc, or None where the C library is another (Windows, macOS, musl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it, and its mallopt takes these parameters
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def reuse_freed_blocks(device):
    """On a CPU run: freed blocks kept in the heap for the next step (no mmap per large block, no trimming)."""
    libc = _glibc() if device.type == "cpu" else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


def trim() -> None:
    """Hand the allocator's free pages back to the system (glibc keeps the many mid-sized blocks a run frees)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
