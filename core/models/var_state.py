"""What an engine keeps between forwards of a VAR: the keys and values of the tokens scored so far (only K and V, in
preallocated buffers) and the per-class AdaLN rows (computed once per class block)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .specs import VARSpec


class Conditioned(Protocol):
    """What a :class:`ClassTable` needs of its model (:class:`avarc.models.var.VAR`, which imports this module)."""

    def conditions(self, class_idx: torch.Tensor) -> torch.Tensor: ...

    def modulations(self, conds: torch.Tensor) -> torch.Tensor: ...


@dataclass
class KVCache:
    """Keys and values of the first n tokens in every block, for extending a sequence to more scales: per block one
    B, n, 2, H, c buffer holding only keys and values (never the queries' share of the projection)."""

    bufs: list[torch.Tensor]

    @classmethod
    def empty(cls, spec: VARSpec, rows: int, num_tokens: int, dtype: torch.dtype, device: torch.device,
              blocks: int | None = None) -> KVCache:
        """Preallocated buffers (one per block, or ``blocks`` of them) that forwards fill in place (chunk by chunk,
        prefix and new tokens)."""
        H = spec.num_heads
        return cls([torch.empty(rows, num_tokens, 2, H, spec.embed_dim // H, dtype=dtype, device=device)
                    for _ in range(spec.depth if blocks is None else blocks)])

    @property
    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per block (keys, values), each B, H, n, c (views)."""
        return [(b[:, :, 0].transpose(1, 2), b[:, :, 1].transpose(1, 2)) for b in self.bufs]

    @property
    def num_tokens(self) -> int:
        return self.bufs[0].shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the storage the cache keeps alive (a truncated or sliced view keeps all of its buffer)."""
        seen = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in self.bufs}
        return sum(seen.values())

    def select(self, rows: torch.Tensor | slice) -> KVCache:
        return KVCache([b[rows] for b in self.bufs])

    def truncate(self, num_tokens: int) -> KVCache:
        return KVCache([b[:, :num_tokens] for b in self.bufs])

    def rows(self, lo: int, hi: int) -> KVCache:
        """Rows lo … hi−1 as views (a chunk's share of a preallocated cache)."""
        return KVCache([b[lo:hi] for b in self.bufs])

    @staticmethod
    def cat(caches: list[KVCache]) -> KVCache:
        return KVCache([torch.cat([c.bufs[i] for c in caches]) for i in range(len(caches[0].bufs))])


class ClassTable:
    """Every AdaLN row of the classes asked for so far (fp32, computed once per engine): the head's 1 + scale, shift,
    then per block γ1, γ2, 1 + s1, 1 + s2, b1, b2, so a forward gathers its rows' modulation instead of
    projecting per row and block. Classes are computed in fixed blocks of ids (:data:`TABLE_BLOCK`), so a class's
    rows are the same bits whichever classes were asked for first."""

    def __init__(self, num_ids: int, device: torch.device):
        self.num_ids = num_ids
        self.blocks: list[int] = []                                         # blocks of TABLE_BLOCK ids held
        self.rows: torch.Tensor | None = None                               # n, 2 + depth·6, C
        self.slot = torch.zeros(num_ids, dtype=torch.long, device=device)   # class id → row of ``rows``

    @property
    def ids(self) -> list[int]:
        return [i for b in self.blocks for i in range(b * TABLE_BLOCK, min((b + 1) * TABLE_BLOCK, self.num_ids))]

    @torch.no_grad()
    def add(self, var: Conditioned, ids: list[int]) -> None:
        """Compute the blocks of ``ids`` not held yet."""
        for b in sorted({i // TABLE_BLOCK for i in ids} - set(self.blocks)):
            block = torch.arange(b * TABLE_BLOCK, min((b + 1) * TABLE_BLOCK, self.num_ids), device=self.slot.device)
            # Always TABLE_BLOCK rows (the tail padded with the last id): a GEMM's bits can depend on its row count
            # under several threads, and adding a class must not move an old class's rows.
            full = torch.arange(b * TABLE_BLOCK, (b + 1) * TABLE_BLOCK, device=self.slot.device).clamp_max(
                self.num_ids - 1)
            rows = var.modulations(var.conditions(full))[:len(block)]
            held = 0 if self.rows is None else self.rows.shape[0]
            self.slot[block] = torch.arange(held, held + len(block), device=self.slot.device)
            self.rows = rows if self.rows is None else torch.cat((self.rows, rows))
            self.blocks.append(b)

    def lookup(self, class_idx: torch.Tensor) -> torch.Tensor:
        assert self.rows is not None, "add the classes before looking them up"
        return self.rows[self.slot[class_idx]]


TABLE_BLOCK = 64
