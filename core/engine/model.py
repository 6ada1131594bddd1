"""A VQ-VAE + VAR pair on one device: the object the engine and every task work with (loading lives in
``core.io.loading``; the device, dtype and thread policy in ``core.engine.runtime``)."""
from __future__ import annotations

import copy
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..errors import AvarcError
from ..models.block_ops import CompiledBlock
from ..models.quantizer import exact_fp32
from ..models.specs import ModelSpec
from ..models.var import VAR
from ..models.var_state import KVCache
from ..models.vqvae import VQVAE
from . import tokenizer
from .graphs import ForwardGraphs
from .likelihood import PairScores, score_pairs
from .runtime import resolve_device


@dataclass
class Model:
    """VAE + VAR on one device. ``var`` keeps the fp32 weights; ``dtype`` is the compute dtype of the likelihood
    engine, which runs a copy converted once (:meth:`engine_var`). Tokenisation is always exact fp32 (TF32 off),
    so tokens do not depend on the dtype or the device."""

    spec: ModelSpec
    vae: VQVAE
    var: VAR
    device: torch.device
    dtype: torch.dtype = torch.float32
    budget_bytes: int | None = None            # activation memory per chunk; None: sized from the device
    meta: dict = field(default_factory=dict)
    # replaces the torch encoder (``onnx_encoder.use_encoder``)
    encoder: Callable[[torch.Tensor], torch.Tensor] | None = None

    # the core.tasks.incremental.Extension objects applied, bottom first
    extensions: list = field(default_factory=list)
    var_file: Path | None = None                                # the VAR checkpoint it was loaded from (its identity)
    vae_file: Path | None = None                                # the VQ-VAE checkpoint it was loaded from
    compile: bool = False                       # fuse the engine's elementwise work with torch.compile
    _engines: dict[torch.dtype, tuple[tuple, VAR]] = field(default_factory=dict, repr=False)
    compiled_block: CompiledBlock = field(default_factory=CompiledBlock, repr=False)   # shared by the engine copies
    graphs: ForwardGraphs | None = None         # CUDA graphs of small forwards (``--cuda-graphs``); None: off

    def engine_var(self, dtype: torch.dtype | None = None) -> VAR:
        """The VAR in the compute dtype (``self.dtype`` unless given): ``var`` itself for fp32, else a copy made
        once per dtype (the precision guard's fp32 and the run's bf16 live side by side) and remade only when
        ``var``'s weights or added classes change; with ``compile`` a fused copy (fp32 included, so ``var`` itself,
        which training uses, stays plain)."""
        dtype = dtype or self.dtype
        if dtype == torch.float32 and not self.compile:
            return self.var
        key = (self.device, self.compile, id(self.var.extra_class_emb),
               tuple(p._version for p in self.var.parameters()))
        held = self._engines.get(dtype)
        if held is None or held[0] != key:
            self._engines.pop(dtype, None)           # free the old copy before making the new one
            var = self.var.in_dtype(dtype) if dtype != torch.float32 else copy.deepcopy(self.var)
            self._engines[dtype] = (key, var.compiled(self.compiled_block) if self.compile else var)
        return self._engines[dtype][1]

    def compile_evidence(self) -> dict[str, int] | None:
        """``{graphs, recompiles, fallbacks}`` of the compiled engine so far (None when not compiled): what a compiled
        row carries as proof that it ran compiled."""
        return self.compiled_block.evidence() if self.compile else None

    @contextmanager
    def computing_in(self, dtype: torch.dtype) -> Iterator[Model]:
        """The likelihood engine in ``dtype`` for a ``with`` block (bench compares dtypes on one model)."""
        own, self.dtype = self.dtype, dtype
        try:
            yield self
        finally:
            self.dtype = own

    def set_encoder(self, encoder: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Run ``encode`` with another backend (None: the torch VQ-VAE)."""
        self.encoder = encoder

    @property
    def num_classes(self) -> int:
        """Base classes plus classes added by extensions (the null class is not counted)."""
        return self.var.num_classes

    @property
    def extension_names(self) -> list[str]:
        """Names of the classes added by extensions, in id order."""
        return [name for ext in self.extensions for name in ext.names]

    @property
    def null_class(self) -> int:
        return self.var.num_classes

    def class_name(self, idx: int) -> str:
        K = self.spec.var.num_classes
        if idx == self.null_class:
            return "null"
        if idx >= K:
            return self.extension_names[idx - K]
        names = self.spec.class_names
        return names[idx] if idx < len(names) else str(idx)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """B, 3, R, R in [-1, 1] → B, Cvae, h, w latent."""
        images = images.to(self.device, torch.float32)
        if self.encoder is not None:
            return self.encoder(images)
        return tokenizer.encode(self.vae, images)

    def tokenize_latent(self, latent: torch.Tensor) -> torch.Tensor:
        return tokenizer.tokenize_latent(self.vae, latent.to(self.device))

    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """B, 3, R, R in [-1, 1] → B, L token ids."""
        return self.tokenize_latent(self.encode(images))

    def pair_logp(self, tokens: torch.Tensor, class_idx: torch.Tensor, num_scales: int | None = None,
                  chunk: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """N, L tokens with one class each → N, L' per-token log-probs (fp32, on the host), computed in ``dtype``
        (default: the model's)."""
        return self.score_pairs(tokens, class_idx, num_scales, chunk, dtype=dtype).logp.cpu()

    def score_pairs(self, tokens: torch.Tensor, class_idx: torch.Tensor, num_scales: int | None = None,
                    chunk: int | None = None, cache: KVCache | None = None, keep_cache: bool = False,
                    keep_tokens: int | None = None, dtype: torch.dtype | None = None) -> PairScores:
        """Like :meth:`pair_logp`, but able to continue from cached keys/values of a shorter forward, and to keep
        those of the first ``keep_tokens`` tokens (all if None) for a later one; the log-probs stay on the device.
        With :attr:`graphs`, small forwards replay CUDA graphs."""
        with self._exact_if_fp32(dtype):
            return score_pairs(self.engine_var(dtype), self.vae.quantize, tokens, class_idx, num_scales, chunk,
                               self.budget_bytes, cache, keep_cache, keep_tokens, self.graphs)

    def _exact_if_fp32(self, dtype: torch.dtype | None) -> AbstractContextManager:
        """An fp32 engine (a run's or the precision guard's) runs as true fp32 whatever the caller's TF32/bf16
        precision settings (:func:`exact_fp32`)."""
        return exact_fp32() if (dtype or self.dtype) == torch.float32 else nullcontext()

    def token_logp(self, tokens: torch.Tensor, classes, num_scales: int | None = None) -> torch.Tensor:
        """B, L tokens and K class ids (null = ``num_classes`` allowed) → B, K, L' log p(token | class, earlier
        scales)."""
        classes = torch.as_tensor(classes, dtype=torch.long).view(-1)
        if classes.numel() and (classes.min() < 0 or classes.max() > self.null_class):
            raise AvarcError(f"class ids must be in 0..{self.null_class} (null = {self.null_class})")
        B, K = tokens.shape[0], classes.numel()
        lp = self.pair_logp(tokens.repeat_interleave(K, 0), classes.repeat(B), num_scales)
        return lp.view(B, K, -1)


def build_model(spec: ModelSpec, device: str | torch.device = "cpu") -> Model:
    """Build VAE + VAR for a spec (randomly initialised; ``device='meta'`` allocates nothing; under
    :func:`core.models.checkpoints.unfilled` nothing is initialised, for weights loaded next)."""
    dev = torch.device(device) if str(device) == "meta" else resolve_device(device)
    with torch.device(dev):
        vae = VQVAE(spec.vae, spec.var.patch_nums)
        var = VAR(spec.var)
    return Model(spec=spec, vae=vae.eval().requires_grad_(False), var=var.eval().requires_grad_(False), device=dev)


