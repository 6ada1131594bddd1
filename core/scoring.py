"""Scoring (sequence, class) pairs for a staged schedule, with reuse across stages.

Attention is block-causal over scales, so the log-probs and keys/values of a sequence's first scales do not depend
on later scales. A later stage therefore never recomputes what an earlier one scored for the same tokens and class:
a stage no longer than what is already scored costs nothing (e.g. the clean sample of A-VARC+'s last stage), a longer
one only runs the new scales on top of the cached keys/values, and a smoothing neighbour whose coarse scales equal
the clean tokens starts from the clean sequence's cache. Results equal a plain forward up to float rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Hashable

import torch

from .flops import Macs, sequence_macs
from .likelihood import cache_budget
from .model import Model
from .var import KVCache

Key = tuple[Hashable, int]     # (image key, sample index); sample 0 is the clean tokens


@dataclass
class _Entry:
    tokens: torch.Tensor            # L' tokens scored so far
    logp: torch.Tensor              # L' per-token log-probs
    cache: KVCache | None           # the batch holding keys/values of those L' tokens (row ``row``), if kept
    row: int = 0


def _gather(refs: list[tuple[_Entry, int]]) -> KVCache:
    """Rows of several entries' cache batches, each cut to its usable prefix (the same for all), in order: one
    index_select per source batch instead of view ops per row."""
    num_tokens = refs[0][1]
    groups: dict[int, tuple[KVCache, list[int], list[int]]] = {}
    for pos, (e, _) in enumerate(refs):
        g = groups.setdefault(id(e.cache), (e.cache, [], []))
        g[1].append(e.row)
        g[2].append(pos)
    parts, order = [], []
    for cache, rows, positions in groups.values():
        parts.append(cache.truncate(num_tokens).select(torch.tensor(rows)))
        order += positions
    out = parts[0] if len(parts) == 1 else KVCache.cat(parts)
    return out if order == sorted(order) else out.select(torch.argsort(torch.tensor(order)))


class Scorer:
    """Summed token log-likelihoods of (sequence, class) pairs on the first s scales: the one place a schedule asks
    for scores. With ``keys`` (each row's (image, sample)) and ``reuse`` it remembers per (image, sample, class) what
    was scored; keys/values are kept only when the caller says a later stage can use them and they fit
    ``cache_bytes``. ``reuse=False`` is the plain path (every pair from the first token), kept for verification."""

    def __init__(self, model: Model, chunk: int | None = None, reuse: bool = True, cache_bytes: int | None = None):
        self.model, self.chunk, self.reuse = model, chunk, reuse
        self.cache_bytes = cache_bytes if cache_bytes is not None else cache_budget(model.device)
        self.entries: dict[tuple[Hashable, int, int], _Entry] = {}
        self.tokens_run = 0          # (pair × token) positions actually run
        self.macs = Macs()           # what the engine executed (linear, AdaLN, attention)
        self.guarded = 0             # images whose top two the precision guard re-scored in fp32
        self.guard_flips = 0         # … and whose prediction that changed

    def reset(self) -> None:
        """Forget everything (a new batch of images)."""
        self.entries = {}

    def score(self, tokens: torch.Tensor, classes: torch.Tensor, num_scales: int,
              keys: list[Key] | None = None, keep_for_later: bool = False) -> torch.Tensor:
        """N, L tokens and N class ids → N fp32 sums of log p(token | class, earlier scales) over the first scales."""
        if tokens.shape[0] == 0:
            return torch.zeros(0)
        if keys is None or not self.reuse:
            lp = self.model.pair_logp(tokens, classes, num_scales, chunk=self.chunk)
            self._count(lp.shape[0], lp.shape[1], 0)
            return lp.sum(-1)
        ends = self.model.spec.var.scale_ends()
        n_tok = ends[num_scales - 1]
        self._forget_pruned(keys, classes)
        out = torch.empty(tokens.shape[0])
        by_start: dict[int, list[tuple[int, tuple[_Entry, int] | None]]] = {}
        for r, ((img, j), c) in enumerate(zip(keys, classes.tolist())):
            e = self.entries.get((img, j, c))
            if e is not None and e.logp.shape[0] >= n_tok and torch.equal(e.tokens[:n_tok], tokens[r, :n_tok]):
                out[r] = e.logp[:n_tok].sum()
                continue
            base = self._prefix(img, j, c, tokens[r, :n_tok], ends)
            by_start.setdefault(base[1] if base is not None else 0, []).append((r, base))
        keep = keep_for_later and self._fits(len(tokens), n_tok)
        for start, rows in by_start.items():
            idx = torch.tensor([r for r, _ in rows])
            cache = _gather([b for _, b in rows]) if start else None
            res = self.model.score_pairs(tokens[idx], classes[idx], num_scales, self.chunk, cache, keep)
            self._count(len(rows), n_tok, start)
            sums = res.logp.sum(-1)
            for n, (r, base) in enumerate(rows):
                lp = torch.cat((base[0].logp[:start], res.logp[n])) if start else res.logp[n]
                out[r] = sums[n] + base[0].logp[:start].sum() if start else sums[n]
                img, j = keys[r]
                self.entries[(img, j, int(classes[r]))] = _Entry(tokens[r, :n_tok].clone(), lp, res.cache, n)
        return out

    def score_fp32(self, tokens: torch.Tensor, classes: torch.Tensor, num_scales: int) -> torch.Tensor:
        """Like a plain :meth:`score`, in fp32 whatever the model's dtype (the precision guard's re-scoring)."""
        return self.model.pair_logp(tokens, classes, num_scales, chunk=self.chunk, dtype=torch.float32).sum(-1)

    def _count(self, rows: int, end: int, start: int) -> None:
        self.tokens_run += rows * (end - start)
        self.macs = self.macs + sequence_macs(self.model.spec.var, end, start) * rows

    def _prefix(self, img: Hashable, j: int, c: int, toks: torch.Tensor, ends: list[int]) -> tuple[_Entry, int] | None:
        """The longest cached entry of this image and class (own sample first, then the clean one) whose tokens
        agree with ``toks`` on whole leading scales, and how many tokens of its cache are usable (up to the end of
        the last agreeing scale)."""
        best, best_len = None, 0
        for e in (self.entries.get((img, j, c)), self.entries.get((img, 0, c))):
            if e is None or e.cache is None:
                continue
            limit = min(e.cache.num_tokens, toks.shape[0])
            differ = (e.tokens[:limit] != toks[:limit]).nonzero()
            same = int(differ[0]) if len(differ) else limit
            usable = max((end for end in ends if end <= same and end < toks.shape[0]), default=0)
            if usable > best_len:
                best, best_len = (e, usable), usable
        return best

    def _fits(self, rows: int, n_tok: int) -> bool:
        spec = self.model.spec.var
        elem = 4 if self.model.dtype == torch.float32 else 2
        return rows * spec.depth * 2 * n_tok * spec.embed_dim * elem <= self.cache_bytes

    def _forget_pruned(self, keys: list[Key], classes: torch.Tensor) -> None:
        """Drop entries of classes an image no longer asks for (candidates only shrink from stage to stage), and
        compact the survivors' keys/values so the pruned rows' memory is freed (one index_select per batch)."""
        wanted: dict[Hashable, set[int]] = {}
        for (img, _), c in zip(keys, classes.tolist()):
            wanted.setdefault(img, set()).add(c)
        self.entries = {k: e for k, e in self.entries.items() if k[0] not in wanted or k[2] in wanted[k[0]]}
        live: dict[int, tuple[KVCache, list]] = {}
        for k, e in self.entries.items():
            if e.cache is not None:
                live.setdefault(id(e.cache), (e.cache, []))[1].append(k)
        for cache, ks in live.values():
            if len(ks) < cache.kv[0][0].shape[0]:
                compact = cache.select(torch.tensor([self.entries[k].row for k in ks]))
                for i, k in enumerate(ks):
                    self.entries[k] = replace(self.entries[k], cache=compact, row=i)
