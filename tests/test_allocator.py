"""A CPU run keeps freed blocks for the next step (lohatrain/allocator.py): the speed a CPU step gets from it is
benchmarks/versus_kohya.py's; here, that a step's large tensors stop faulting pages in, and that afterwards the
process hands the memory back."""
from __future__ import annotations

import resource

import pytest
import torch

from lohatrain import allocator

pytestmark = pytest.mark.skipif(allocator._glibc() is None, reason="glibc's allocator only")

STEP_TENSOR = 64 * 2**20 // 4  # floats: 64 MB, above glibc's largest threshold for a block of its own


def faults_of_five_steps() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(STEP_TENSOR)  # written in full, then freed, as a step's activations are
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_a_cpu_run_reuses_freed_blocks_and_gives_them_back_afterwards():
    pages = STEP_TENSOR * 4 // resource.getpagesize()
    held = rss_bytes()
    with allocator.reuse_freed_blocks(torch.device("cpu")):
        faults_of_five_steps(), faults_of_five_steps()  # the first steps grow the heap
        assert faults_of_five_steps() < pages // 10  # then each step's block is the last one's
    assert rss_bytes() < held + STEP_TENSOR * 4 // 2  # trimmed: the run's freed blocks are not kept
