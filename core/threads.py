"""How many CPU threads the engine uses: the cores really free for the work it has.

OpenMP threads wait for each other at the end of every operation, so one thread sharing its core with another
process stalls all of them: with one of two cores busy, the bundled digits model fell from 74 to 2.4 images/s on
2 threads (50.6 on 1). So a model whose layers are too small to split (per-token work under ``SMALL_TOKEN_MACS``)
runs on one thread, and a larger one on the cores this process may use (its CPU affinity) minus the ones other
processes keep busy (the 1-minute load average, rounded), never fewer than one.
"""
from __future__ import annotations

import os

import torch

from .flops import token_macs
from .specs import VARSpec

SMALL_TOKEN_MACS = 5_000_000      # d16: 2e8 per token, the digits demo: 4.5e5


def usable_cores() -> int:
    """Cores this process may run on (CPU affinity, e.g. a container's or taskset's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_cores() -> int:
    """Cores other processes keep busy: the 1-minute load average, rounded (0 where there is none)."""
    try:
        return int(os.getloadavg()[0] + 0.5)
    except (AttributeError, OSError):
        return 0


def choose_threads(spec: VARSpec, requested: int | None = None) -> int:
    """``requested`` if given, else 1 for a tiny model, else the usable cores not busy elsewhere (at least 1)."""
    if requested is not None:
        return max(1, requested)
    if token_macs(spec) < SMALL_TOKEN_MACS:
        return 1
    return max(1, usable_cores() - busy_cores())


def set_threads(spec: VARSpec, requested: int | None = None) -> int:
    """Apply :func:`choose_threads` to torch's intra-op pool; returns the count used."""
    n = choose_threads(spec, requested)
    torch.set_num_threads(n)
    return n
