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
from pathlib import Path
from typing import Callable, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from .block_ops import HEAD_ROWS, MOD_ROWS, AttentionPlan, CompiledBlock, _modulate, _unit_qk, block_step, linear
from .specs import VARSpec
from .var_state import ClassTable, KVCache

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
        self._constants: tuple[tuple, torch.Tensor, torch.Tensor | None, bool] | None = None

    def constants(self) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """The qkv bias (q, 0, v) in the weights' dtype, the q/k factor (2, H, 1: exp(scale_mul) for q, 1 for k) and
        whether a head's q or k is zero for every input (all-zero weight rows and bias: the norm then needs
        F.normalize's floor), made once per weights rather than in every forward; remade when a parameter changes
        (or under autograd)."""
        params = [self.q_bias, self.v_bias, self.mat_qkv.weight] + ([self.scale_mul_1H11] if self.l2_norm else [])
        key = tuple((p._version, p.dtype, p.device) for p in params)
        cached = self._constants if self._constants is not None and self._constants[0] == key else None
        if cached is None or torch.is_grad_enabled():
            w = self.mat_qkv.weight
            bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias)).to(w.dtype)
            factor, dead = None, False
            if self.l2_norm:
                scale_H = self.scale_mul_1H11.float().clamp_max(MAX_SCALE_MUL).exp().view(self.heads, 1)
                factor = torch.stack((scale_H, torch.ones_like(scale_H)))
                if cached is not None:   # under autograd only the tensors are remade; the check waits for the device
                    dead = cached[3]
                else:
                    C = w.shape[1]
                    zero_w = (w[:2 * C] == 0).view(2, self.heads, -1).all(-1)
                    zero_b = (bias[:2 * C] == 0).view(2, self.heads, -1).all(-1)
                    dead = bool((zero_w & zero_b).any())
            cached = self._constants = (key, bias, factor, dead)
        return cached[1:]

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, C) → q, k, v each B, H, L, c in the weights' dtype, q and k normalised (zero vectors stay zero,
        as F.normalize keeps them) and scaled."""
        B, L, _ = x.shape
        bias, factor, _ = self.constants()
        y = linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.heads, self.head_dim)
        q, k, v = (_unit_qk(y, factor, True) if factor is not None else y).permute(2, 0, 3, 1, 4)
        return q, k, v

    def scale(self) -> float:
        return 1.0 if self.l2_norm else 0.25 / math.sqrt(self.head_dim)


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

    def step_args(self, x: torch.Tensor, mod: torch.Tensor, plan: AttentionPlan, kv: torch.Tensor | None,
                  compiled: bool = False) -> tuple:
        """The arguments of :func:`block_step` for this block (``compiled``: for the compiled step)."""
        at, f = self.attn, self.ffn
        bias, factor, dead = at.constants()
        return (x, mod, at.mat_qkv.weight, bias, factor, dead, at.proj.weight, at.proj.bias, f.fc1.weight, f.fc1.bias,
                f.fc2.weight, f.fc2.bias, plan.mask(at.mat_qkv.weight.dtype, compiled), plan.split, kv, plan.start,
                self.ln_wo_grad.eps, at.heads, at.scale())

    def forward(self, x: torch.Tensor, mod: torch.Tensor, plan: AttentionPlan,
                kv: torch.Tensor | None = None) -> torch.Tensor:
        """x is the fp32 residual stream of the plan's new tokens, ``mod`` this block's B, 6, C rows
        (:meth:`modulation`); see :func:`block_step`."""
        return block_step(*self.step_args(x, mod, plan, kv))


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
        # torch's ModuleList does not say its items' type: declared here, so self.blocks[i].attn is typed
        self.blocks: list[AdaLNSelfAttn] = nn.ModuleList(  # type: ignore[assignment]
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
        # One attention call per forward (True), one per scale (False), or None: one call on a GPU or compiled,
        # one per scale on an eager CPU (see AttentionPlan).
        self.one_attention_call: bool | None = None

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
        if not n or self.extra_class_emb is None:
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
        """B, slots, C class embeddings → B, 2 + depth·6, C fp32 AdaLN rows (the head's two, then every block's six);
        differentiable, so training reaches the class rows through it. The head's rows come first so that no
        block's rows start at offset 0: a compiled graph specialises a view at offset 0, which would compile the
        first block apart from the others."""
        if self.extra_class_emb is None:        # every slot holds the class's one row: project it once
            block_conds = [self.shared_ada_lin(conds[:, 1])] * len(self.blocks)
        else:
            block_conds = [self.shared_ada_lin(conds[:, 1 + i]) for i in range(len(self.blocks))]
        rows = [b.modulation(c) for b, c in zip(self.blocks, block_conds)]
        return torch.cat([self.head_nm.modulation(conds[:, -1])] + rows, 1)

    def class_table(self, ids: list[int]) -> ClassTable:
        """The engine's AdaLN table holding (at least) these classes; made anew only when a weight or the added
        classes change."""
        key = (id(self.extra_class_emb), tuple(p._version for p in self.parameters()))
        if self._table is None or self._table[0] != key:
            self._table = None                                   # free the old table first
            self._table = (key, ClassTable(self.num_classes + 1, self.class_emb.weight.device))
        self._table[1].add(self, ids)
        return self._table[1]

    def plan(self, start: int, end: int, device: torch.device, one_call: bool = True) -> AttentionPlan:
        """The attention plan of tokens start … end−1 (kept per device: masks are built once)."""
        key = (start, end, device, one_call)
        if key not in self._plans:
            self._plans[key] = AttentionPlan(self.spec, start, end, device, one_call)
        return self._plans[key]

    def hidden(self, class_idx: torch.Tensor, x_in: torch.Tensor, cache: KVCache | None = None,
               keep_cache: bool = False, mods: torch.Tensor | None = None,
               cache_out: KVCache | None = None) -> tuple[torch.Tensor, KVCache | None]:
        """Run the blocks over the first L' = x_in.shape[1] + first_l tokens → final normalised states (before the
        head) of the tokens not already in ``cache`` (B, L'−cache.num_tokens, C), and with ``keep_cache`` the
        keys/values of the first ``cache_out.num_tokens`` tokens (all L' if no ``cache_out`` is given; else written
        into it, e.g. a preallocated share of a larger cache). ``mods``: the rows' AdaLN rows from a
        :class:`ClassTable` (else projected here). Block-causal attention makes the cached prefix exact, not an
        approximation."""
        x, conds = self.embed(class_idx, x_in)
        B, end = x.shape[0], x.shape[1]
        start = cache.num_tokens if cache is not None else 0
        if start:                         # a fresh tensor every call (no view): compiled blocks need no recompiles
            x = x[:, start:].contiguous()
        mods = self.modulations(conds) if mods is None else mods
        block_fn = self.block_fn if self.block_fn is not None and not torch.is_grad_enabled() else None
        one_call = self.one_attention_call
        if one_call is None:      # launches cost on a GPU; a compiled graph wants one shape of work
            one_call = x.device.type != "cpu" or block_fn is not None
        plan = self.plan(start, end, x.device, one_call)
        if keep_cache and cache_out is None:
            cache_out = KVCache.empty(self.spec, B, end, self.compute_dtype, x.device)
        kept = cache_out if keep_cache else None
        # Attention reads every block's keys from one L'-token buffer. Kept whole, each block writes straight into
        # the kept cache; else one scratch buffer serves all blocks (not one fresh buffer per block; under autograd,
        # which saves each block's keys for its backward pass, one per block), and only the kept prefix is copied.
        work = None
        if (cache is not None or kept is not None) and (kept is None or kept.num_tokens != end):
            work = KVCache.empty(self.spec, B, end, self.compute_dtype, x.device,
                                 blocks=None if torch.is_grad_enabled() else 1).bufs
        for i, block in enumerate(self.blocks):
            kv = work[i % len(work)] if work is not None else kept.bufs[i] if kept is not None else None
            if cache is not None:
                assert kv is not None   # extending a cache always has a buffer: the scratch one or the kept cache
                kv[:, :start].copy_(cache.bufs[i][:, :start])
            mod = mods[:, HEAD_ROWS + MOD_ROWS * i:HEAD_ROWS + MOD_ROWS * (i + 1)]
            x = block(x, mod, plan, kv) if block_fn is None else block_fn(block.step_args(x, mod, plan, kv, True))
            if work is not None and kept is not None and kv is not None:   # kv is work's buffer here
                kept.bufs[i].copy_(kv[:, :kept.num_tokens])
        return self.head_nm(x, mods[:, :HEAD_ROWS]), kept

    def forward(self, class_idx: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits B, L', V for the first L' = x_in.shape[1] + first_l tokens."""
        h, _ = self.hidden(class_idx, x_in)
        return self.head(h).float()

    def compiled(self, block: CompiledBlock | None = None) -> VAR:
        """This VAR with every block run by compiled graphs (``block``, shared by a model's engine copies so an added
        class or a second dtype reuses what is compiled; a new :class:`CompiledBlock` if None); the inductor cache
        lives under $XDG_CACHE_HOME/avarc, so a second run reuses the generated code."""
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "avarc" / "inductor"
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
        self.block_fn = block if block is not None else CompiledBlock()
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
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.zero_()
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        self.head.weight.mul_(init_head)
        cast(nn.Linear, self.head_nm.ada_lin[-1]).weight.mul_(init_adaln)   # a Sequential's item is a Module
        C, depth = self.spec.embed_dim, self.spec.depth
        for b in self.blocks:
            b.attn.proj.weight.div_(math.sqrt(2 * depth))
            b.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            if b.shared_aln:
                b.ada_gss[:, :, 2:].mul_(init_adaln)
                b.ada_gss[:, :, :2].mul_(init_adaln_gamma)
            else:
                w = cast(nn.Linear, b.ada_lin[-1]).weight
                w[2 * C:].mul_(init_adaln)
                w[:2 * C].mul_(init_adaln_gamma)
