"""Where and how the engine runs: the device, the compute dtype (by what the host can do natively), compilation and
the CPU threads. Every such choice is made here, once, from the request and the hardware.

Threads: a model whose layers are too small to split (per-token work under ``SMALL_TOKEN_MACS``) runs on one thread,
a larger one on every core this process may use (its CPU affinity); ``threads`` overrides, at most the usable cores
(more threads than cores wait for each other at the end of every operation). The count is applied per call and put
back afterwards (:func:`core.engine.torch_state.torch_settings`), never left set in the caller's process.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import AvarcError
from ..models.block_ops import onednn_bf16
from ..models.specs import VARSpec
from .flops import token_macs


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → cuda if available, then mps, else cpu; anything else is checked to exist."""
    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise AvarcError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AvarcError(f"device {name!r} requested but CUDA is not available here; use cpu", option="device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise AvarcError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s), cuda:0…cuda:{torch.cuda.device_count() - 1}", option="device")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise AvarcError(f"device {name!r} requested but MPS is not available here; use cpu", option="device")
    return dev


def resolve_compile(flag: bool | None, device: torch.device) -> bool:
    """``None`` (auto) → compile on CUDA when Triton is installed, where the fused kernels pay for their one-time
    compile; not on CPUs, where the gain measured is small against the cold compile (README, Fusion)."""
    if flag is not None:
        return flag
    if device.type != "cuda":
        return False
    return importlib.util.find_spec("triton") is not None


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``bf16`` (the names of :data:`DTYPES`)."""
    return next(name for name, dt in DTYPES.items() if dt == dtype)


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions (AMX or AVX512-BF16) that oneDNN can use, where bf16
    matmuls run several times faster than fp32; elsewhere (e.g. AVX2-only) bf16 is emulated, slower than fp32.
    ``AVARC_CPU_BF16=emulated`` makes any host answer as one without (see :func:`core.models.block_ops.onednn_bf16`)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return ("amx_bf16" in flags or "avx512_bf16" in flags) and onednn_bf16()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → the fastest dtype that keeps predictions (bf16 agrees with fp32 on ≥ 99% of images and the
    precision guard makes the prediction fp32's, see ``avarc bench``): bf16 on GPUs with bf16 tensor cores (compute
    capability 8.0+, Ampere and later) and on CPUs with native bf16, else fp32. Or an explicit fp32/bf16/fp16; bf16
    asked for on a CPU that emulates it runs (correctly, slower than fp32) with one warning saying so."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float32
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32
    try:
        dtype = DTYPES[name]
    except KeyError:
        raise AvarcError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}") from None
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_fast_bf16():
        _warn_emulated()
    return dtype


@lru_cache(maxsize=1)
def _warn_emulated() -> None:
    logging.getLogger("avarc").warning("bf16 is emulated on this CPU (no AMX or AVX512-BF16): predictions stay exact "
                                       "(the precision guard), but it runs slower than fp32; --dtype auto picks fp32")


SMALL_TOKEN_MACS = 5_000_000      # d16: 2e8 per token, the digits demo: 4.5e5


def usable_cores() -> int:
    """Cores this process may run on (CPU affinity, e.g. a container's or taskset's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_threads(spec: VARSpec, requested: int | None = None) -> int:
    """``requested`` if given (more than the usable cores is cut to them, with one warning), else 1 for a tiny model,
    else the usable cores. Not the idle ones: a guess from the load average gave a run started just after another
    one half the cores, with nothing saying so."""
    cores = usable_cores()
    if requested is not None:
        if requested > cores:
            logging.getLogger("avarc").warning(
                f"warning: {requested} threads asked for, but this process may use {cores} core(s); using {cores} "
                "(more threads than cores wait for each other)")
        return max(1, min(requested, cores))
    return 1 if token_macs(spec) < SMALL_TOKEN_MACS else cores
