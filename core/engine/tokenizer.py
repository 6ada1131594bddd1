"""Encoder latent → multi-scale tokens, and the latent-noise neighbours used for likelihood smoothing."""
from __future__ import annotations

import torch

from ..models.quantizer import exact_fp32
from ..models.vqvae import VQVAE


@torch.no_grad()
@exact_fp32()
def encode(vae: VQVAE, images: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """B, 3, R, R in [-1, 1] → B, Cvae, h, w fp32 latent (encoder + quant_conv, TF32 off), in chunks to bound
    memory."""
    return torch.cat([vae.encode(images[i:i + chunk]).float() for i in range(0, images.shape[0], chunk)])


@torch.no_grad()
def tokenize_latent(vae: VQVAE, latent: torch.Tensor) -> torch.Tensor:
    """B, Cvae, h, w → B, L token ids (scales concatenated coarse → fine)."""
    return vae.quantize.tokenize(latent)


def draw_noise(latent: torch.Tensor, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """num, B, Cvae, h, w standard-normal draws (on CPU with the given generator, so they are device-independent)."""
    shape = (num, *latent.shape)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(latent.device)


@torch.no_grad()
def neighbour_tokens(vae: VQVAE, latent: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """Tokens of latent + σ·noise[j], re-quantised: → B, N, L for noise of shape N, B, Cvae, h, w."""
    N, B = noise.shape[:2]
    noisy = (latent.unsqueeze(0) + sigma * noise).flatten(0, 1)           # N·B, Cvae, h, w (j-major)
    return vae.quantize.tokenize(noisy).view(N, B, -1).transpose(0, 1)
