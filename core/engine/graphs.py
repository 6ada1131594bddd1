"""CUDA graphs of the engine's small forwards, for bucketed row counts (``--cuda-graphs``; off by default).

A forward of few rows (the precision guard's re-scores, a last stage's survivors, one image) is bound by kernel
launches on a GPU, not by its FLOPs; a CUDA graph replays the whole forward with one launch. A graph fixes shapes and
addresses, so one is captured per (engine, tokens, row bucket, kept tokens), with static input buffers: a chunk of n
rows runs in the graph of the smallest power of two ≥ n, its rows copied in, the padding rows (whatever tokens and
classes the buffers last held: real ones) computed and dropped. Only forwards from the first token of at most
:data:`MAX_GRAPH_TOKENS` (bucket rows × tokens) are graphed: larger ones are bound by compute (and each graph keeps its
buffers: d16's keys/values of 8192 tokens take 512 MiB), and a continuation would first copy its cache into a static
buffer. Graphs of one engine share one memory pool; an engine whose weights or added classes
change gets new ones.

Nothing is captured unless ``capture``: :class:`ForwardGraphs` with ``capture=False`` runs the same buckets and
buffers eagerly, which is how a CPU tests the bucketing (the CLI refuses ``--cuda-graphs`` off CUDA).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..models.quantizer import MultiScaleQuantizer
from ..models.var import VAR
from ..models.var_state import KVCache

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

Head = Callable[[VAR, torch.Tensor, torch.Tensor], torch.Tensor]    # (engine, B, L, C states, B, L targets) → B, L

MAX_GRAPH_TOKENS = 8192
WARMUP_CALLS = 2        # eager calls on a side stream before capture (plans, masks, constants, cuBLAS workspaces)


def bucket(rows: int) -> int:
    """The row count a forward of ``rows`` rows runs at: the next power of two."""
    return 1 << (rows - 1).bit_length()


@dataclass
class _Forward:
    """One bucket's static buffers and the forward between them (captured as ``graph``, or run as ``run``)."""

    tokens_RL: torch.Tensor
    class_R: torch.Tensor
    mods_RMC: torch.Tensor
    logp_RL: torch.Tensor
    cache: KVCache | None
    run: Callable[[], None] | None = None
    graph: torch.cuda.CUDAGraph | None = None

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            assert self.run is not None
            self.run()


class ForwardGraphs:
    """The graphed forwards of a model's engines (see the module docstring)."""

    def __init__(self, capture: bool = True):
        self.capture = capture
        self.built = 0                     # bucket forwards built so far (captured as graphs when ``capture``)
        self._held: weakref.WeakKeyDictionary[VAR, tuple[tuple, dict[tuple, _Forward]]] = weakref.WeakKeyDictionary()
        self._pool: _POOL_HANDLE | None = None              # the memory pool all graphs share

    @staticmethod
    def fits(rows: int, start: int, end: int, mods: torch.Tensor | None) -> bool:
        """Whether a forward of ``rows`` rows over tokens ``start`` … ``end``−1 runs graphed (from the first token,
        small, its AdaLN rows from the class table)."""
        return start == 0 and bucket(rows) * end <= MAX_GRAPH_TOKENS and mods is not None

    def forward(self, var: VAR, quantizer: MultiScaleQuantizer, head: Head, tokens_NL: torch.Tensor,
                class_N: torch.Tensor, mods_NMC: torch.Tensor, keep_tokens: int | None) -> tuple[torch.Tensor,
                                                                                                 KVCache | None]:
        """N rows' log-probs (N, L; ``head``: the engine's target log-probs of final states) and, with
        ``keep_tokens``, their keys/values of the first ``keep_tokens`` tokens, from the bucket's graph: views of its
        static outputs, valid until its next replay (copy them out)."""
        N, L = tokens_NL.shape
        f = self._bucket(var, quantizer, head, L, bucket(N), keep_tokens, mods_NMC)
        f.tokens_RL[:N].copy_(tokens_NL)
        f.class_R[:N].copy_(class_N)
        f.mods_RMC[:N].copy_(mods_NMC)
        f.replay()
        return f.logp_RL[:N], f.cache.rows(0, N) if f.cache is not None else None

    def _bucket(self, var: VAR, quantizer: MultiScaleQuantizer, head: Head, L: int, R: int,
                keep_tokens: int | None, mods_NMC: torch.Tensor) -> _Forward:
        version = (id(var.extra_class_emb), tuple(p._version for p in var.parameters()))
        held = self._held.get(var)
        if held is None or held[0] != version:             # new weights or classes: the old graphs read stale ones
            held = self._held[var] = (version, {})
        key = (L, R, keep_tokens)
        if key not in held[1]:
            held[1][key] = self._build(var, quantizer, head, L, R, keep_tokens, mods_NMC)
            self.built += 1
        return held[1][key]

    def _build(self, var: VAR, quantizer: MultiScaleQuantizer, head: Head, L: int, R: int,
               keep_tokens: int | None, mods_NMC: torch.Tensor) -> _Forward:
        device = mods_NMC.device
        f = _Forward(torch.zeros(R, L, dtype=torch.long, device=device),
                     torch.zeros(R, dtype=torch.long, device=device),
                     torch.zeros(R, *mods_NMC.shape[1:], dtype=mods_NMC.dtype, device=device),
                     torch.empty(R, L, device=device),
                     KVCache.empty(var.spec, R, keep_tokens, var.compute_dtype, device) if keep_tokens else None)

        def run() -> None:
            h, _ = var.hidden(f.class_R, quantizer.var_input(f.tokens_RL), None, f.cache is not None, f.mods_RMC,
                              f.cache)
            f.logp_RL.copy_(head(var, h, f.tokens_RL))

        if not self.capture:
            f.run = run
            return f
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        f.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(f.graph, pool=self._pool):
            run()
        self._pool = f.graph.pool()
        return f
