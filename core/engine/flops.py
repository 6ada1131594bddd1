"""Compute accounting in the paper's convention, and what the engine actually executes.

Paper convention (A-VARC Tables 1–2): multiply–accumulates of the VAR's linear layers over every scored token, its
AdaLN projections once per sequence, and the VQ-VAE encoder's convolutions once per image; attention matmuls are
reported separately. "Executed" counts the same quantities for the work the engine really runs after reusing
earlier stages (a scored prefix is extended, an already scored (class, sample) is not scored again).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol, Sequence

import torch
import torch.nn as nn

from ..models.specs import ModelSpec, VARSpec, VQVAESpec


class StageLike(Protocol):
    """A profile's stage (``Stage``, frozen), its ``scales`` numeric once the profile is resolved."""

    @property
    def scales(self) -> int | str: ...
    @property
    def samples(self) -> int: ...
    @property
    def keep(self) -> int: ...


class RanStage(Protocol):
    """A stage as one image ran it (``StageScores``, or a record's stage): the candidates it scored."""

    @property
    def scales(self) -> int: ...
    @property
    def samples(self) -> int: ...
    @property
    def candidates(self) -> Sequence[int]: ...


@dataclass(frozen=True)
class Macs:
    """Multiply–accumulates (true FLOPs = 2 × MACs)."""

    linear: float = 0.0
    attention: float = 0.0
    encoder: float = 0.0

    @property
    def paper(self) -> float:
        """The paper's count: linear + AdaLN (inside ``linear``) + encoder, attention excluded."""
        return self.linear + self.encoder

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.encoder

    def __add__(self, o: Macs) -> Macs:
        return Macs(self.linear + o.linear, self.attention + o.attention, self.encoder + o.encoder)

    def __mul__(self, k: float) -> Macs:
        return Macs(self.linear * k, self.attention * k, self.encoder * k)


def token_macs(spec: VARSpec) -> int:
    """Linear-layer MACs of one token through the VAR (qkv, proj, MLP in every block, then the head)."""
    C, hidden = spec.embed_dim, round(spec.embed_dim * spec.mlp_ratio)
    return spec.depth * (4 * C * C + 2 * C * hidden) + C * spec.vocab_size


def sequence_macs(spec: VARSpec, end: int, start: int = 0) -> Macs:
    """One (sequence, class) pair: tokens [start, end), each attending to the keys of its own and earlier scales
    (block-causal: the masked part of the score matrix is not computed); AdaLN once per sequence."""
    C, first_l = spec.embed_dim, spec.patch_nums[0] ** 2
    n = end - start
    embed = max(0, end - max(start, first_l)) * spec.z_channels * C
    adaln = (1 if spec.shared_aln else spec.depth) * 6 * C * C + 2 * C * C
    pairs = sum((hi - lo) * keys for lo, hi, keys in spec.attention_spans(end, start))
    attention = spec.depth * 2 * pairs * C
    return Macs(linear=n * token_macs(spec) + embed + adaln, attention=attention)


@lru_cache(maxsize=8)
def encoder_macs(vae: VQVAESpec, image_size: int, patch_nums: tuple[int, ...]) -> int:
    """Convolution MACs of encoder + quant_conv for one image, counted on a real forward of a small image (2×2
    latent cells, the fewest a group norm of one channel per group takes; weights allocated, never initialised) and
    scaled by the area, since every convolution's output area is proportional to the image's. Not on the meta
    device: its group norm imports torch._dynamo, a second of every command's start-up."""
    from ..models.checkpoints import unfilled
    from ..models.vqvae import VQVAE

    side = 2 * vae.downsample
    with unfilled():
        model = VQVAE(vae, patch_nums)
    total = 0

    def hook(mod: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        k = mod.weight.shape
        total += out[0].numel() * k[1] * k[2] * k[3]

    hooks = [m.register_forward_hook(hook) for m in [*model.encoder.modules(), model.quant_conv]
             if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.encode(torch.zeros(1, 3, side, side))
    for h in hooks:
        h.remove()
    return round(total * image_size * image_size / (side * side))


def schedule_macs(spec: ModelSpec, stages: Sequence[StageLike], num_classes: int, reuse: bool = False) -> Macs:
    """MACs per image of a staged schedule over ``num_classes`` candidates (no early exits).

    ``reuse=False`` is the paper's count; ``reuse=True`` what the engine runs: every (class, sample) keeps the
    number of tokens already scored, a longer stage only extends it, and a stage no longer than it is free.
    """
    var = spec.var
    ends = var.scale_ends()
    scored: dict[int, int] = {}          # sample index → tokens scored so far for every surviving candidate
    total = Macs(encoder=encoder_macs(spec.vae, spec.image_size, var.patch_nums))
    candidates = num_classes
    for st in stages:
        end = ends[min(int(st.scales), len(ends)) - 1]
        for j in range(st.samples):
            start = scored.get(j, 0) if reuse else 0
            if start < end:
                total = total + sequence_macs(var, end, start) * candidates
                scored[j] = end
        candidates = min(candidates, st.keep)
    return total


def image_gflops(spec: ModelSpec, stages: Sequence[RanStage], executed: Macs) -> dict[str, float]:
    """One image's compute in GFLOPs, paper convention (attention excluded): ``paper`` counts every stage it ran
    (an early exit ends the list) from the first token for each candidate and sample, ``executed`` what its rows
    of the scorer ran (``executed``: the VAR part, from :meth:`Scorer.executed`) plus its encoder pass."""
    var, ends = spec.var, spec.var.scale_ends()
    enc = encoder_macs(spec.vae, spec.image_size, var.patch_nums)
    paper = sum((sequence_macs(var, ends[min(st.scales, len(ends)) - 1]) * (len(st.candidates) * st.samples)
                 for st in stages), Macs())
    return {"executed": (executed.paper + enc) / 1e9, "paper": (paper.paper + enc) / 1e9}
