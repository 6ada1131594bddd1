"""A loaded VQ-VAE + VAR pair: the object every command works with."""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from . import checkpoints, tokenizer
from .errors import AvarcError
from .likelihood import PairScores, pair_logp, score_pairs
from .specs import ModelSpec, infer_vae_spec, infer_var_spec, spec_from_dict, spec_to_dict
from .var import VAR, KVCache, onednn_bf16
from .vqvae import VQVAE


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
    encoder: Callable[[torch.Tensor], torch.Tensor] | None = None  # replaces the torch encoder (``onnx_encoder.use_encoder``)

    extensions: list = field(default_factory=list)   # the core.incremental.Extension objects applied, bottom first
    var_file: Path | None = None                                # the VAR checkpoint it was loaded from (its identity)
    vae_file: Path | None = None                                # the VQ-VAE checkpoint it was loaded from
    compile: bool = False                       # fuse the engine's elementwise work with torch.compile
    _engines: dict[torch.dtype, tuple[tuple, VAR]] = field(default_factory=dict, repr=False)

    def engine_var(self, dtype: torch.dtype | None = None) -> VAR:
        """The VAR in the compute dtype (``self.dtype`` unless given): ``var`` itself for fp32, else a copy made
        once per dtype (the precision guard's fp32 and the run's bf16 live side by side) and remade only when
        ``var``'s weights or added classes change; with ``compile`` a fused copy (fp32 included, so ``var`` itself,
        which training uses, stays plain)."""
        dtype = dtype or self.dtype
        if dtype == torch.float32 and not self.compile:
            return self.var
        key = (self.device, self.compile, id(self.var.extra_class_emb), tuple(p._version for p in self.var.parameters()))
        held = self._engines.get(dtype)
        if held is None or held[0] != key:
            self._engines.pop(dtype, None)           # free the old copy before making the new one
            var = self.var.in_dtype(dtype) if dtype != torch.float32 else copy.deepcopy(self.var)
            self._engines[dtype] = (key, var.compiled() if self.compile else var)
        return self._engines[dtype][1]

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
        """N, L tokens with one class each → N, L' per-token log-probs (fp32, CPU), computed in ``dtype`` (default:
        the model's)."""
        return pair_logp(self.engine_var(dtype), self.vae.quantize, tokens, class_idx, num_scales, chunk,
                         self.budget_bytes)

    def score_pairs(self, tokens: torch.Tensor, class_idx: torch.Tensor, num_scales: int | None = None,
                    chunk: int | None = None, cache: KVCache | None = None, keep_cache: bool = False) -> PairScores:
        """Like :meth:`pair_logp`, but able to continue from cached keys/values of a shorter forward."""
        return score_pairs(self.engine_var(), self.vae.quantize, tokens, class_idx, num_scales, chunk,
                           self.budget_bytes, cache, keep_cache)

    def token_logp(self, tokens: torch.Tensor, classes, num_scales: int | None = None) -> torch.Tensor:
        """B, L tokens and K class ids (null = ``num_classes`` allowed) → B, K, L' log p(token | class, earlier scales)."""
        classes = torch.as_tensor(classes, dtype=torch.long).view(-1)
        if classes.numel() and (classes.min() < 0 or classes.max() > self.null_class):
            raise AvarcError(f"class ids must be in 0..{self.null_class} (null = {self.null_class})")
        B, K = tokens.shape[0], classes.numel()
        lp = self.pair_logp(tokens.repeat_interleave(K, 0), classes.repeat(B), num_scales)
        return lp.view(B, K, -1)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → cuda if available, then mps, else cpu; anything else is checked to exist."""
    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise AvarcError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AvarcError(f"device {name!r} requested but CUDA is not available here; use cpu", option="device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise AvarcError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s), cuda:0…cuda:{torch.cuda.device_count() - 1}", option="device")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise AvarcError(f"device {name!r} requested but MPS is not available here; use cpu", option="device")
    return dev


def build_model(spec: ModelSpec, device: str | torch.device = "cpu") -> Model:
    """Build VAE + VAR for a spec (randomly initialised; ``device='meta'`` allocates nothing)."""
    dev = torch.device(device) if str(device) == "meta" else resolve_device(device)
    with torch.device(dev):
        vae = VQVAE(spec.vae, spec.var.patch_nums)
        var = VAR(spec.var)
    return Model(spec=spec, vae=vae.eval().requires_grad_(False), var=var.eval().requires_grad_(False), device=dev)


def load_model(var: str | os.PathLike, vae: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, image_size: int | None = None, preprocess: str = "official",
               class_names: tuple[str, ...] = (), patch_nums: tuple[int, ...] | None = None,
               trust_pickle: bool = False) -> Model:
    """Load checkpoint files; the architecture is read off the state dicts."""
    var_sd = checkpoints.read_state_dict(var, "var", trust_pickle)
    vae_sd = checkpoints.read_state_dict(vae, "vae", trust_pickle)
    try:
        var_spec = infer_var_spec(var_sd, patch_nums)
    except AvarcError as e:
        raise AvarcError(f"{var}: {e}") from None
    try:
        vae_spec = infer_vae_spec(vae_sd)
    except AvarcError as e:
        raise AvarcError(f"{vae}: {e}") from None
    if vae_spec.vocab_size != var_spec.vocab_size or vae_spec.z_channels != var_spec.z_channels:
        raise AvarcError(f"{vae}: VQ-VAE codebook {vae_spec.vocab_size}x{vae_spec.z_channels} does not match the VAR "
                         f"in {var} ({var_spec.vocab_size}x{var_spec.z_channels}); pass the VQ-VAE it was trained with")
    size = image_size or var_spec.patch_nums[-1] * vae_spec.downsample
    spec = ModelSpec(vae=vae_spec, var=var_spec, image_size=size, preprocess=preprocess, class_names=tuple(class_names))
    model = build_model(spec, "meta")
    checkpoints.load_into(model.var, var_sd, var, "VAR")
    checkpoints.load_into(model.vae, vae_sd, vae, "VQ-VAE")
    model.var_file, model.vae_file = Path(var), Path(vae)
    return _finish(model, device, dtype)


MODEL_DIR_FORMAT = "avarc-model/1"


def _finish(model: Model, device: str | torch.device, dtype: torch.dtype) -> Model:
    dev = resolve_device(device)
    model.vae.to(dev)
    model.var.to(dev)
    model.device, model.dtype = dev, dtype
    return model


def save_model_dir(model: Model, path: str | os.PathLike, **meta) -> Path:
    """Write ``var.pth``, ``vae.pth`` (plain state dicts) and ``meta.json`` (spec + any metadata) to a directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.var.state_dict().items()}, path / "var.pth")
    torch.save({k: v.detach().cpu() for k, v in model.vae.state_dict().items()}, path / "vae.pth")
    doc = {"format": MODEL_DIR_FORMAT, "spec": spec_to_dict(model.spec), **{**model.meta, **meta}}
    (path / "meta.json").write_text(json.dumps(doc, indent=2) + "\n")
    return path


def load_model_dir(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Model:
    """Load a model directory written by :func:`save_model_dir` (the bundled demo is one)."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise AvarcError(f"{path}: not a model directory (no meta.json); give a VAR checkpoint file and its VQ-VAE instead")
    try:
        meta = json.loads(meta_file.read_text())
        spec = spec_from_dict(meta["spec"])
    except (ValueError, KeyError, TypeError) as e:
        raise AvarcError(f"{meta_file}: invalid model metadata ({e})") from None
    model = build_model(spec, "meta")
    for module, name, what in ((model.var, "var.pth", "VAR"), (model.vae, "vae.pth", "VQ-VAE")):
        kind = "var" if what == "VAR" else "vae"
        checkpoints.load_into(module, checkpoints.read_state_dict(path / name, kind), path / name, what)
    model.meta = {k: v for k, v in meta.items() if k not in ("format", "spec")}
    model.var_file, model.vae_file = path / "var.pth", path / "vae.pth"
    return _finish(model, device, dtype)


def resolve_compile(flag: bool | None, device: torch.device) -> bool:
    """``None`` (auto) → compile on CUDA when Triton is installed, where the fused kernels pay for their one-time
    compile; not on CPUs, where fusing the elementwise work gained ≤ 5% on W1 (bf16, AMX Xeon) for ~37 s of cold
    compile (~4 s with the cache warm)."""
    if flag is not None:
        return flag
    if device.type != "cuda":
        return False
    import importlib.util

    return importlib.util.find_spec("triton") is not None


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``bf16`` (the names of :data:`DTYPES`)."""
    return next(name for name, dt in DTYPES.items() if dt == dtype)


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions (AMX or AVX512-BF16) that oneDNN can use, where bf16
    matmuls run several times faster than fp32; elsewhere (e.g. AVX2-only) bf16 is emulated, slower than fp32.
    ``AVARC_CPU_BF16=emulated`` makes any host answer as one without (see :func:`core.var.onednn_bf16`)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return ("amx_bf16" in flags or "avx512_bf16" in flags) and onednn_bf16()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → the fastest dtype that keeps predictions (bf16 agrees with fp32 on ≥ 99% of images and the
    precision guard makes the prediction fp32's, see ``avarc bench``): bf16 on GPUs with bf16 tensor cores (compute
    capability 8.0+, Ampere and later) and on CPUs with native bf16, else fp32. Or an explicit fp32/bf16/fp16; bf16
    asked for on a CPU that emulates it runs (correctly, slower than fp32) with one warning saying so."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float32
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32
    try:
        dtype = DTYPES[name]
    except KeyError:
        raise AvarcError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}") from None
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_fast_bf16():
        _warn_emulated()
    return dtype


@lru_cache(maxsize=1)
def _warn_emulated() -> None:
    logging.getLogger("avarc").warning("bf16 is emulated on this CPU (no AMX or AVX512-BF16): predictions stay exact "
                                       "(the precision guard), but it runs slower than fp32; --dtype auto picks fp32")
