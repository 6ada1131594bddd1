"""A VAR block's work as module-free functions: the linear layers (bias and GELU in the matmul's epilogue where the
backend has one), q/k normalisation, AdaLN modulation, residual adds and the whole block step. Module-free, so one
compiled graph serves every block, batch and length (:class:`CompiledBlock`), and the attention mask of a forward
is built once (:class:`AttentionPlan`). Shapes: B batch, L tokens, C width, H heads."""
from __future__ import annotations

import collections
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .specs import VARSpec

log = logging.getLogger("avarc")
GRAPHS_PER_VARIANT = 2  # a variant compiles one graph; the second is a margin, never expected
HEAD_ROWS = 2   # the AdaLN rows before the head, first in a class table: 1 + scale, shift
MOD_ROWS = 6    # a block's AdaLN rows in a class table: γ1, γ2, 1 + s1, 1 + s2, b1, b2


def _norm_modulate(x: torch.Tensor, scale1: torch.Tensor, shift: torch.Tensor, eps: float,
                   dtype: torch.dtype) -> torch.Tensor:
    """A branch's input: LN(x)·(1 + scale) + shift, in the branch's dtype (``scale1`` holds 1 + scale)."""
    return _modulate(F.layer_norm(x, x.shape[-1:], eps=eps), scale1, shift, dtype)


def _residual(x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """x + γ·branch in x's dtype. A low-precision branch is cast first: on a CPU an addcmul of mixed dtypes runs ~4×
    slower than the cast and a same-dtype addcmul together."""
    return torch.addcmul(x, branch.to(x.dtype), gamma)


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
    except (AttributeError, RuntimeError):
        return False
    return _linear_pointwise_runs(torch.bfloat16)


@lru_cache(maxsize=1)
def onednn_fp32() -> bool:
    """Whether fp32 linears go through oneDNN: on AMD CPUs, where ATen's fp32 GEMM (MKL) takes its AVX2 path. On an
    EPYC Zen 4 oneDNN ran d16's fp32 GEMMs in half ATen's time (capped at AVX2, in 0.8–1.0× MKL's), fc1's GELU in
    the same call; on Intel MKL's own fp32 GEMM was the faster, so ATen's stays there."""
    try:
        amd = "AuthenticAMD" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return amd and torch.backends.mkldnn.is_available() and _linear_pointwise_runs(torch.float32)


def _linear_pointwise_runs(dtype: torch.dtype) -> bool:
    """One tiny oneDNN linear + GELU(tanh) in ``dtype`` runs without raising."""
    try:
        x, w = torch.ones(2, 16, dtype=dtype), torch.ones(8, 16, dtype=dtype)
        torch.ops.mkldnn._linear_pointwise(x, w, None, "gelu", [], "tanh")
    except (AttributeError, RuntimeError):
        return False
    return True


def _onednn(dtype: torch.dtype) -> bool:
    return onednn_bf16() if dtype == torch.bfloat16 else dtype == torch.float32 and onednn_fp32()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """F.linear, then GELU(tanh) if asked. For CPU inference in bf16 or fp32, where oneDNN can run it
    (:func:`onednn_bf16`, :func:`onednn_fp32`), it is one oneDNN call (the kernel torch's own compiler emits for a
    frozen linear) with the bias and the GELU in the matmul's epilogue: ATen would copy the broadcast bias into the
    output before the GEMM and run GELU as a separate pass. On CUDA, ``_addmm_activation`` puts bias and GELU(tanh)
    in cuBLASLt's epilogue (on a CPU that call computes the erf GELU, so not there). The official tanh approximation
    either way. Under autograd (add-class) or the compiler, ATen's."""
    if (x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and _onednn(weight.dtype)):
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


def _unit_qk(y: torch.Tensor, factor: torch.Tensor, floor: bool) -> torch.Tensor:
    """y (B, L, 3, H, c) with q and k normalised over c and multiplied by ``factor`` (2, H, 1), in three ops: the
    fp32 norm, one factor per row (the fp32 quotient written in y's dtype: on a CPU a same-dtype multiply runs ~7×
    faster than a mixed one) and one multiply, into y in place when running eagerly (no new buffer), functionally
    under the compiler or autograd. ``floor`` clamps the norm at 1e-12 as F.normalize does, so a zero vector stays
    zero. Only a head with all-zero weights gives zero vectors for every input (``SelfAttention.constants`` looks
    once); elsewhere an exact zero takes every one of c sums to cancel, and the clamp would be a pass per block for
    nothing."""
    qk = y[:, :, :2]
    norm = torch.linalg.vector_norm(qk, dim=-1, keepdim=True, dtype=torch.float32)
    if floor:    # out of place: add-class trains through the blocks, and autograd keeps the norm
        norm = norm.clamp_min(1e-12)
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return torch.cat((qk * torch.div(factor, norm).to(y.dtype), y[:, :, 2:]), 2)
    r = torch.div(factor, norm, out=norm.new_empty(norm.shape, dtype=y.dtype))   # the fp32 quotient, rounded once
    torch.mul(qk, r, out=qk)
    return y


def _attention_per_scale(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         spans: tuple[tuple[int, int, int], ...], scale: float) -> torch.Tensor:
    """One attention call per scale (queries lo … hi−1 over the first n keys) → B, L, H, c."""
    return torch.cat([F.scaled_dot_product_attention(q[:, :, lo:hi], k[:, :, :n], v[:, :, :n], scale=scale)
                      .transpose(1, 2) for lo, hi, n in spans], 1)


def block_step(x: torch.Tensor, mod: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor,
               factor: torch.Tensor | None, floor: bool, w_proj: torch.Tensor, b_proj: torch.Tensor, w1: torch.Tensor,
               b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, mask: torch.Tensor | BlockMask | None,
               spans: tuple[tuple[int, int, int], ...] | None, kv: torch.Tensor | None, start: int, eps: float,
               heads: int, scale: float) -> torch.Tensor:
    """One block, module-free (so one compiled graph serves every block, batch and length): x (B, L, C) fp32
    residual stream of tokens start … start+L−1, ``mod`` its B, 6, C AdaLN rows (γ1, γ2, 1 + s1, 1 + s2, b1, b2).
    ``kv`` (B, ≥ start+L, 2, H, c), if given, holds the earlier tokens' keys/values and receives the new ones; else
    the keys are the new tokens' own. One attention call whatever the number of scales (``mask``: dense, or a
    :class:`BlockMask` for FlexAttention's block-sparse kernel), or with ``spans`` one per scale (see
    :class:`AttentionPlan`). Only the linear layers run in their weights' dtype: the norm, the AdaLN modulation and
    the residual adds stay fp32 (in bf16, 1 + scale has steps of 1/128, which alone moves a 512-pixel model's class
    scores by several nats)."""
    B, L, C = x.shape
    dtype = w_qkv.dtype
    g1, g2, s1, s2, sh1, sh2 = mod.split(1, dim=1)      # no closure: a cell variable confuses dynamo's guards
    y = linear(_norm_modulate(x, s1, sh1, eps, dtype), w_qkv, b_qkv).view(B, L, 3, heads, C // heads)
    if factor is not None:
        y = _unit_qk(y, factor, floor)
    if kv is not None:
        kv[:, start:start + L].copy_(y[:, :, 1:])
        keys = kv[:, :start + L]
    else:
        keys = y[:, :, 1:]
    q, k, v = y[:, :, 0].transpose(1, 2), keys[:, :, 0].transpose(1, 2), keys[:, :, 1].transpose(1, 2)
    if isinstance(mask, BlockMask):
        # q in a B, L, H, c buffer of its own: inductor's CPU template reads q's sizes off its base buffer (a 5-d y
        # fails), and the output takes q's layout, so the projection reads it without a copy
        q = y[:, :, 0].contiguous().transpose(1, 2)
        a = flex_attention(q, k, v, block_mask=mask, scale=scale).transpose(1, 2)
    elif spans is None:
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)
    else:
        a = _attention_per_scale(q, k, v, spans, scale)
    x = _residual(x, linear(a.reshape(B, L, C), w_proj, b_proj), g1)
    h = linear(_norm_modulate(x, s2, sh2, eps, dtype), w1, b1, gelu=True)
    return _residual(x, linear(h, w2, b2), g2)


def _specialised(a: object) -> object:
    """The part of one argument a dynamic graph is specialised on (see :meth:`CompiledBlock.variant`)."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a._base is not None, a.storage_offset() == 0, tuple(n == 1 for n in a.shape)
    if isinstance(a, int) and not isinstance(a, bool):
        return min(a, 2)
    if isinstance(a, BlockMask):     # its tensors are inputs like any other: which block counts are 1
        return "BlockMask", a.BLOCK_SIZE, tuple(n == 1 for n in a.kv_indices.shape)
    return a


class CompiledBlock:
    """:func:`block_step` compiled with ``fullgraph=True`` (a graph break is an error, not a silent split), dynamic
    in batch, length and start, one compiled callable per variant of the step (dtype; keys/values kept or not; a
    mask or none; the per-scale spans), each with its own recompile budget (``isolate_recompiles``), so one variant,
    dtype or model never spends another's. A variant compiles one graph; ``GRAPHS_PER_VARIANT`` bounds it, and
    exceeding it is a failure like any other. If compiling or running the compiled code fails (no compiler,
    unsupported backend, the budget spent) one warning says so and that variant runs eagerly from then on, counted
    in ``fallbacks``; running out of memory is raised, never taken for a compiler failure. ``graphs`` counts the
    graphs compiled and ``runs`` the calls that ran compiled code: the evidence a compiled row carries."""

    def __init__(self, backend: str | Callable = "inductor"):
        self.backend = backend
        self.fns: dict[tuple, Callable] = {}
        self.failed: set[tuple] = set()
        self.graphs: collections.Counter[tuple] = collections.Counter()
        self._ids: set = set()                       # dynamo's compile ids seen (frame, compile count)
        self.runs = 0
        self.fallbacks = 0

    @staticmethod
    def variant(args: tuple) -> tuple:
        """What the compiler specialises a graph on, read off :func:`block_step`'s arguments: per tensor its dtype,
        whether it is a view, whether its storage offset is 0 and which sizes are 1; which optional inputs are
        None; ints only as 0, 1 or other; everything else (floats, flags, spans) by value. Each variant then
        compiles one graph that serves every batch, length and start."""
        return tuple(_specialised(a) for a in args)

    def _compile(self, key: tuple) -> Callable:
        inner = torch._dynamo.lookup_backend(self.backend) if isinstance(self.backend, str) else self.backend

        def counting(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
            cid = torch._guards.CompileContext.current_compile_id()   # a restarted analysis keeps its id: one graph
            assert cid is not None                  # a backend is called inside a compile
            if (cid.frame_id, cid.frame_compile_id) not in self._ids:
                self._ids.add((cid.frame_id, cid.frame_compile_id))
                self.graphs[key] += 1
            compiled = inner(gm, example_inputs)

            def run(*a):
                self.runs += 1
                return compiled(*a)
            return run
        return torch.compile(  # type: ignore[call-overload]  # torch.compile takes these; its overloads omit them
            block_step, fullgraph=True, dynamic=True, backend=counting,
            recompile_limit=GRAPHS_PER_VARIANT, isolate_recompiles=True)

    def __call__(self, args: tuple) -> torch.Tensor:
        key = self.variant(args)
        if key not in self.failed:
            fn = self.fns.get(key)
            if fn is None:
                fn = self.fns[key] = self._compile(key)
            try:
                return fn(*args)
            except Exception as e:  # inductor/triton raise many types; eager is always right
                if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
                    raise
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                log.warning(f"compiling the blocks failed, running them uncompiled (eager) from now on: "
                            f"{type(e).__name__}: {first}")
                self.failed.add(key)
        self.fallbacks += 1
        return block_step(*args)

    def evidence(self) -> dict[str, int]:
        """``graphs`` compiled, ``recompiles`` (graphs beyond a variant's first) and ``fallbacks`` (block calls run
        eagerly because compiling failed)."""
        graphs = sum(self.graphs.values())
        return {"graphs": graphs, "recompiles": graphs - len(self.graphs), "fallbacks": self.fallbacks}


MASK_ALIGN = 16    # memory-efficient SDPA wants a mask's row stride a multiple of 16, else it pads it on every call
# Where a compiled step runs FlexAttention. Not on a CPU: d16's attention (B 4, 680 tokens, EPYC Zen 4, 1 thread) took
# 0.98–1.09× the compiled masked SDPA's time in fp32 and 1.28–1.37× in bf16 (the per-scale calls: 0.65–0.74×).
FLEX_DEVICES = {"cuda"}
# FlexAttention's sparse block (queries × keys): CUDA's default tiles for bf16 at head width 64 are 128 × 128; on a CPU
# (tests) 32, the fastest of 32/64/128 there (d16: 321 of 484 tiles issued, 87% of their scores useful).
FLEX_BLOCK = {"cpu": 32}
FLEX_BLOCK_DEFAULT = 128


class AttentionPlan:
    """Block-causal attention of tokens start … end−1 over keys 0 … end−1, shared by every block. ``one_call``: one
    attention call whatever the number of scales, its masks built once per (start, end, device) (the dense one once
    per dtype too); None where the new tokens are one scale (they see every key). A compiled step on a device in
    ``FLEX_DEVICES`` gets a :class:`BlockMask` (:meth:`block_mask`): FlexAttention's kernel skips the tiles no query
    sees and masks only those a scale boundary cuts. Eager, FlexAttention runs an unfused reference (5–8× slower),
    and on a CPU its compiled kernel did not beat the masked SDPA, so every other step gets the additive mask (0
    where a query's scale is at least the key's, −inf elsewhere) for SDPA, its rows padded in memory so that no call
    re-pads it (SDPA's memory-efficient kernel would, for a 91-key mask, on every call). Else one call per scale
    (``split``): where nothing is launched (an eager CPU) the masked call only adds work, since it computes the
    masked-out part too (1.5–1.7× the per-scale calls' time on d16)."""

    def __init__(self, spec: VARSpec, start: int, end: int, device: torch.device, one_call: bool = True):
        self.spec, self.start, self.end, self.device = spec, start, end, device
        self.spans = spec.attention_spans(end, start)
        self.split = tuple(self.spans) if not one_call and len(self.spans) > 1 else None
        self._masks: dict[torch.dtype, torch.Tensor | None] = {}
        self._bool = None
        self._block: BlockMask | None = None
        if len(self.spans) > 1 and self.split is None:
            keep = torch.zeros(end - start, end, dtype=torch.bool)
            for lo, hi, keys in self.spans:
                keep[lo:hi, :keys] = True
            self._bool = keep.to(device)

    def mask(self, dtype: torch.dtype, compiled: bool = False) -> torch.Tensor | BlockMask | None:
        """The mask a block step takes: the :meth:`block_mask` if the step is ``compiled`` on a device in
        ``FLEX_DEVICES``, else the additive one."""
        if self._bool is None:
            return None
        if compiled and self.device.type in FLEX_DEVICES:
            return self.block_mask()
        m = self._masks.get(dtype)
        if m is None:      # rows padded to a multiple of MASK_ALIGN keys: the fused GPU kernels take it as it is
            rows, keys = self._bool.shape
            m = torch.zeros(rows, -(-keys // MASK_ALIGN) * MASK_ALIGN, dtype=dtype, device=self.device)[:, :keys]
            self._masks[dtype] = m.masked_fill_(~self._bool, float("-inf"))
        return m

    def block_mask(self) -> BlockMask:
        """The block-causal mask as FlexAttention's :class:`BlockMask`, built on first use: query q sees the keys
        0 … ends[start + q]−1 (``ends``: where each token's scale ends). ``ends`` and ``start`` are tensors of fixed
        size marked static: the compiled graph takes them as inputs, so one graph serves every geometry, and the
        mask's kernel code has no symbolic size (the CPU template renames the symbol of its key-split size by text,
        which corrupts any symbol sharing the prefix, e.g. ks27 for ks2)."""
        assert self._bool is not None, "one scale of new tokens needs no mask"
        if self._block is None:
            rows, keys = self._bool.shape
            ends = torch.tensor([n for lo, hi, n in self.spec.attention_spans(self.spec.seq_len)
                                 for _ in range(lo, hi)], device=self.device)
            start = torch.tensor([self.start], device=self.device)
            torch._dynamo.mark_static(ends)
            torch._dynamo.mark_static(start)

            def keep(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
                return kv < ends[start[0] + q]
            self._block = create_block_mask(keep, None, None, rows, keys, device=self.device,
                                            BLOCK_SIZE=FLEX_BLOCK.get(self.device.type, FLEX_BLOCK_DEFAULT))
        return self._block
