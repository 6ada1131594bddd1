"""The likelihood engine: per-token log p(token | class, earlier scales) under teacher forcing.

Works on (sequence, class) pairs so that a schedule can give every image its own candidate classes; the pairs
are run in chunks sized to the device's free memory, and only the target tokens' log-probs are kept (logit minus
logsumexp in fp32, never a B×L×V log-softmax). The VAR passed in already holds its weights in the compute dtype
(``VAR.in_dtype``), so nothing is re-cast per call; inputs go to the device once and results come back once.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from ..models.quantizer import MultiScaleQuantizer
from ..models.specs import VARSpec
from ..models.var import VAR
from ..models.var_state import KVCache
from .graphs import ForwardGraphs
from .transfers import upload

CPU_BUDGET_BYTES = 2 << 30          # activations of one chunk on a CPU (larger chunks buy nothing there)
CPU_CACHE_BYTES = 4 << 30           # keys/values kept for later stages on a CPU
GPU_FREE_SHARE = 0.4                # of the GPU's free memory, for each of the two (the rest: allocator slack)
log = logging.getLogger("avarc")


def bytes_per_pair(spec: VARSpec, num_tokens: int, elem: int = 4) -> int:
    """Activation memory of one (sequence, class) forward: the widest block's tensors (residual, norm, q/k/v,
    attention output, MLP hidden and its GELU) and the fp32 logits with their logsumexp temporary. Attention scores
    are never stored (SDPA's fused kernels), so nothing grows with the square of the length."""
    C, hidden = spec.embed_dim, round(spec.embed_dim * spec.mlp_ratio)
    per_token = (8 * C + 2 * hidden) * elem + spec.vocab_size * 4 * 2
    return num_tokens * per_token


def _gpu_share(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * GPU_FREE_SHARE)


def memory_budget(device: torch.device) -> int:
    """Bytes the activations of one chunk of pairs may use: a share of the GPU's free memory, 2 GiB on a CPU."""
    return _gpu_share(device) if device.type == "cuda" else CPU_BUDGET_BYTES


def cache_budget(device: torch.device) -> int:
    """Bytes of keys/values a schedule may keep for its later stages: a share of the GPU's free memory, 4 GiB on a
    CPU."""
    return _gpu_share(device) if device.type == "cuda" else CPU_CACHE_BYTES


def pairs_per_chunk(spec: VARSpec, num_tokens: int, budget_bytes: int = CPU_BUDGET_BYTES, elem: int = 4) -> int:
    return max(1, budget_bytes // bytes_per_pair(spec, num_tokens, elem))


def num_tokens(spec: VARSpec, num_scales: int | None) -> int:
    s = len(spec.patch_nums) if num_scales is None else num_scales
    if not 1 <= s <= len(spec.patch_nums):
        raise ValueError(f"num_scales must be in 1..{len(spec.patch_nums)}, got {s}")
    return spec.scale_ends()[s - 1]


@contextmanager
def _tf32_matmul(on: bool) -> Iterator[None]:
    """cuBLAS fp32 matmuls in TF32 while ``on``, then the caller's setting back (no effect on CPUs); nothing is read
    or written when not ``on`` (an fp32 engine runs inside ``quantizer.exact_fp32``, and reading the legacy flag raises
    once the caller mixed torch's two precision APIs)."""
    if not on:
        yield
        return
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    saved = getattr(matmul, name)
    setattr(matmul, name, "tf32" if name == "fp32_precision" else True)
    try:
        yield
    finally:
        setattr(matmul, name, saved)


HEAD_TILE_BYTES = 64 << 20    # fp32 logits of one tile of tokens in the fused head


def target_logp(var: VAR, h_BLC: torch.Tensor, targets_BL: torch.Tensor) -> torch.Tensor:
    """log softmax(head(h))[target] for fp32 states → B, L fp32, in tiles of tokens: each tile's logits are made,
    their target picked and their logsumexp taken, so B×L×V logits never exist at once (the head has fp32 inputs
    and outputs). Under a bf16/fp16 engine the head's matmul may use TF32 on a GPU: its inputs keep 10 mantissa bits
    where the body's bf16 states keep 7, and true fp32 ran at 1/15 of bf16's rate on an H200."""
    B, L, C = h_BLC.shape
    h_TC, t_T = h_BLC.reshape(B * L, C), targets_BL.reshape(B * L, 1)
    out = torch.empty(B * L, dtype=torch.float32, device=h_BLC.device)
    tile = max(1, HEAD_TILE_BYTES // (4 * var.head.weight.shape[0]))
    with _tf32_matmul(var.compute_dtype != torch.float32):
        for lo in range(0, B * L, tile):
            logits = torch.addmm(var.head.bias, h_TC[lo:lo + tile], var.head.weight.t())
            torch.sub(logits.gather(-1, t_T[lo:lo + tile]).squeeze(-1), torch.logsumexp(logits, dim=-1),
                      out=out[lo:lo + tile])
    return out.view(B, L)


@dataclass
class PairScores:
    """Per-token log-probs of tokens ``start`` … L'−1 for N (sequence, class) pairs, and optionally the pairs'
    keys/values of all L' tokens so that a later, longer forward can start where this one stopped."""

    logp: torch.Tensor            # N, L' − start, fp32 on the engine's device
    start: int
    cache: KVCache | None = None


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


@torch.no_grad()
def score_pairs(var: VAR, quantizer: MultiScaleQuantizer, tokens: torch.Tensor, class_idx: torch.Tensor,
                num_scales: int | None = None, chunk: int | None = None, budget_bytes: int | None = None,
                cache: KVCache | None = None, keep_cache: bool = False, keep_tokens: int | None = None,
                graphs: ForwardGraphs | None = None) -> PairScores:
    """tokens N, L (≥ the first s scales) and class ids N → log-probs of the first s scales' tokens, skipping the
    ``cache.num_tokens`` tokens whose keys/values are given (the caller already has their log-probs); with
    ``keep_cache`` also the keys/values of the first ``keep_tokens`` tokens (all of them if None). ``graphs``: small
    chunks from the first token replay CUDA graphs (:mod:`core.engine.graphs`). A chunk that
    runs out of device memory is halved and retried (one log line says so). Nothing in the loop waits for the
    device: the inputs go over once (pinned, non-blocking), the AdaLN rows come from the engine's class table, the
    kept keys/values are written into one preallocated cache, and the log-probs stay on the device (the caller reads
    them when it needs them: ``Model.pair_logp`` at once, a schedule once per stage)."""
    spec = var.spec
    n_tok = num_tokens(spec, num_scales)
    start = cache.num_tokens if cache is not None else 0
    if start > n_tok:
        raise ValueError(f"cache holds {start} tokens, more than the {n_tok} requested")
    device = var.head.weight.device
    elem = var.compute_dtype.itemsize
    if chunk is None:
        chunk = pairs_per_chunk(spec, n_tok, budget_bytes or memory_budget(device), elem)
    N = tokens.shape[0]
    ids = sorted(set(class_idx.tolist())) if class_idx.device.type == "cpu" else None
    table = var.class_table(ids) if ids is not None and N else None
    tokens_NL = upload(tokens[:, :n_tok], device)
    class_N = upload(class_idx, device)
    logp = torch.empty(N, n_tok - start, device=device)
    n_keep = n_tok if keep_tokens is None else min(keep_tokens, n_tok)
    kept = KVCache.empty(spec, N, n_keep, var.compute_dtype, device) if keep_cache and N and n_keep else None
    i = 0
    while i < N:
        t = tokens_NL[i:i + chunk]
        c = class_N[i:i + chunk]
        part = cache.select(slice(i, i + chunk)) if cache is not None else None
        try:
            mods = table.lookup(c) if table is not None else None
            out = kept.rows(i, i + t.shape[0]) if kept is not None else None
            if graphs is not None and graphs.fits(t.shape[0], start, n_tok, mods):
                assert mods is not None                     # fits() says so
                lp, kv = graphs.forward(var, quantizer, target_logp, t, c, mods, n_keep if out is not None else None)
                logp[i:i + t.shape[0]] = lp
                if out is not None and kv is not None:
                    for dst, src in zip(out.bufs, kv.bufs):
                        dst.copy_(src)
            else:
                h, _ = var.hidden(c, quantizer.var_input(t), part, out is not None, mods, out)
                logp[i:i + t.shape[0]] = target_logp(var, h, t[:, start:])
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if chunk == 1 or not _is_oom(e):
                raise
            log.warning(f"out of device memory with {chunk} pairs per forward; retrying with {chunk // 2}")
            chunk //= 2
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        i += t.shape[0]
    return PairScores(logp, start, kept)
