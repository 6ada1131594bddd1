"""Class-conditional sampling, drawn as upstream VAR's ``autoregressive_infer_cfg`` draws it, so that the same seed
and settings give the same token ids as the official code.

Per scale k of S: the VAR runs on the batch's rows and as many null-class rows (classifier-free guidance), the
logits are mixed as (1 + t)·cond − t·uncond with t = cfg · k / (S − 1), filtered (top-k, then top-p) and one
token per position is drawn by ``torch.multinomial`` on one CPU generator seeded once per call (so samples do not
depend on the device); the codes drawn join f̂ through the quantiser's residual step, which gives the next scale's
input. Keys and values of earlier scales are kept, as upstream's KV cache does. A ``prefix`` teacher-forces an
image's own first scales instead of drawing them (zero-shot editing, and counterfactuals).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import AvarcError
from ..models.quantizer import MultiScaleQuantizer, exact_fp32
from ..models.var import VAR
from ..models.var_state import KVCache
from ..models.vqvae import VQVAE


@dataclass(frozen=True)
class Sampling:
    """The settings of one draw (upstream's ``g_seed``, ``cfg``, ``top_k``, ``top_p``; 0 turns a filter off)."""

    seed: int = 0
    cfg: float = 1.5
    top_k: int = 0
    top_p: float = 0.0

    def check(self, vocab_size: int) -> Sampling:
        """These settings, or one line on the one that is out of range."""
        if self.cfg < 0:
            raise AvarcError(f"cfg {self.cfg} is negative; use 0 (no guidance) or more (upstream's default: 1.5)")
        if not 0 <= self.top_k <= vocab_size:
            raise AvarcError(f"top-k {self.top_k} is out of range; use 0 (off) … {vocab_size} (the vocabulary)")
        if not 0.0 <= self.top_p < 1.0:
            raise AvarcError(f"top-p {self.top_p} is out of range; use 0 (off) or a share below 1, e.g. 0.95")
        return self


def guidance(cfg: float, k: int, num_scales: int) -> float:
    """The guidance weight t of scale k: rises linearly from 0 at the first scale to ``cfg`` at the last."""
    return cfg * k / (num_scales - 1) if num_scales > 1 else 0.0


def filter_logits(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Logits with the tokens outside the top k, then outside the smallest set holding top_p of the probability
    (counted from the most likely; the most likely always stays), set to −inf."""
    if top_k > 0:
        kth = logits_BlV.topk(top_k, dim=-1).values[..., -1:]
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth, -torch.inf)
    if top_p > 0:
        ascending, order = logits_BlV.sort(dim=-1)
        drop_sorted = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop_sorted[..., -1] = False
        logits_BlV = logits_BlV.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -torch.inf)
    return logits_BlV


def draw(logits_BlV: torch.Tensor, sampling: Sampling,
         generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
    """B, l, V logits → B, l token ids, one multinomial draw per position on the (CPU) generator, or on each row's
    own generator."""
    B, n, V = logits_BlV.shape
    probs = filter_logits(logits_BlV.float().cpu(), sampling.top_k, sampling.top_p).softmax(dim=-1)
    if isinstance(generator, torch.Generator):
        return torch.multinomial(probs.view(-1, V), 1, replacement=True, generator=generator).view(B, n)
    return torch.stack([torch.multinomial(p, 1, replacement=True, generator=g).view(n)
                        for p, g in zip(probs, generator)])


@torch.no_grad()
def generate_tokens(var: VAR, quantize: MultiScaleQuantizer, labels: torch.Tensor, sampling: Sampling,
                    prefix: torch.Tensor | None = None, rows_per_forward: int | None = None,
                    on_scale: Callable[[int, int], None] | None = None,
                    generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """Class ids (B,) → B, L token ids drawn scale by scale. ``prefix``: B, L_K tokens of the first K scales, taken
    as given instead of drawn (the generator then starts at scale K). ``rows_per_forward``: rows (a sample's
    conditional and null rows count two) per forward pass, to bound memory; the draws do not depend on it.
    ``on_scale(k, S)`` is called after each scale. ``generators``: one per row instead of upstream's one for the
    batch (seeded by the caller; a row's draws then do not depend on the rest of the batch)."""
    pn, device = var.spec.patch_nums, labels.device
    S, B = len(pn), labels.shape[0]
    generator = generators if generators is not None else torch.Generator().manual_seed(sampling.seed)
    forced = quantize.split(prefix) if prefix is not None else []
    step = max(1, (rows_per_forward or 2 * B) // 2)
    chunks = [slice(lo, min(lo + step, B)) for lo in range(0, B, step)]
    null = torch.full_like(labels, var.num_classes)
    rows = [torch.cat((labels[c], null[c])) for c in chunks]          # per chunk: its samples, then their null rows
    caches: list[KVCache | None] = [None] * len(chunks)
    x_in = torch.zeros(B, 0, quantize.Cvae, device=device)                # B, L'−1, Cvae teacher-forcing input so far
    f_hat = torch.zeros(B, quantize.Cvae, pn[-1], pn[-1], device=device)
    drawn = []
    for k in range(S):
        states = []
        for i, c in enumerate(chunks):     # a forced scale runs too: the scales drawn after it attend to its tokens
            h, caches[i] = var.hidden(rows[i], torch.cat((x_in[c], x_in[c])), caches[i], keep_cache=k < S - 1)
            states.append(h)
        if k < len(forced):
            idx_Bl = forced[k].to(device)
        else:
            logits = [var.head(h).float() for h in states]
            cond = torch.cat([lg[:c.stop - c.start] for lg, c in zip(logits, chunks)])
            uncond = torch.cat([lg[c.stop - c.start:] for lg, c in zip(logits, chunks)])
            t = guidance(sampling.cfg, k, S)
            idx_Bl = draw((1 + t) * cond - t * uncond, sampling, generator).to(device)
        drawn.append(idx_Bl)
        f_hat, nxt = quantize.add_scale(k, idx_Bl, f_hat)
        if nxt is not None:
            x_in = torch.cat((x_in, nxt), dim=1)
        if on_scale is not None:
            on_scale(k, S)
    return torch.cat(drawn, dim=1)


@torch.no_grad()
@exact_fp32()
def decode(vae: VQVAE, tokens: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """B, L tokens → B, 3, R, R images in [0, 1] (upstream ``fhat_to_img(f̂)`` mapped from [−1, 1]), in chunks."""
    out = [vae.decode(vae.quantize.f_hat(tokens[i:i + chunk])).clamp(-1, 1).add(1).mul(0.5)
           for i in range(0, tokens.shape[0], chunk)]
    return torch.cat(out).float()
