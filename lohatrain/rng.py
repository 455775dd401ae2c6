"""Seeded draws from torch's global generators without changing them for anyone else.

Some library code draws only from the global RNG (lycoris-lora's initial values, the VAE's posterior sample).
`torch.manual_seed` seeds the CPU generator and every CUDA device's: so every one of them is saved before and
put back after, and the WebUI's own seeds (and any other caller's) continue exactly where they were.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def seeded_global_rng(seed: int):
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
