"""The VAR transformer: class-conditioned next-scale prediction with AdaLN blocks.

Tokens of all scales form one sequence of length L = Σ p_k²; attention is block-causal over scales (a token
sees every token of its own and earlier scales), so the log-probs of a forward truncated to the first s scales
equal the first Σ_{k<s} p_k² columns of a full forward. Parameter names match the official ``var_dNN.pth``.
Shapes: B batch, L tokens, C width, H heads, V vocabulary.
"""
from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .specs import VARSpec

log = logging.getLogger("avarc")

MAX_SCALE_MUL = float(torch.tensor(100.0).log())   # the clamp, computed in fp32 as the official code does


class SelfAttention(nn.Module):
    """Multi-head attention; with ``attn_l2_norm`` q and k are unit vectors and q is scaled per head by a learned
    exp(scale_mul) ≤ 100 (the official VAR recipe)."""

    def __init__(self, C: int, heads: int, l2_norm: bool):
        super().__init__()
        self.heads, self.head_dim, self.l2_norm = heads, C // heads, l2_norm
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        if l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
        self.proj = nn.Linear(C, C)
        self._constants: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None

    def constants(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The qkv bias (q, 0, v) in the weights' dtype and the q/k factor (2, H, 1: exp(scale_mul) for q, 1 for k),
        made once per weights rather than in every forward; remade when a parameter changes (or under autograd)."""
        params = [self.q_bias, self.v_bias, self.mat_qkv.weight] + ([self.scale_mul_1H11] if self.l2_norm else [])
        key = tuple((p._version, p.dtype, p.device) for p in params)
        if self._constants is None or self._constants[0] != key or torch.is_grad_enabled():
            w = self.mat_qkv.weight
            bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias)).to(w.dtype)
            factor = None
            if self.l2_norm:
                scale_H = self.scale_mul_1H11.float().clamp_max(MAX_SCALE_MUL).exp().view(self.heads, 1)
                factor = torch.stack((scale_H, torch.ones_like(scale_H)))
            self._constants = (key, bias, factor)
        return self._constants[1], self._constants[2]

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, C) → q, k, v each B, H, L, c in the weights' dtype, q and k normalised and scaled."""
        B, L, _ = x.shape
        bias, factor = self.constants()
        y = linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.heads, self.head_dim)
        q, k, v = (_unit_qk(y, factor) if factor is not None else y).permute(2, 0, 3, 1, 4)
        return q, k, v

    def scale(self) -> float:
        return 1.0 if self.l2_norm else 0.25 / math.sqrt(self.head_dim)


def _unit_qk(y: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """y (B, L, 3, H, c) with q and k normalised over c and multiplied by ``factor`` (2, H, 1), as F.normalize
    does (the norm clamped at 1e-12), with one fp32 factor per row cast once; written into y in place when
    running eagerly (no new buffer), functionally under the compiler."""
    qk = y[:, :, :2]
    # out of place: add-class trains through the blocks, and autograd keeps the norm
    norm = torch.linalg.vector_norm(qk, dim=-1, keepdim=True, dtype=torch.float32).clamp_min(1e-12)
    r = torch.div(factor, norm).to(y.dtype)
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return torch.cat((qk * r, y[:, :, 2:]), 2)
    torch.mul(qk, r, out=qk)
    return y


def block_step(x: torch.Tensor, mod: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor,
               factor: torch.Tensor | None, w_proj: torch.Tensor, b_proj: torch.Tensor, w1: torch.Tensor,
               b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, mask: torch.Tensor | None,
               kv: torch.Tensor | None, start: int, eps: float, heads: int, scale: float) -> torch.Tensor:
    """One block, module-free (so one compiled graph serves every block, batch and length): x (B, L, C) fp32
    residual stream of tokens start … start+L−1, ``mod`` its B, 6, C AdaLN rows (γ1, γ2, 1 + s1, 1 + s2, b1,
    b2). ``kv`` (B, ≥ start+L, 2, H, c), if given, holds the earlier tokens' keys/values and receives the new
    ones; else the keys are the new tokens' own. One attention call whatever the number of scales (``mask``).
    Only the linear layers run in their weights' dtype: the norm, the AdaLN modulation and the residual adds stay
    fp32 (in bf16, 1 + scale has steps of 1/128, which alone moves a 512-pixel model's class scores by several
    nats)."""
    B, L, C = x.shape
    dtype = w_qkv.dtype
    g1, g2, s1, s2, sh1, sh2 = (mod[:, i:i + 1] for i in range(MOD_ROWS))
    y = linear(_norm_modulate(x, s1, sh1, eps, dtype), w_qkv, b_qkv).view(B, L, 3, heads, C // heads)
    if factor is not None:
        y = _unit_qk(y, factor)
    if kv is not None:
        kv[:, start:start + L].copy_(y[:, :, 1:])
        keys = kv[:, :start + L]
    else:
        keys = y[:, :, 1:]
    a = F.scaled_dot_product_attention(y[:, :, 0].transpose(1, 2), keys[:, :, 0].transpose(1, 2),
                                       keys[:, :, 1].transpose(1, 2), attn_mask=mask, scale=scale)
    x = _residual(x, linear(a.transpose(1, 2).reshape(B, L, C), w_proj, b_proj), g1)
    h = linear(_norm_modulate(x, s2, sh2, eps, dtype), w1, b1, gelu=True)
    return _residual(x, linear(h, w2, b2), g2)


class CompiledBlock:
    """:func:`block_step` compiled once per dtype with ``fullgraph=True`` (a graph break is an error, not a silent
    split), dynamic in batch and length. If compiling or running the compiled code fails (no compiler, unsupported
    backend) one warning says so and the blocks run eagerly from then on; running out of memory is raised, never
    taken for a compiler failure."""

    def __init__(self, backend: str = "inductor"):
        self.backend = backend
        self.fns: dict[torch.dtype, Callable] = {}
        self.failed = False

    def __call__(self, args: tuple) -> torch.Tensor:
        if not self.failed:
            dtype = args[2].dtype
            fn = self.fns.get(dtype)
            if fn is None:
                fn = self.fns[dtype] = torch.compile(block_step, fullgraph=True, dynamic=True, backend=self.backend)
            try:
                return fn(*args)
            except Exception as e:  # inductor/triton raise many types; eager is always right
                if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
                    raise
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                log.warning(f"compiling the blocks failed, running them uncompiled: {type(e).__name__}: {first}")
                self.failed = True
        return block_step(*args)


class AttentionPlan:
    """Block-causal attention of tokens start … end−1 over keys 0 … end−1 as one call: an additive mask (0 where a
    query's scale is at least the key's, −inf elsewhere), built once per (start, end, dtype, device) and shared by
    every block; None where the new tokens are a single scale (they see every key)."""

    def __init__(self, spec: VARSpec, start: int, end: int, device: torch.device):
        self.start, self.end, self.device = start, end, device
        self.spans = spec.attention_spans(end, start)
        self._masks: dict[torch.dtype, torch.Tensor | None] = {}
        self._bool = None
        if len(self.spans) > 1:
            keep = torch.zeros(end - start, end, dtype=torch.bool)
            for lo, hi, keys in self.spans:
                keep[lo:hi, :keys] = True
            self._bool = keep.to(device)

    def mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        if self._bool is None:
            return None
        m = self._masks.get(dtype)
        if m is None:
            m = torch.zeros(self._bool.shape, dtype=dtype, device=self.device).masked_fill_(~self._bool, float("-inf"))
            self._masks[dtype] = m
        return m


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(C, hidden)
        self.fc2 = nn.Linear(hidden, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fc2(GELU(fc1(x))), GELU in its tanh form as in the official model (see :func:`linear`)."""
        return linear(linear(x, self.fc1.weight, self.fc1.bias, gelu=True), self.fc2.weight, self.fc2.bias)


MOD_ROWS = 6    # a block's AdaLN rows in a class table: γ1, γ2, 1 + s1, 1 + s2, b1, b2


class AdaLNSelfAttn(nn.Module):
    """x += γ1·attn(LN(x)(1+s1)+b1); x += γ2·ffn(LN(x)(1+s2)+b2), with the six AdaLN vectors from the class
    embedding (own projection) or, in the shared variant, a per-block offset ``ada_gss`` on a shared projection."""

    def __init__(self, C: int, heads: int, hidden: int, shared_aln: bool, l2_norm: bool, eps: float):
        super().__init__()
        self.C, self.shared_aln = C, shared_aln
        self.attn = SelfAttention(C, heads, l2_norm)
        self.ffn = FFN(C, hidden)
        self.ln_wo_grad = nn.LayerNorm(C, eps=eps, elementwise_affine=False)
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """B, C class embedding (or B, 1, 6, C shared projection) → B, 6, C fp32 rows γ1, γ2, 1 + s1, 1 + s2, b1, b2
        (the ones added here, once per class rather than in every forward)."""
        if self.shared_aln:
            m = (self.ada_gss + cond).float().view(-1, 6, self.C)
        else:
            m = self.ada_lin(cond).float().view(-1, 6, self.C)
        one = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0], device=m.device).view(1, 6, 1)
        return m + one

    def step_args(self, x: torch.Tensor, mod: torch.Tensor, plan: AttentionPlan, kv: torch.Tensor | None) -> tuple:
        """The arguments of :func:`block_step` for this block."""
        at, f = self.attn, self.ffn
        bias, factor = at.constants()
        return (x, mod, at.mat_qkv.weight, bias, factor, at.proj.weight, at.proj.bias, f.fc1.weight, f.fc1.bias,
                f.fc2.weight, f.fc2.bias, plan.mask(at.mat_qkv.weight.dtype), kv, plan.start, self.ln_wo_grad.eps,
                at.heads, at.scale())

    def forward(self, x: torch.Tensor, mod: torch.Tensor, plan: AttentionPlan,
                kv: torch.Tensor | None = None) -> torch.Tensor:
        """x is the fp32 residual stream of the plan's new tokens, ``mod`` this block's B, 6, C rows
        (:meth:`modulation`); see :func:`block_step`."""
        return block_step(*self.step_args(x, mod, plan, kv))


def _norm_modulate(x: torch.Tensor, scale1: torch.Tensor, shift: torch.Tensor, eps: float,
                   dtype: torch.dtype) -> torch.Tensor:
    """A branch's input: LN(x)·(1 + scale) + shift, in the branch's dtype (``scale1`` holds 1 + scale)."""
    return _modulate(F.layer_norm(x, x.shape[-1:], eps=eps), scale1, shift, dtype)


def _residual(x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """x + γ·branch in x's dtype. A low-precision branch is cast first: on a CPU an addcmul of mixed dtypes runs ~4×
    slower than the cast and a same-dtype addcmul together."""
    return torch.addcmul(x, branch.to(x.dtype), gamma)


ONEDNN_DTYPES = (torch.bfloat16,)   # in fp32 ATen's MKL GEMM is faster than oneDNN's, which cancels the fusion
EMULATED_ENV = "AVARC_CPU_BF16"      # "emulated": take the plain path as on a CPU without native bf16 (tests, A/B)


@lru_cache(maxsize=1)
def onednn_bf16() -> bool:
    """Whether oneDNN runs bf16 linears on this CPU. ``mkldnn.is_available()`` only says the library is built in;
    on an AVX2-only CPU oneDNN has no bf16 kernel and ``_linear_pointwise`` raises, while ATen's ``F.linear`` still
    runs bf16 (emulated). So: the capability check, then one tiny call, decided once per process."""
    if os.environ.get(EMULATED_ENV) == "emulated" or not torch.backends.mkldnn.is_available():
        return False
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        x, w = torch.ones(2, 16, dtype=torch.bfloat16), torch.ones(8, 16, dtype=torch.bfloat16)
        torch.ops.mkldnn._linear_pointwise(x, w, None, "gelu", [], "tanh")
    except (AttributeError, RuntimeError):
        return False
    return True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """F.linear, then GELU(tanh) if asked. For CPU inference in bf16, where oneDNN can run it (:func:`onednn_bf16`),
    it is one oneDNN call (the kernel torch's own compiler emits for a frozen linear) with the bias and the GELU in
    the matmul's epilogue: ATen would copy the broadcast bias into the output before the GEMM and run GELU as a
    separate pass. On CUDA, ``_addmm_activation`` puts bias and GELU(tanh) in cuBLASLt's epilogue (on a CPU that
    call computes the erf GELU, so not there). The official tanh approximation either way."""
    if (x.device.type == "cpu" and weight.dtype in ONEDNN_DTYPES and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and onednn_bf16()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                                  "tanh" if gelu else "")
    if gelu and bias is not None and x.device.type == "cuda" and not torch.is_grad_enabled():
        out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
        return out.view(*x.shape[:-1], weight.shape[0])
    y = F.linear(x, weight, bias)
    return torch.ops.aten.gelu_(y, approximate="tanh") if gelu else y   # in place: one buffer fewer to fault in


def _modulate(n_BLC: torch.Tensor, scale1: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """shift + n·scale1 computed in fp32 and written once, straight in ``dtype`` (one pass: no fp32 intermediate
    and no separate cast). With autograd on (add-class trains class rows) ``out=`` is not allowed, so the same
    values come from a cast."""
    if dtype == n_BLC.dtype or torch.is_grad_enabled():
        return torch.addcmul(shift, n_BLC, scale1).to(dtype)
    return torch.addcmul(shift, n_BLC, scale1, out=n_BLC.new_empty(n_BLC.shape, dtype=dtype))


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """B, C class embedding → B, 2, C fp32 rows 1 + scale, shift."""
        m = self.ada_lin(cond).float().view(-1, 2, self.C)
        return m + torch.tensor([1.0, 0.0], device=m.device).view(1, 2, 1)

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        return _modulate(self.ln_wo_grad(x), mod[:, :1], mod[:, 1:], x.dtype)


@dataclass
class KVCache:
    """Keys and values of the first n tokens in every block, for extending a sequence to more scales: per block one
    B, n, 2, H, c buffer holding only keys and values (never the queries' share of the projection)."""

    bufs: list[torch.Tensor]

    @classmethod
    def empty(cls, spec: VARSpec, rows: int, num_tokens: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        """Preallocated buffers that forwards fill in place (chunk by chunk, prefix and new tokens)."""
        H = spec.num_heads
        return cls([torch.empty(rows, num_tokens, 2, H, spec.embed_dim // H, dtype=dtype, device=device)
                    for _ in range(spec.depth)])

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
    """Every AdaLN row of the classes asked for so far (fp32, computed once per engine): per block γ1, γ2, 1 + s1,
    1 + s2, b1, b2, then the head's 1 + scale, shift, so a forward gathers its rows' modulation instead of
    projecting per row and block. Classes are computed in fixed blocks of ids (:data:`TABLE_BLOCK`), so a class's
    rows are the same bits whichever classes were asked for first."""

    def __init__(self, num_ids: int, device: torch.device):
        self.num_ids, self.blocks = num_ids, []
        self.rows: torch.Tensor | None = None                               # n, depth·6 + 2, C
        self.slot = torch.zeros(num_ids, dtype=torch.long, device=device)   # class id → row of ``rows``

    @property
    def ids(self) -> list[int]:
        return [i for b in self.blocks for i in range(b * TABLE_BLOCK, min((b + 1) * TABLE_BLOCK, self.num_ids))]

    @torch.no_grad()
    def add(self, var: VAR, ids: list[int]) -> None:
        """Compute the blocks of ``ids`` not held yet."""
        for b in sorted({i // TABLE_BLOCK for i in ids} - set(self.blocks)):
            block = torch.arange(b * TABLE_BLOCK, min((b + 1) * TABLE_BLOCK, self.num_ids), device=self.slot.device)
            rows = var.modulations(var.conditions(block))
            held = 0 if self.rows is None else self.rows.shape[0]
            self.slot[block] = torch.arange(held, held + len(block), device=self.slot.device)
            self.rows = rows if self.rows is None else torch.cat((self.rows, rows))
            self.blocks.append(b)

    def lookup(self, class_idx: torch.Tensor) -> torch.Tensor:
        return self.rows[self.slot[class_idx]]


TABLE_BLOCK = 64


class SharedAdaLin(nn.Linear):
    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return super().forward(cond).view(-1, 1, 6, self.out_features // 6)


class VAR(nn.Module):
    def __init__(self, spec: VARSpec):
        super().__init__()
        self.spec = spec
        C, pn = spec.embed_dim, spec.patch_nums
        self.first_l, self.L = pn[0] ** 2, spec.seq_len
        self.word_embed = nn.Linear(spec.z_channels, C)
        self.class_emb = nn.Embedding(spec.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.L, C))
        self.lvl_embed = nn.Embedding(len(pn), C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C)) if spec.shared_aln else nn.Identity()
        hidden = round(C * spec.mlp_ratio)
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(C, spec.num_heads, hidden, spec.shared_aln, spec.attn_l2_norm, spec.norm_eps)
            for _ in range(spec.depth)
        )
        self.head_nm = AdaLNBeforeHead(C, spec.norm_eps)
        self.head = nn.Linear(C, spec.vocab_size)
        self.extra_class_emb: nn.Parameter | None = None   # n, slots, C: classes added by extensions
        self._levels: dict[torch.device, torch.Tensor] = {}
        self._plans: dict[tuple, AttentionPlan] = {}
        self._table: tuple[tuple, ClassTable] | None = None
        self.block_fn: Callable | None = None               # the compiled block (see :meth:`compiled`)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the blocks' linear layers (and so attention and the caches) run in; see :meth:`in_dtype`."""
        return self.blocks[0].ffn.fc1.weight.dtype if len(self.blocks) else torch.float32

    @property
    def num_slots(self) -> int:
        """Places a class enters the network: the start token, each block's AdaLN, the AdaLN before the head."""
        return self.spec.depth + 2

    @property
    def num_extra_classes(self) -> int:
        return 0 if self.extra_class_emb is None else self.extra_class_emb.shape[0]

    @property
    def num_classes(self) -> int:
        """Base classes plus added ones; the null class is id ``num_classes``."""
        return self.spec.num_classes + self.num_extra_classes

    def add_classes(self, rows: torch.Tensor) -> None:
        """Append new classes: rows (n, slots, C), or (n, C) for the same row in every slot. A base class has one
        embedding row used in every slot; an added class has its own row per slot, which gives a frozen network far
        more room to fit a class it never saw. They are kept apart from the checkpoint's ``class_emb`` so the base
        weights, and every base class's likelihood, stay bit-identical. Ids: base 0…K−1, new K…K+n−1, and the null
        class moves to K+n (as if the model had been built with K+n classes)."""
        rows = rows.to(self.class_emb.weight)
        if rows.ndim == 2:
            rows = rows.unsqueeze(1).expand(-1, self.num_slots, -1)
        extra = rows.clone() if self.extra_class_emb is None else torch.cat((self.extra_class_emb.data, rows))
        self.extra_class_emb = nn.Parameter(extra, requires_grad=False)

    def conditions(self, class_idx: torch.Tensor) -> torch.Tensor:
        """Class ids (B,) → B, slots, C class embeddings; id ``num_classes`` is the null (unconditional) class."""
        K, B = self.spec.num_classes, class_idx.shape[0]
        n = self.num_extra_classes
        base_idx = torch.where(class_idx >= K + n, class_idx - n, class_idx) if n else class_idx
        base = F.embedding(base_idx.clamp_max(K), self.class_emb.weight).unsqueeze(1).expand(B, self.num_slots, -1)
        if not n:
            return base
        added = (class_idx >= K) & (class_idx < K + n)
        extra = self.extra_class_emb[(class_idx - K).clamp(0, n - 1)]
        return torch.where(added[:, None, None], extra, base)

    def levels(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """Scale index of each of the first num_tokens tokens (derived, so never stored in a checkpoint; built once
        per device, so a forward needs no host-to-device copy or output-size sync for it)."""
        lvl_L = self._levels.get(device)
        if lvl_L is None:
            sizes = [p * p for p in self.spec.patch_nums]
            lvl_L = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(device)
            self._levels[device] = lvl_L
        return lvl_L[:num_tokens]

    def embed(self, class_idx: torch.Tensor, x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class ids (B,) and teacher-forcing input (B, L'−1, Cvae) → token states (B, L', C) and the class
        embeddings (B, slots, C)."""
        conds = self.conditions(class_idx)
        B, n = class_idx.shape[0], x_in.shape[1] + self.first_l
        sos = conds[:, :1].expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1)
        x = torch.cat((sos, self.word_embed(x_in.float())), dim=1)
        return x + self.lvl_embed(self.levels(n, x.device)).unsqueeze(0) + self.pos_1LC[:, :n], conds

    def modulations(self, conds: torch.Tensor) -> torch.Tensor:
        """B, slots, C class embeddings → B, depth·6 + 2, C fp32 AdaLN rows (every block's six, then the head's
        two); differentiable, so training reaches the class rows through it."""
        if self.extra_class_emb is None:        # every slot holds the class's one row: project it once
            block_conds = [self.shared_ada_lin(conds[:, 1])] * len(self.blocks)
        else:
            block_conds = [self.shared_ada_lin(conds[:, 1 + i]) for i in range(len(self.blocks))]
        rows = [b.modulation(c) for b, c in zip(self.blocks, block_conds)]
        return torch.cat(rows + [self.head_nm.modulation(conds[:, -1])], 1)

    def class_table(self, ids: list[int]) -> ClassTable:
        """The engine's AdaLN table holding (at least) these classes; made anew only when a weight or the added
        classes change."""
        key = (id(self.extra_class_emb), tuple(p._version for p in self.parameters()))
        if self._table is None or self._table[0] != key:
            self._table = None                                   # free the old table first
            self._table = (key, ClassTable(self.num_classes + 1, self.class_emb.weight.device))
        self._table[1].add(self, ids)
        return self._table[1]

    def plan(self, start: int, end: int, device: torch.device) -> AttentionPlan:
        """The attention plan of tokens start … end−1 (kept per device: masks are built once)."""
        key = (start, end, device)
        if key not in self._plans:
            self._plans[key] = AttentionPlan(self.spec, start, end, device)
        return self._plans[key]

    def hidden(self, class_idx: torch.Tensor, x_in: torch.Tensor, cache: KVCache | None = None,
               keep_cache: bool = False, mods: torch.Tensor | None = None,
               cache_out: KVCache | None = None) -> tuple[torch.Tensor, KVCache | None]:
        """Run the blocks over the first L' = x_in.shape[1] + first_l tokens → final normalised states (before the
        head) of the tokens not already in ``cache`` (B, L'−cache.num_tokens, C), and with ``keep_cache`` the
        keys/values of all L' tokens (written into ``cache_out`` if given, a preallocated share of a larger cache).
        ``mods``: the rows' AdaLN rows from a :class:`ClassTable` (else projected here). Block-causal attention
        makes the cached prefix exact, not an approximation."""
        x, conds = self.embed(class_idx, x_in)
        B, end = x.shape[0], x.shape[1]
        start = cache.num_tokens if cache is not None else 0
        x = x[:, start:].contiguous()     # one layout for every call: compiled blocks need no recompiles
        mods = self.modulations(conds) if mods is None else mods
        plan = self.plan(start, end, x.device)
        if cache_out is None and (keep_cache or cache is not None):
            cache_out = KVCache.empty(self.spec, B, end, self.compute_dtype, x.device)
        block_fn = self.block_fn if self.block_fn is not None and not torch.is_grad_enabled() else None
        for i, block in enumerate(self.blocks):
            kv = None
            if cache_out is not None:
                kv = cache_out.bufs[i]
                if cache is not None:
                    kv[:, :start].copy_(cache.bufs[i][:, :start])
            mod = mods[:, MOD_ROWS * i:MOD_ROWS * (i + 1)]
            x = block(x, mod, plan, kv) if block_fn is None else block_fn(block.step_args(x, mod, plan, kv))
        return self.head_nm(x, mods[:, -2:]), (cache_out if keep_cache else None)

    def forward(self, class_idx: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits B, L', V for the first L' = x_in.shape[1] + first_l tokens."""
        h, _ = self.hidden(class_idx, x_in)
        return self.head(h).float()

    def compiled(self, backend: str = "inductor") -> VAR:
        """This VAR with every block run by one compiled graph (see :class:`CompiledBlock`); the inductor cache lives
        under $XDG_CACHE_HOME/avarc, so a second run reuses the generated code."""
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "avarc" / "inductor"
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
        self.block_fn = CompiledBlock(backend)
        return self

    def in_dtype(self, dtype: torch.dtype) -> VAR:
        """A copy for inference in ``dtype``, converted once: the blocks' token-wise linear layers (qkv, proj, MLP:
        98% of the FLOPs) and so the attention and the key/value caches in ``dtype``; embeddings, norms, the AdaLN
        projections (once per sequence), the residual stream, the head and its logits stay fp32 (cheap, and where
        bf16's rounding would show)."""
        if dtype == torch.float32:
            return self
        low = copy.deepcopy(self)
        for b in low.blocks:
            for m in (b.attn.mat_qkv, b.attn.proj, b.ffn.fc1, b.ffn.fc2):
                m.to(dtype)
        return low.eval().requires_grad_(False)

    @torch.no_grad()
    def init_weights(self, init_std: float | None = None, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5,
                     init_head: float = 0.02) -> None:
        """The official training initialisation (truncated normal, small AdaLN gains, scaled residual projections)."""
        std = init_std if init_std is not None else math.sqrt(1 / self.spec.embed_dim / 3)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        self.head.weight.mul_(init_head)
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        C, depth = self.spec.embed_dim, self.spec.depth
        for b in self.blocks:
            b.attn.proj.weight.div_(math.sqrt(2 * depth))
            b.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            if b.shared_aln:
                b.ada_gss[:, :, 2:].mul_(init_adaln)
                b.ada_gss[:, :, :2].mul_(init_adaln_gamma)
            else:
                b.ada_lin[-1].weight[2 * C:].mul_(init_adaln)
                b.ada_lin[-1].weight[:2 * C].mul_(init_adaln_gamma)
