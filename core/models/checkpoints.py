"""Reading checkpoints safely and loading them into our modules with ``strict=True``.

Accepts plain state dicts and the nestings that training code writes (``trainer`` → ``var_wo_ddp``,
``var_wo_ddp``, ``state_dict``, ``model``), strips ``module.`` / ``_orig_mod.`` prefixes, ignores derived
buffers, and casts fp16/bf16 weights to fp32. Every failure is one line that names the file.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pickle
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from ..errors import AvarcError

# Values the official files carry that are recomputed from the architecture.
DERIVED_BUFFERS = ("attn_bias_for_masking", "lvl_1L", "zero_k_bias", "ema_vocab_hit_SV")
_NESTING = {"var": ("var_wo_ddp", "var", "state_dict", "model"),
            "vae": ("vae_wo_ddp", "vae_local", "vae", "state_dict", "model")}
_PREFIXES = ("module.", "_orig_mod.")
# How torch's weights-only unpickler words "this pickle names a global it will not import" (2.1 … 2.13).
_NEEDS_CODE = re.compile(r"unsupported (global|class)", re.IGNORECASE)


def read_file(path: str | os.PathLike, trust_pickle: bool = False) -> dict:
    """torch.load with weights_only=True; a pickle that needs code execution is refused unless the user opts in."""
    path = Path(path)
    if not path.is_file():
        raise AvarcError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise AvarcError(f"{path}: empty file (an interrupted download?); download it again")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not _NEEDS_CODE.search(str(e)):      # garbage, not a pickle that names code to run
            raise _unreadable(path, e) from None
        if not trust_pickle:
            first = str(e).strip().splitlines()[0][:160]
            raise AvarcError(
                f"{path}: refusing to unpickle: the file needs code execution to load ({first}); "
                "if you trust its source, allow full unpickling", option="trust_pickle"
            ) from None
        warnings.warn(f"{path}: loading with full pickle (trust_pickle): this can run arbitrary code", stacklevel=2)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # an arbitrary pickle can fail in any way
            raise _unreadable(path, e) from None
    except Exception as e:  # torch's loaders raise KeyError, RuntimeError, EOFError, … on text or random bytes
        raise _unreadable(path, e) from None
    if not isinstance(obj, Mapping):
        raise AvarcError(f"{path}: expected a state dict, found a {type(obj).__name__}")
    return dict(obj)


def _unreadable(path: Path, e: Exception) -> AvarcError:
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return AvarcError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}{': ' + first if first else ''}); "
                      "download or save it again")


def unwrap(obj: Mapping, kind: str) -> dict[str, torch.Tensor]:
    """Find the state dict of ``kind`` ('var' or 'vae') inside a training checkpoint."""
    while not _is_state_dict(obj):
        if "trainer" in obj and isinstance(obj["trainer"], Mapping):
            obj = obj["trainer"]
            continue
        inner = next((obj[k] for k in _NESTING[kind] if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    sd = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        key = key.replace("._orig_mod.", ".")
        if key.rsplit(".", 1)[-1] in DERIVED_BUFFERS:
            continue
        sd[key] = value.float() if value.is_floating_point() else value
    return sd


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_state_dict(path: str | os.PathLike, kind: str, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    sd = unwrap(read_file(path, trust_pickle), kind)
    if not sd:
        raise AvarcError(f"{path}: no {kind.upper()} weights found (looked for a state dict, 'trainer', "
                         f"{', '.join(repr(k) for k in _NESTING[kind])})")
    return sd


def _examples(keys: list[str], n: int = 3) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


class _NoInit(TorchFunctionMode):
    """``torch.nn.init`` calls return their tensor untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


@contextmanager
def unfilled() -> Iterator[None]:
    """Build modules whose weights a checkpoint replaces next (:func:`load_into` assigns its tensors): on the CPU,
    parameters allocated but never initialised or written, so their pages are never touched. Not on the meta device:
    torch runs meta ops through Python references that import torch._dynamo, a second of every command's start-up."""
    with torch.device("cpu"), _NoInit():
        yield


def load_into(module: nn.Module, sd: Mapping[str, torch.Tensor], path: str | os.PathLike, what: str) -> None:
    """``module.load_state_dict(sd, strict=True)``, with key and shape problems explained in one line."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {_examples(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {_examples(unexpected)}")
        raise AvarcError(f"{path}: not a {what} checkpoint for this architecture ({'; '.join(parts)})")
    for k, v in sd.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise AvarcError(f"{path}: shape mismatch for {k}: checkpoint {tuple(v.shape)}, "
                             f"model {tuple(own[k].shape)}")
    module.load_state_dict(sd, strict=True, assign=True)   # the checkpoint's tensors, no copy into the built ones


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (official checkpoints are GBs); remembered per path, size and mtime."""
    st = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
