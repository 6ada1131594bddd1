"""torch's process-wide settings, put back as the caller had them: a library call or an in-process command may set
the thread count (and bench seeds torch's global generator), but a host program calling avarc keeps its own
settings afterwards, and a test's thread count never depends on the tests before it.

    with torch_settings(threads=2):     # the block runs on 2 threads; everything below is restored on exit
        ...
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class TorchSettings:
    """The process-wide torch settings a call could change (the interop pool and flush-denormal are left out: avarc
    never sets them, the first cannot be set again once used and the second cannot be read)."""

    threads: int
    grad: bool
    matmul_precision: str
    default_dtype: torch.dtype
    deterministic: bool
    rng: bytes                   # the CPU generator's state (torch.manual_seed, random weights)

    @classmethod
    def now(cls) -> TorchSettings:
        return cls(torch.get_num_threads(), torch.is_grad_enabled(), torch.get_float32_matmul_precision(),
                   torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),
                   torch.get_rng_state().numpy().tobytes())

    def apply(self) -> None:
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        torch.set_grad_enabled(self.grad)
        torch.set_float32_matmul_precision(self.matmul_precision)
        torch.set_default_dtype(self.default_dtype)
        if torch.are_deterministic_algorithms_enabled() != self.deterministic:
            torch.use_deterministic_algorithms(self.deterministic)
        torch.set_rng_state(torch.frombuffer(bytearray(self.rng), dtype=torch.uint8))


@contextmanager
def torch_settings(threads: int | None = None) -> Iterator[None]:
    """Run the block on ``threads`` CPU threads (None: as they are) with float32 as the default dtype (the engine's
    own tensors are float32 whatever a host chose), and restore every :class:`TorchSettings` field afterwards,
    however the block ends."""
    before = TorchSettings.now()
    try:
        if threads is not None and threads != before.threads:
            torch.set_num_threads(threads)
        torch.set_default_dtype(torch.float32)
        yield
    finally:
        before.apply()
