"""Multi-scale residual quantiser: latent f → token maps of growing size, coarse to fine.

At scale k the residual is area-downsampled to p_k×p_k, snapped to the nearest code, the code map is bicubically
upsampled back, refined by a 3×3 convolution Φ (blended 50/50 with its input), added to f̂ and subtracted from
the residual. The same f̂, area-downsampled to the next scale, is the VAR's teacher-forcing input.
Parameter names match the official ``quantize.*`` keys for every Φ sharing mode.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .specs import VQVAESpec


def _fp32_settings() -> list:
    """The per-backend fp32 precision settings of torch's newer API (cuBLAS matmuls, cuDNN convolutions and RNNs,
    oneDNN's on CPUs), each with an ``fp32_precision`` of ieee, tf32, bf16 or none; [] on a torch without it."""
    b = torch.backends
    found = [getattr(b.cuda, "matmul", None), getattr(b.cudnn, "conv", None), getattr(b.cudnn, "rnn", None),
             getattr(b.mkldnn, "matmul", None), getattr(b.mkldnn, "conv", None), getattr(b.mkldnn, "rnn", None)]
    return [s for s in found if s is not None and hasattr(s, "fp32_precision")]


@contextmanager
def exact_fp32() -> Iterator[None]:
    """Run fp32 convolutions and matmuls as true fp32, then restore the caller's settings, whatever the caller set:
    ``allow_tf32`` flags, ``torch.set_float32_matmul_precision("high"/"medium")`` (on a GPU TF32; on a CPU with
    native bf16, "medium" runs oneDNN's fp32 matmuls in bf16) or the newer ``fp32_precision`` settings, mixed or
    not. cuDNN's TF32 is on by default on Ampere and later: it moves latents by ~1e-3, flips near-tie argmins, and
    tokens would then differ from the CPU's and from the official fp32 evaluation. Where torch has the newer API
    only it is used: reading the legacy cuDNN flag raises once the two APIs were mixed."""
    settings = _fp32_settings()
    if settings:        # the precision getters raise once the APIs were mixed: read and write only these
        saved = [s.fp32_precision for s in settings]
        _set_each(settings, ["ieee"] * len(settings))
        try:
            yield
        finally:
            _set_each(settings, saved)
        return
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = [m.allow_tf32, c.allow_tf32, torch.get_float32_matmul_precision()]
    torch.set_float32_matmul_precision("highest")
    m.allow_tf32 = c.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[2])
        m.allow_tf32, c.allow_tf32 = saved[:2]


def _set_each(settings: list, values: list[str]) -> None:
    for s, v in zip(settings, values):
        s.fp32_precision = v


class Phi(nn.Conv2d):
    """h ← (1−r)·h + r·conv(h)."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, 1, 1)
        self.ratio = ratio

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


class PhiShared(nn.Module):
    def __init__(self, phi: Phi):
        super().__init__()
        self.qresi = phi


class PhiPartiallyShared(nn.Module):
    def __init__(self, phis: list[Phi]):
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)


def _phi_ticks(n: int) -> np.ndarray:
    """Where each of n Φs sits on [0, 1] (the official layout: scale k of K uses the Φ nearest k/(K−1))."""
    return np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n) if n == 4 else np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n)


class MultiScaleQuantizer(nn.Module):
    def __init__(self, spec: VQVAESpec, patch_nums: tuple[int, ...]):
        super().__init__()
        self.patch_nums = tuple(patch_nums)
        self.vocab_size, self.Cvae = spec.vocab_size, spec.z_channels
        self.embedding = nn.Embedding(spec.vocab_size, spec.z_channels)
        S, n = len(self.patch_nums), spec.share_quant_resi
        phis = [Phi(self.Cvae, spec.quant_resi) for _ in range(S if n == 0 else n)]
        if n == 0:
            self.quant_resi: nn.Module = nn.ModuleList(phis)
        elif n == 1:
            self.quant_resi = PhiShared(phis[0])
        else:
            self.quant_resi = PhiPartiallyShared(phis)
        ticks = _phi_ticks(len(phis))
        at = [k / (S - 1) if S > 1 else 0.0 for k in range(S)]
        self._phi_of_scale = [int(np.argmin(np.abs(ticks - a))) for a in at]
        self._phis = phis

    def phi(self, k: int) -> Phi:
        return self._phis[self._phi_of_scale[k]]

    def _nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        E = self.embedding.weight.float()
        d = z_NC.square().sum(1, keepdim=True) + E.square().sum(1)
        d.addmm_(z_NC, E.T, alpha=-2, beta=1)
        return d.argmin(dim=1)

    def _upsampled_code(self, k: int, idx_Bhw: torch.Tensor, H: int, W: int) -> torch.Tensor:
        h = self.embedding(idx_Bhw).permute(0, 3, 1, 2)
        if k != len(self.patch_nums) - 1:
            h = F.interpolate(h, size=(H, W), mode="bicubic")
        return self.phi(k)(h.contiguous())

    @torch.no_grad()
    @exact_fp32()
    def quantise_scales(self, f: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """B, Cvae, H, W latent (fp32) → per scale, the vectors snapped to the codebook (B·p_k², Cvae) and the
        codes chosen (B, p_k²). Training reads the vectors to re-seed codes that nothing uses."""
        f = f.float()
        B, C, H, W = f.shape
        rest, zs, idxs = f.clone(), [], []
        S = len(self.patch_nums)
        for k, pn in enumerate(self.patch_nums):
            z = F.interpolate(rest, size=(pn, pn), mode="area") if k != S - 1 else rest
            z = z.permute(0, 2, 3, 1).reshape(-1, C)
            idx = self._nearest(z).view(B, pn, pn)
            rest.sub_(self._upsampled_code(k, idx, H, W))
            zs.append(z)
            idxs.append(idx.reshape(B, pn * pn))
        return zs, idxs

    def tokenize(self, f: torch.Tensor) -> torch.Tensor:
        """B, Cvae, H, W latent (fp32) → B, L token ids, scales concatenated coarse to fine."""
        return torch.cat(self.quantise_scales(f)[1], dim=1)

    def split(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """B, L' → one B, p_k² tensor per scale present (a prefix of the scales is allowed)."""
        maps, start = [], 0
        for pn in self.patch_nums:
            if start >= tokens.shape[1]:
                break
            maps.append(tokens[:, start:start + pn * pn])
            start += pn * pn
        return maps

    @exact_fp32()
    def add_scale(self, k: int, idx_Bl: torch.Tensor, f_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sampling's step (upstream ``get_next_autoregressive_input``): the codes of scale k (B, p_k²) added to
        f̂ (B, Cvae, H, W fp32) → the new f̂ and the next scale's input (B, p_{k+1}², Cvae; None after the last)."""
        B, H, pn = f_hat.shape[0], f_hat.shape[-1], self.patch_nums[k]
        f_hat = f_hat + self._upsampled_code(k, idx_Bl.view(B, pn, pn), H, H).float()
        if k == len(self.patch_nums) - 1:
            return f_hat, None
        p1 = self.patch_nums[k + 1]
        return f_hat, F.interpolate(f_hat, size=(p1, p1), mode="area").view(B, self.Cvae, -1).transpose(1, 2)

    @torch.no_grad()
    def f_hat(self, tokens: torch.Tensor) -> torch.Tensor:
        """B, L tokens of every scale → the B, Cvae, H, W latent they stand for (what the decoder takes)."""
        B, H = tokens.shape[0], self.patch_nums[-1]
        f_hat = self.embedding.weight.new_zeros(B, self.Cvae, H, H, dtype=torch.float32)
        for k, idx in enumerate(self.split(tokens)):
            f_hat, _ = self.add_scale(k, idx, f_hat)
        return f_hat

    @exact_fp32()
    def var_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing input: B, L' tokens of the first s scales → B, L'−1, Cvae (f̂ after scale k,
        area-downsampled to scale k+1). Differentiable in the codebook, so training can use it too."""
        maps = self.split(tokens)
        B, H = tokens.shape[0], self.patch_nums[-1]
        f_hat = self.embedding.weight.new_zeros(B, self.Cvae, H, H, dtype=torch.float32)
        nxt = []
        for k in range(len(maps) - 1):
            f_hat, x_in = self.add_scale(k, maps[k], f_hat)
            assert x_in is not None     # None only after the last scale, which this loop stops before
            nxt.append(x_in)
        if not nxt:
            return f_hat.new_zeros(B, 0, self.Cvae)
        return torch.cat(nxt, dim=1)

    def forward(self, f: torch.Tensor, beta: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: returns the straight-through f̂ and the mean VQ loss over scales
        (codebook term + beta · commitment term)."""
        B, C, H, W = f.shape
        f_ng = f.detach()
        rest, f_hat = f_ng.clone(), torch.zeros_like(f_ng)
        loss = f.new_zeros(())
        S = len(self.patch_nums)
        for k, pn in enumerate(self.patch_nums):
            z = F.interpolate(rest, size=(pn, pn), mode="area") if k != S - 1 else rest
            with torch.no_grad():
                idx = self._nearest(z.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn, pn)
            h = self._upsampled_code(k, idx, H, W)
            f_hat = f_hat + h
            rest = rest - h.detach()
            loss = loss + F.mse_loss(f_hat.detach(), f).mul(beta) + F.mse_loss(f_hat, f_ng)
        return (f_hat.detach() - f_ng) + f, loss / S
