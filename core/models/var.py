"""The VAR transformer: class-conditioned next-scale prediction with AdaLN blocks.

Tokens of all scales form one sequence of length L = Σ p_k²; attention is block-causal over scales (a token
sees every token of its own and earlier scales), so the log-probs of a forward truncated to the first s scales
equal the first Σ_{k<s} p_k² columns of a full forward. Parameter names match the official ``var_dNN.pth``.
Shapes: B batch, L tokens, C width, H heads, V vocabulary.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .specs import VARSpec

MAX_SCALE_MUL = float(torch.tensor(100.0).log())   # the clamp, computed in fp32 as the official code does
Span = tuple[int, int, int]   # see VARSpec.attention_spans


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

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, C = x.shape
        w = self.mat_qkv.weight
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias)).to(w.dtype)
        q, k, v = linear(x, w, bias).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.l2_norm:
            scale_1H11 = self.scale_mul_1H11.float().clamp_max(MAX_SCALE_MUL).exp()
            q, k = _unit(q, scale_1H11), _unit(k)
        return q, k, v   # each B, H, L, c, in the weights' dtype

    def forward(self, x: torch.Tensor, spans: list[Span],
                past: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x holds the new tokens; ``past`` the keys/values of the tokens before them. Each span's queries attend to
        its keys prefix without a mask, so the masked half of the score matrix is never computed. Returns the output
        and the keys/values of all tokens so far (for a later extension). q, k, v and the cache are all in the
        weights' dtype, so no span re-casts its key/value prefix."""
        B, L, C = x.shape
        q, k, v = self.qkv(x)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        scale = 1.0 if self.l2_norm else 0.25 / math.sqrt(self.head_dim)
        out_BLHc = q.new_empty(B, L, self.heads, self.head_dim)   # spans write here: no cat, no transpose copy
        for lo, hi, keys in spans:
            out_BLHc[:, lo:hi] = F.scaled_dot_product_attention(q[:, :, lo:hi], k[:, :, :keys], v[:, :, :keys],
                                                                scale=scale).transpose(1, 2)
        return linear(out_BLHc.view(B, L, C), self.proj.weight, self.proj.bias), (k, v)


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(C, hidden)
        self.fc2 = nn.Linear(hidden, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fc2(GELU(fc1(x))), GELU in its tanh form as in the official model (see :func:`linear`)."""
        return linear(linear(x, self.fc1.weight, self.fc1.bias, gelu=True), self.fc2.weight, self.fc2.bias)


class AdaLNSelfAttn(nn.Module):
    """x += γ1·attn(LN(x)(1+s1)+b1); x += γ2·ffn(LN(x)(1+s2)+b2), with the six AdaLN vectors from the class
    embedding (own projection) or, in the shared variant, a per-block offset ``ada_gss`` on a shared projection."""

    def __init__(self, C: int, heads: int, hidden: int, shared_aln: bool, l2_norm: bool, eps: float):
        super().__init__()
        self.C, self.shared_aln = C, shared_aln
        self.attn = SelfAttention(C, heads, l2_norm)
        self.ffn = FFN(C, hidden)
        self.ln_wo_grad = nn.LayerNorm(C, eps=eps, elementwise_affine=False)
        self.fused = False                      # elementwise work by fused_ops() (see VAR.compiled)
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """B, C class embedding (or B, 1, 6, C shared projection) → B, 1, 6, C (γ1, γ2, s1, s2, b1, b2)."""
        if self.shared_aln:
            return self.ada_gss + cond
        return self.ada_lin(cond).view(-1, 1, 6, self.C)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, spans: list[Span],
                past: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x is the fp32 residual stream. Only the linear layers run in their weights' dtype: the norm, the AdaLN
        modulation and the residual adds stay fp32 (in bf16, 1 + scale has steps of 1/128, which alone moves a
        512-pixel model's class scores by several nats)."""
        g1, g2, s1, s2, b1, b2 = self.modulation(cond).float().unbind(2)
        ops, eps, dtype = fused_ops() if self.fused else EAGER_OPS, self.ln_wo_grad.eps, self.attn.mat_qkv.weight.dtype
        a, kv = self.attn(ops.norm_modulate(x, s1, b1, eps, dtype), spans, past)
        x, h = ops.residual_norm_modulate(x, a, g1, s2, b2, eps, dtype)
        return ops.residual(x, self.ffn(h), g2), kv


def _norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float,
                   dtype: torch.dtype) -> torch.Tensor:
    """A branch's input: LN(x)·(1 + scale) + shift, in the branch's dtype."""
    return _modulate(F.layer_norm(x, x.shape[-1:], eps=eps), scale, shift, dtype)


def _residual(x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """x + γ·branch in x's dtype. A low-precision branch is cast first: on a CPU an addcmul of mixed dtypes runs ~4×
    slower than the cast and a same-dtype addcmul together."""
    return torch.addcmul(x, branch.to(x.dtype), gamma)


def _residual_norm_modulate(x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor, scale: torch.Tensor,
                            shift: torch.Tensor, eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention branch added, and the MLP branch's input made from the result."""
    x = _residual(x, branch, gamma)
    return x, _norm_modulate(x, scale, shift, eps, dtype)


class BlockOps(NamedTuple):
    """The elementwise work between a block's matmuls; the same functions for every block (module-free, so one
    compiled graph serves all blocks, batches and lengths)."""

    norm_modulate: Callable
    residual_norm_modulate: Callable
    residual: Callable


EAGER_OPS = BlockOps(_norm_modulate, _residual_norm_modulate, _residual)


@lru_cache(maxsize=1)
def fused_ops() -> BlockOps:
    """:data:`EAGER_OPS` compiled by ``torch.compile`` (each a single fused loop, e.g. norm statistics, modulation
    and the cast in one pass), built on first use."""
    return BlockOps(*(_Fused(fn) for fn in EAGER_OPS))


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
    separate pass. The official tanh approximation either way."""
    if (x.device.type == "cpu" and weight.dtype in ONEDNN_DTYPES and not torch.is_grad_enabled()
            and onednn_bf16()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                                  "tanh" if gelu else "")
    y = F.linear(x, weight, bias)
    return torch.ops.aten.gelu_(y, approximate="tanh") if gelu else y   # in place: one buffer fewer to fault in


def _unit(t: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """F.normalize over the last dim, times ``scale`` if given: one multiply by a per-row factor (fp32, cast once)
    instead of a division and a second multiplication pass."""
    factor = torch.linalg.vector_norm(t, dim=-1, keepdim=True, dtype=torch.float32).clamp_min(1e-12).reciprocal()
    if scale is not None:
        factor = factor * scale
    return t * factor.to(t.dtype)


def _modulate(n_BLC: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """shift + n·(1 + scale) computed in fp32 and written once, straight in ``dtype`` (one pass: no fp32
    intermediate and no separate cast). With autograd on (add-class trains class rows) ``out=`` is not allowed, so
    the same values come from a cast."""
    if torch.is_grad_enabled():
        return torch.addcmul(shift, n_BLC, scale.add(1)).to(dtype)
    return torch.addcmul(shift, n_BLC, scale.add(1), out=n_BLC.new_empty(n_BLC.shape, dtype=dtype))


class _Fused:
    """A function compiled on first use, or the function itself once compiling or running the compiled code fails
    (no compiler, unsupported backend)."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, torch.compile(fn, dynamic=True)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception:  # noqa: BLE001 (inductor/triton raise many types; eager is always right)
                self.compiled = None
        return self.fn(*args)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)
        return _modulate(self.ln_wo_grad(x), scale, shift, x.dtype)


@dataclass
class KVCache:
    """Keys and values (B, H, n, c) of the first n tokens in every block, for extending a sequence to more scales."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def num_tokens(self) -> int:
        return self.kv[0][0].shape[2]

    def select(self, rows: torch.Tensor) -> KVCache:
        return KVCache([(k[rows], v[rows]) for k, v in self.kv])

    def truncate(self, num_tokens: int) -> KVCache:
        return KVCache([(k[:, :, :num_tokens], v[:, :, :num_tokens]) for k, v in self.kv])

    @staticmethod
    def cat(caches: list[KVCache]) -> KVCache:
        return KVCache([(torch.cat([c.kv[i][0] for c in caches]), torch.cat([c.kv[i][1] for c in caches]))
                        for i in range(len(caches[0].kv))])


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
            AdaLNSelfAttn(C, spec.num_heads, hidden, spec.shared_aln, spec.attn_l2_norm, spec.norm_eps) for _ in range(spec.depth)
        )
        self.head_nm = AdaLNBeforeHead(C, spec.norm_eps)
        self.head = nn.Linear(C, spec.vocab_size)
        self.extra_class_emb: nn.Parameter | None = None   # n, slots, C: classes added by extensions
        self._levels: dict[torch.device, torch.Tensor] = {}

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

    def hidden(self, class_idx: torch.Tensor, x_in: torch.Tensor, cache: KVCache | None = None,
               keep_cache: bool = False) -> tuple[torch.Tensor, KVCache | None]:
        """Run the blocks over the first L' = x_in.shape[1] + first_l tokens → final normalised states (before the
        head) of the tokens not already in ``cache`` (B, L'−cache.num_tokens, C), and with ``keep_cache`` the
        keys/values of all L' tokens. Block-causal attention makes the cached prefix exact, not an approximation."""
        x, conds = self.embed(class_idx, x_in)
        start = cache.num_tokens if cache is not None else 0
        x = x[:, start:].contiguous()     # one layout for every call: compiled blocks need no recompiles
        spans = self.spec.attention_spans(start + x.shape[1], start)
        if self.extra_class_emb is None:        # every slot holds the class's one row: project it once
            block_conds = [self.shared_ada_lin(conds[:, 1])] * len(self.blocks)
        else:
            block_conds = [self.shared_ada_lin(conds[:, 1 + i]) for i in range(len(self.blocks))]
        kvs = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, block_conds[i], spans, cache.kv[i] if cache is not None else None)
            if keep_cache:
                kvs.append(kv)
        return self.head_nm(x.float(), conds[:, -1].float()), (KVCache(kvs) if keep_cache else None)

    def forward(self, class_idx: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits B, L', V for the first L' = x_in.shape[1] + first_l tokens."""
        h, _ = self.hidden(class_idx, x_in)
        return self.head(h).float()

    def compiled(self) -> VAR:
        """This VAR with every block's elementwise work fused by ``torch.compile`` (see :func:`fused_ops`); the
        inductor cache lives under $XDG_CACHE_HOME/avarc, so a second run reuses the generated code."""
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "avarc" / "inductor"
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
        for b in self.blocks:
            b.fused = True
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
