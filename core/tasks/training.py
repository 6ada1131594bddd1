"""Training a VQ-VAE (multi-scale residual quantiser) and a class-conditional VAR from scratch, seeded.

Both loops are plain AdamW with linear warm-up and cosine decay. Nothing here prints: progress goes to an
``on_step(step, total, loss)`` callback that the caller renders. ``train_var`` trains any chosen parameters on
any (tokens, class index) pairs, so class-incremental learning reuses it with its own parameters and classes.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.model import Model
from ..engine.tokenizer import draw_noise, neighbour_tokens
from ..errors import AvarcError
from ..models.vqvae import VQVAE

OnStep = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule: ``warmup`` steps of linear warm-up, then cosine from ``lr`` to ``lr·final_lr``."""

    steps: int
    lr: float
    batch_size: int = 64
    warmup: int = 0
    final_lr: float = 0.01
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 2.0
    seed: int = 0


@dataclass
class TrainLog:
    """Loss of every step (the mean over the batch)."""

    losses: list[float] = field(default_factory=list)

    def mean(self, first: int | None = None, last: int | None = None) -> float:
        part = self.losses[:first] if first else self.losses[-last:] if last else self.losses
        return sum(part) / len(part)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of a 0-based step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.final_lr + (1 - cfg.final_lr) * 0.5 * (1 + math.cos(math.pi * t)))


def _optimizer(named: Iterable[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW that decays matrices only (not biases, norms, positions, scale gains)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in named:
        keep = p.ndim < 2 or name.startswith(("pos_", "lvl_embed")) or "scale_mul" in name
        (no_decay if keep else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)


@torch.enable_grad()        # training needs autograd, whatever the caller's grad mode
def _run(module: nn.Module, params: list[tuple[str, nn.Parameter]], cfg: TrainConfig,
         loss_of_batch: Callable[[torch.Generator], torch.Tensor], on_step: OnStep | None,
         before_step: Callable[[int, torch.Generator], None] | None = None) -> TrainLog:
    """The shared loop: only ``params`` get gradients; the module is left in eval mode without gradients."""
    if not params:
        raise AvarcError("nothing to train: the parameter list is empty")
    gen = torch.Generator().manual_seed(cfg.seed)
    module.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
    opt = _optimizer(params, cfg)
    log = TrainLog()
    module.train()
    try:
        for step in range(cfg.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            if before_step is not None:
                before_step(step, gen)
            loss = loss_of_batch(gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_([p for _, p in params], cfg.grad_clip)
            opt.step()
            log.losses.append(loss.item())
            if on_step is not None:
                on_step(step + 1, cfg.steps, log.losses[-1])
    finally:
        module.eval().requires_grad_(False)
    return log


def random_affine(images: torch.Tensor, gen: torch.Generator, shift: float = 0.0, rotate: float = 0.0,
                  scale: float = 0.0) -> torch.Tensor:
    """Small random handwriting-like distortions of B, C, H, W images in [-1, 1]: a shift of up to ±shift pixels
    per axis, a rotation of up to ±rotate degrees and a zoom of up to ±scale, bilinear, filled with −1 (black)."""
    if shift == rotate == scale == 0:
        return images
    B, _, H, W = images.shape
    u = torch.rand(B, 4, generator=gen).mul_(2).sub_(1).to(images.device)
    angle, zoom = u[:, 0] * math.radians(rotate), 1 + u[:, 1] * scale
    cos, sin = angle.cos() / zoom, angle.sin() / zoom
    theta = torch.stack((torch.stack((cos, -sin, u[:, 2] * shift * 2 / W), 1),
                         torch.stack((sin, cos, u[:, 3] * shift * 2 / H), 1)), 1)      # B, 2, 3
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


@dataclass(frozen=True)
class Augment:
    """Parameters of :func:`random_affine` (all zero: no augmentation)."""

    shift: float = 0.0
    rotate: float = 0.0
    scale: float = 0.0

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return random_affine(images, gen, self.shift, self.rotate, self.scale)


def _batch(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, n, (min(size, n),), generator=gen)


@torch.no_grad()
def reseed_unused_codes(vae: VQVAE, images: torch.Tensor, gen: torch.Generator) -> int:
    """Point every code that no vector of these images snaps to at a random one of those vectors (all scales
    pooled), so the whole codebook is used; returns how many codes moved."""
    zs, idxs = vae.quantize.quantise_scales(vae.encode(images))
    used = torch.zeros(vae.quantize.vocab_size, dtype=torch.bool, device=images.device)
    used[torch.cat([i.flatten() for i in idxs])] = True
    dead = (~used).nonzero().squeeze(1)
    z = torch.cat(zs)
    pick = torch.randint(0, len(z), (len(dead),), generator=gen).to(z.device)
    vae.quantize.embedding.weight[dead] = z[pick]
    return len(dead)


def train_vqvae(model: Model, images: torch.Tensor, cfg: TrainConfig, beta: float = 0.25, augment: Augment = Augment(),
                reseed_every: int = 100, reseed_until: float = 0.8, reseed_images: int = 512,
                on_step: OnStep | None = None) -> TrainLog:
    """Train encoder, decoder, codebook and Φ on N, 3, R, R images in [-1, 1]: loss = MSE(reconstruction) +
    the quantiser's codebook + β·commitment loss, on augmented batches. Every ``reseed_every`` steps in the
    first ``reseed_until`` share of training (and before the first), unused codes are re-seeded from the data."""
    vae = model.vae
    images = images.to(model.device)

    def loss_of_batch(gen: torch.Generator) -> torch.Tensor:
        x = augment(images[_batch(len(images), cfg.batch_size, gen)], gen)
        f_hat, vq_loss = vae.quantize(vae.encode(x), beta)
        return F.mse_loss(vae.decode(f_hat), x) + vq_loss

    def before_step(step: int, gen: torch.Generator) -> None:
        if reseed_every > 0 and step % reseed_every == 0 and step < reseed_until * cfg.steps:
            reseed_unused_codes(vae, images[_batch(len(images), reseed_images, gen)], gen)

    return _run(vae, list(vae.named_parameters()), cfg, loss_of_batch, on_step, before_step)


@torch.no_grad()
def token_pool(model: Model, images: torch.Tensor, labels: torch.Tensor, copies: int, augment: Augment,
               gen: torch.Generator, chunk: int = 256, sigma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """VAR training data: the tokens of N clean images followed by ``copies`` augmented passes over them (affine
    distortion, then with ``sigma`` > 0 latent noise latent + σ·N(0, 1) re-quantised) → N·(1 + copies), L tokens
    and their labels."""
    out = []
    for c in range(1 + copies):
        for i in range(0, len(images), chunk):
            x = images[i:i + chunk].to(model.device)
            latent = model.encode(augment(x, gen) if c else x)
            if c and sigma > 0:
                out.append(neighbour_tokens(model.vae, latent, draw_noise(latent, 1, gen), sigma)[:, 0].cpu())
            else:
                out.append(model.tokenize_latent(latent).cpu())
    return torch.cat(out), labels.repeat(1 + copies)


def train_var(model: Model, tokens: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
              params: Iterable[tuple[str, nn.Parameter]] | None = None, label_drop: float = 0.1,
              on_step: OnStep | None = None) -> TrainLog:
    """Teacher-forced next-scale training on N, L tokens with N class indices of the model (0 … num_classes−1):
    cross-entropy averaged over all tokens, with a ``label_drop`` share of labels replaced by the null class so the
    unconditional model is learnt too. ``params`` (named, default: every VAR parameter) are the ones trained;
    the VQ-VAE stays frozen."""
    var, quantizer = model.var, model.vae.quantize
    if tokens.shape[1] != var.L:
        raise AvarcError(f"tokens have {tokens.shape[1]} positions but the VAR models {var.L}; "
                         "tokenise with its VQ-VAE")
    if labels.numel() and (labels.min() < 0 or labels.max() >= model.num_classes):
        raise AvarcError(f"labels must be class indices in 0..{model.num_classes - 1}")
    named = list(var.named_parameters()) if params is None else list(params)
    tokens, labels = tokens.to(model.device), labels.to(model.device)
    with torch.no_grad():
        x_in = quantizer.var_input(tokens)          # N, L−1, Cvae: the VQ-VAE is frozen, so compute it once

    def loss_of_batch(gen: torch.Generator) -> torch.Tensor:
        idx = _batch(len(tokens), cfg.batch_size, gen).to(model.device)
        y = labels[idx]
        drop = torch.rand(y.shape, generator=gen).to(model.device) < label_drop
        y = torch.where(drop, torch.full_like(y, model.null_class), y)
        logits = var(y, x_in[idx])                  # B, L, V
        return F.cross_entropy(logits.flatten(0, 1), tokens[idx].flatten())

    return _run(var, named, cfg, loss_of_batch, on_step)
