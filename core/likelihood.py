"""The likelihood engine: per-token log p(token | class, earlier scales) under teacher forcing.

Works on (sequence, class) pairs so that a schedule can give every image its own candidate classes; the pairs
are run in chunks sized to a memory budget, and only the target tokens' log-probs are kept (logsumexp over the
vocabulary chunk by chunk, never a full B×L×V log-softmax).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantizer import MultiScaleQuantizer
from .specs import VARSpec
from .var import VAR, KVCache

DEFAULT_BUDGET_BYTES = 2 << 30


def bytes_per_pair(spec: VARSpec, num_tokens: int, elem: int = 4) -> int:
    """Rough activation memory of one (sequence, class) forward: widest MLP activations, attention scores, logits."""
    C, H = spec.embed_dim, spec.num_heads
    hidden = round(C * spec.mlp_ratio)
    per_token = (6 * C + 2 * hidden) * elem + spec.vocab_size * 4 * 2
    return num_tokens * per_token + 2 * H * num_tokens * num_tokens * elem


def pairs_per_chunk(spec: VARSpec, num_tokens: int, budget_bytes: int = DEFAULT_BUDGET_BYTES, elem: int = 4) -> int:
    return max(1, budget_bytes // bytes_per_pair(spec, num_tokens, elem))


def num_tokens(spec: VARSpec, num_scales: int | None) -> int:
    s = len(spec.patch_nums) if num_scales is None else num_scales
    if not 1 <= s <= len(spec.patch_nums):
        raise ValueError(f"num_scales must be in 1..{len(spec.patch_nums)}, got {s}")
    return spec.scale_ends()[s - 1]


def target_logp(var: VAR, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(head(h))[target] for B, L, C states → B, L fp32 (logit minus logsumexp; no log-softmax tensor)."""
    logits = var.head(h).float()                       # B, L, V
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


@dataclass
class PairScores:
    """Per-token log-probs of tokens ``start`` … L'−1 for N (sequence, class) pairs, and optionally the pairs'
    keys/values of all L' tokens so that a later, longer forward can start where this one stopped."""

    logp: torch.Tensor            # N, L' − start, fp32 on CPU
    start: int
    cache: KVCache | None = None


@torch.no_grad()
def score_pairs(var: VAR, quantizer: MultiScaleQuantizer, tokens: torch.Tensor, class_idx: torch.Tensor,
                num_scales: int | None = None, chunk: int | None = None, dtype: torch.dtype = torch.float32,
                budget_bytes: int = DEFAULT_BUDGET_BYTES, cache: KVCache | None = None,
                keep_cache: bool = False) -> PairScores:
    """tokens N, L (≥ the first s scales) and class ids N → log-probs of the first s scales' tokens, skipping the
    ``cache.num_tokens`` tokens whose keys/values are given (the caller already has their log-probs)."""
    spec = var.spec
    n_tok = num_tokens(spec, num_scales)
    start = cache.num_tokens if cache is not None else 0
    if start > n_tok:
        raise ValueError(f"cache holds {start} tokens, more than the {n_tok} requested")
    tokens = tokens[:, :n_tok]
    if chunk is None:
        chunk = pairs_per_chunk(spec, n_tok, budget_bytes, 4 if dtype == torch.float32 else 2)
    device = next(var.parameters()).device
    out, caches = [], []
    for i in range(0, tokens.shape[0], chunk):
        t = tokens[i:i + chunk].to(device)
        c = class_idx[i:i + chunk].to(device)
        part = cache.select(slice(i, i + chunk)) if cache is not None else None
        x_in = quantizer.var_input(t)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            h, kv = var.hidden(c, x_in, part, keep_cache)
            out.append(target_logp(var, h, t[:, start:]).float().cpu())
        if keep_cache:
            caches.append(kv)
    logp = torch.cat(out) if out else torch.zeros(0, n_tok - start)
    return PairScores(logp, start, KVCache.cat(caches) if caches else None)


def pair_logp(var: VAR, quantizer: MultiScaleQuantizer, tokens: torch.Tensor, class_idx: torch.Tensor,
              num_scales: int | None = None, chunk: int | None = None, dtype: torch.dtype = torch.float32,
              budget_bytes: int = DEFAULT_BUDGET_BYTES) -> torch.Tensor:
    """tokens N, L (≥ the first s scales) and class ids N → N, L' fp32 log-probs of the first s scales."""
    return score_pairs(var, quantizer, tokens, class_idx, num_scales, chunk, dtype, budget_bytes).logp
