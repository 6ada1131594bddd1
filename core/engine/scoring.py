"""Scoring (sequence, class) pairs for a staged schedule, with reuse across stages.

Attention is block-causal over scales, so the log-probs and keys/values of a sequence's first scales do not depend
on later scales. A later stage therefore never recomputes what an earlier one scored for the same tokens and class:
a stage no longer than what is already scored costs nothing (e.g. the clean sample of A-VARC+'s last stage), a longer
one only runs the new scales on top of the cached keys/values, and a smoothing neighbour whose coarse scales equal
the clean tokens starts from the clean sequence's cache. Results equal a plain forward up to float rounding.

The bookkeeping is batched: what was scored lives per forward (a :class:`_Batch`), and a sorted tensor of row codes
(image, sample, class) says which batch row holds each pair, so a stage costs a few tensor ops per source batch
whatever its number of rows (at 1000 classes × 32 images, per-row ops would cost a GPU step's worth of Python).
That bookkeeping reads only what the host has anyway (token ids, row codes); the log-probs and sums stay on the
device, indexed by uploaded row numbers, so a stage never waits for the device (:mod:`core.engine.transfers`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from ..models.var_state import KVCache
from .flops import Macs, sequence_macs
from .likelihood import cache_budget
from .model import Model
from .transfers import upload

Key = tuple[Hashable, int]     # (image key, sample index); sample 0 is the clean tokens

# A row's code packs (image number, sample, class) into one int64: image << 40 | sample << 24 | class.
_SAMPLE_SHIFT, _IMAGE_SHIFT = 24, 40
_SAMPLE_BITS = ((1 << (_IMAGE_SHIFT - _SAMPLE_SHIFT)) - 1) << _SAMPLE_SHIFT


def _clean(code: torch.Tensor) -> torch.Tensor:
    """The codes of the same images and classes on the clean sample (0)."""
    return code & ~_SAMPLE_BITS


def shared_scales(a: torch.Tensor, b: torch.Tensor, ends: list[int]) -> torch.Tensor:
    """Per row, the longest prefix of whole scales (0 or an entry of ``ends``) on which token rows ``a`` and ``b``
    (broadcast) agree: how far one sequence may continue from the other's keys/values."""
    same = (a == b).cumprod(-1).sum(-1)
    whole = torch.tensor([0, *ends])
    return whole[torch.searchsorted(whole, same, right=True) - 1]


def _select(cache: KVCache, rows: torch.Tensor) -> KVCache:
    """Rows of a cache, the index uploaded once (not once per block)."""
    return cache.select(upload(rows, cache.bufs[0].device))


@dataclass
class _Batch:
    """The rows of one forward: their first L' tokens (host) and log-probs (device), and their keys/values if kept."""
    tokens_NL: torch.Tensor
    logp_NL: torch.Tensor
    cache: KVCache | None

    def logp(self, rows: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """The log-probs of the first ``num_tokens`` tokens of these rows (a host index, uploaded)."""
        return self.logp_NL[upload(rows, self.logp_NL.device), :num_tokens]


class Scorer:
    """Summed token log-likelihoods of (sequence, class) pairs on the first s scales: the one place a schedule asks
    for scores. With ``keys`` (each row's (image, sample)) and ``reuse`` it remembers per (image, sample, class) what
    was scored; keys/values are kept only for the leading tokens the caller says a later stage can use
    (``keep_tokens``), and only if they fit ``cache_bytes``. ``reuse=False`` is the plain path (every pair from the
    first token), kept for verification."""

    def __init__(self, model: Model, chunk: int | None = None, reuse: bool = True, cache_bytes: int | None = None):
        self.model, self.chunk, self.reuse = model, chunk, reuse
        self.cache_bytes = cache_bytes if cache_bytes is not None else cache_budget(model.device)
        self.tokens_run = 0          # (pair × token) positions actually run
        self.macs = Macs()           # what the engine executed (linear, AdaLN, attention)
        self.guarded = 0             # images the precision guard re-scored candidates of in fp32
        self.guard_flips = 0         # … and whose survivors, early exit or prediction that changed
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new batch of images)."""
        self.images: dict[Hashable, int] = {}          # image key → its number in row codes
        self.image_macs: dict[int, Macs] = {}          # image number → what its rows executed since the reset
        self.batches: dict[int, _Batch] = {}
        self.next_batch = 0
        # The index map, sorted by code: which batch and row hold the latest scores of each (image, sample, class).
        self.codes_M = torch.zeros(0, dtype=torch.long)
        self.batch_M = torch.zeros(0, dtype=torch.long)
        self.row_M = torch.zeros(0, dtype=torch.long)

    def score(self, tokens: torch.Tensor, classes: torch.Tensor, num_scales: int,
              keys: Sequence[Key] | None = None, keep_tokens: int = 0) -> torch.Tensor:
        """N, L tokens and N class ids (host tensors) → N fp32 sums of log p(token | class, earlier scales) over the
        first scales, on the model's device (nothing here waits for it)."""
        device = self.model.device
        if tokens.shape[0] == 0:
            return torch.zeros(0, device=device)
        if keys is None or not self.reuse:
            lp = self.model.score_pairs(tokens, classes, num_scales, chunk=self.chunk).logp
            self._count(lp.shape[0], lp.shape[1], 0, None if keys is None else self._codes(keys, classes))
            return lp.sum(-1)
        ends = self.model.spec.var.scale_ends()
        n_tok = ends[num_scales - 1]
        tokens_NL, classes = tokens[:, :n_tok].cpu(), classes.cpu()      # the bookkeeping runs on the host
        code_N = self._codes(keys, classes)
        self._forget_pruned(code_N)
        out = torch.empty(tokens.shape[0], device=device)
        # Free rides: pairs already scored on at least these tokens.
        free = torch.zeros(len(code_N), dtype=torch.bool)
        for b, pos, row in self._by_batch(code_N):
            batch = self.batches[b]
            if batch.tokens_NL.shape[1] < n_tok:
                continue
            same = (batch.tokens_NL[row, :n_tok] == tokens_NL[pos]).all(1)
            pos, row = pos[same], row[same]
            out[upload(pos, device)] = batch.logp(row, n_tok).sum(-1)
            free[pos] = True
        # The longest usable cached prefix of each other pair: its own sample first, then the clean one.
        start = torch.zeros(len(code_N), dtype=torch.long)
        src_batch, src_row = torch.full_like(start, -1), torch.zeros_like(start)
        for cand in (code_N, _clean(code_N)):
            for b, pos, row in self._by_batch(cand, ~free):
                batch = self.batches[b]
                if batch.cache is None:
                    continue
                limit = min(batch.cache.num_tokens, n_tok)
                usable = shared_scales(batch.tokens_NL[row, :limit], tokens_NL[pos, :limit], ends[:num_scales - 1])
                better = usable > start[pos]
                pos = pos[better]
                start[pos], src_batch[pos], src_row[pos] = usable[better], b, row[better]
        keep = min(keep_tokens, n_tok)
        keep = keep if self._fits(len(tokens), keep) else 0
        todo = ~free
        for s in torch.unique(start[todo]).tolist():
            idx = (todo & (start == s)).nonzero().squeeze(1)
            cache, prefix = self._gather(src_batch[idx], src_row[idx], s) if s else (None, None)
            res = self.model.score_pairs(tokens_NL[idx], classes[idx], num_scales, self.chunk, cache, keep > 0, keep)
            self._count(len(idx), n_tok, s, code_N[idx])
            sums = res.logp.sum(-1)
            out[upload(idx, device)] = sums + prefix.sum(-1) if prefix is not None else sums
            logp_NL = torch.cat((prefix, res.logp), 1) if prefix is not None else res.logp
            self._add(code_N[idx], _Batch(tokens_NL[idx], logp_NL, res.cache))
        self._drop_unused()
        return out

    def score_fp32(self, tokens: torch.Tensor, classes: torch.Tensor, num_scales: int) -> torch.Tensor:
        """Like a plain :meth:`score`, in fp32 whatever the model's dtype (the precision guard's re-scoring)."""
        return self.model.score_pairs(tokens, classes, num_scales, self.chunk, dtype=torch.float32).logp.sum(-1)

    def executed(self, image: Hashable) -> Macs:
        """What the rows of one image (its key in ``score``'s ``keys``) executed since the last reset."""
        return self.image_macs.get(self.images.get(image, -1), Macs())

    def _count(self, rows: int, end: int, start: int, code_N: torch.Tensor | None = None) -> None:
        pair = sequence_macs(self.model.spec.var, end, start)
        self.tokens_run += rows * (end - start)
        self.macs = self.macs + pair * rows
        if code_N is not None:
            image_N, n_N = torch.unique(code_N >> _IMAGE_SHIFT, return_counts=True)
            for img, n in zip(image_N.tolist(), n_N.tolist()):
                self.image_macs[img] = self.image_macs.get(img, Macs()) + pair * n

    def _fits(self, rows: int, n_tok: int) -> bool:
        spec = self.model.spec.var
        return rows * spec.depth * 2 * n_tok * spec.embed_dim * self.model.dtype.itemsize <= self.cache_bytes

    def _codes(self, keys: Sequence[Key], classes: torch.Tensor) -> torch.Tensor:
        """Each row's code (image, sample, class); the one pass over rows in Python, a dict look-up each."""
        images = self.images
        image_N = torch.tensor([images.setdefault(img, len(images)) for img, _ in keys], dtype=torch.long)
        sample_N = torch.tensor([j for _, j in keys], dtype=torch.long)
        return image_N << _IMAGE_SHIFT | sample_N << _SAMPLE_SHIFT | classes.to(torch.long)

    def _by_batch(self, code_N: torch.Tensor, where: torch.Tensor | None = None):
        """For each batch holding some of these codes: (batch, positions in ``code_N``, rows in the batch)."""
        if not len(self.codes_M):
            return
        i = torch.searchsorted(self.codes_M, code_N).clamp(max=len(self.codes_M) - 1)
        found = self.codes_M[i] == code_N
        if where is not None:
            found &= where
        batch_N, row_N = self.batch_M[i], self.row_M[i]
        for b in torch.unique(batch_N[found]).tolist():
            pos = (found & (batch_N == b)).nonzero().squeeze(1)
            yield b, pos, row_N[pos]

    def _gather(self, batch_N: torch.Tensor, row_N: torch.Tensor, num_tokens: int) -> tuple[KVCache, torch.Tensor]:
        """Keys/values and log-probs of the first ``num_tokens`` tokens of these batch rows, in order: one
        index_select per source batch."""
        caches, prefixes, order = [], [], []
        for b in torch.unique(batch_N).tolist():
            pos = (batch_N == b).nonzero().squeeze(1)
            batch = self.batches[b]
            assert batch.cache is not None   # a prefix is only taken from a batch that kept its keys/values
            caches.append(_select(batch.cache.truncate(num_tokens), row_N[pos]))
            prefixes.append(batch.logp(row_N[pos], num_tokens))
            order.append(pos)
        if len(caches) == 1:
            return caches[0], prefixes[0]
        back = torch.argsort(torch.cat(order))
        return _select(KVCache.cat(caches), back), torch.cat(prefixes)[upload(back, prefixes[0].device)]

    def _add(self, code_N: torch.Tensor, batch: _Batch) -> None:
        """Record a scored batch: its rows become the latest entries of their codes."""
        b, self.next_batch = self.next_batch, self.next_batch + 1
        self.batches[b] = batch
        old = ~torch.isin(self.codes_M, code_N)
        codes = torch.cat((self.codes_M[old], code_N))
        order = torch.argsort(codes, stable=True)
        self.codes_M = codes[order]
        self.batch_M = torch.cat((self.batch_M[old], torch.full_like(code_N, b)))[order]
        self.row_M = torch.cat((self.row_M[old], torch.arange(len(code_N))))[order]

    def _forget_pruned(self, code_N: torch.Tensor) -> None:
        """Drop entries of classes an image no longer asks for (candidates only shrink from stage to stage), and
        compact the survivors' keys/values so the pruned rows' memory is freed (one index_select per batch)."""
        elsewhere = ~torch.isin(self.codes_M >> _IMAGE_SHIFT, code_N >> _IMAGE_SHIFT)
        keep = elsewhere | torch.isin(_clean(self.codes_M), _clean(code_N))
        self.codes_M, self.batch_M, self.row_M = self.codes_M[keep], self.batch_M[keep], self.row_M[keep]
        self._drop_unused()
        for b, batch in self.batches.items():
            mine = (self.batch_M == b).nonzero().squeeze(1)
            if batch.cache is None or len(mine) == len(batch.tokens_NL):
                continue
            rows = self.row_M[mine].sort().values
            self.batches[b] = _Batch(batch.tokens_NL[rows], batch.logp(rows, batch.logp_NL.shape[1]),
                                     _select(batch.cache, rows))
            new_row = torch.empty(len(batch.tokens_NL), dtype=torch.long)
            new_row[rows] = torch.arange(len(rows))
            self.row_M[mine] = new_row[self.row_M[mine]]

    def _drop_unused(self) -> None:
        """Free the batches no entry points to any more (every row pruned or scored again)."""
        used = set(torch.unique(self.batch_M).tolist())
        self.batches = {b: batch for b, batch in self.batches.items() if b in used}
