"""Where data crosses between the host and the device during a schedule: uploads never make the host wait
(pinned, non-blocking), and what the device computed comes back only through :func:`host_read`, once per stage,
between stages (the scores the host must see to record, guard and drop early exits). Inside a stage the host only
queues work, so on a GPU the next stage's launches are never held up by a read of the last one's results.
"""
from __future__ import annotations

import contextvars

import torch

_READING: contextvars.ContextVar[bool] = contextvars.ContextVar("avarc_host_read", default=False)


def upload(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One pinned, non-blocking host-to-device copy (the tensor itself when it is already there): the copy queues
    behind the device's work instead of waiting for it."""
    if x.device == device:
        return x
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def host_read(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Several device tensors brought to the host in one transfer (one wait for the device), each in its own shape
    and dtype. They travel as float64, which holds fp32/bf16 values and integers below 2**53 exactly. Under
    ``torch.cuda.set_sync_debug_mode("error")`` this read is let through, so a GPU check that sets it around a
    schedule fails on any other wait for the device."""
    token = _READING.set(True)
    debug = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else 0
    try:
        if debug:
            torch.cuda.set_sync_debug_mode(0)
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).cpu()
    finally:
        if debug:
            torch.cuda.set_sync_debug_mode(debug)
        _READING.reset(token)
    parts = flat.split([t.numel() for t in tensors])
    return [part.view(t.shape).to(t.dtype) for part, t in zip(parts, tensors)]


def reading() -> bool:
    """Whether :func:`host_read` is under way (how a counter tells the reads between stages from the others)."""
    return _READING.get()
