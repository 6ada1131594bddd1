"""Architecture specs: plain dataclasses that say how to build a VQ-VAE and a VAR.

Official presets mirror the FoundationVision/var files; ``infer_*_spec`` reads the same numbers back out of
a state dict, so any checkpoint in the official format builds without the user naming its architecture.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    import torch

from ..errors import AvarcError

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


@dataclass(frozen=True)
class VQVAESpec:
    """Encoder/decoder widths, codebook and the residual-quantiser's Φ sharing (0 = one per scale, 1 = one
    shared, n > 1 = n partially shared)."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    share_quant_resi: int = 4
    quant_resi: float = 0.5
    num_groups: int = 32
    using_sa: bool = True
    using_mid_sa: bool = True

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class VARSpec:
    """Transformer size and token geometry. ``num_classes`` excludes the null class (index ``num_classes``)."""

    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    num_classes: int = 1000
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    shared_aln: bool = False
    attn_l2_norm: bool = True
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    vocab_size: int = 4096
    z_channels: int = 32

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.patch_nums)

    def scale_ends(self) -> list[int]:
        """Token count of the first s scales, for s = 1 … len(patch_nums)."""
        ends, total = [], 0
        for p in self.patch_nums:
            total += p * p
            ends.append(total)
        return ends

    def attention_spans(self, num_tokens: int, start: int = 0) -> list[tuple[int, int, int]]:
        """Block-causal attention of tokens start … num_tokens−1 as one span per scale: (lo, hi, keys) = queries
        lo…hi−1 (counted from ``start``) see exactly the keys 0…keys−1 of their own and earlier scales."""
        spans, lo = [], 0
        for end in self.scale_ends():
            end = min(end, num_tokens)
            if end > max(lo, start):
                spans.append((max(lo, start) - start, end - start, end))
            lo = end
        return spans


@dataclass(frozen=True)
class ModelSpec:
    """A VQ-VAE + VAR pair and how images are prepared for it (``preprocess``: ``official`` = resize the shorter
    side to round(1.125·R) and centre-crop, ``resize`` = resize the whole image to R×R)."""

    vae: VQVAESpec
    var: VARSpec
    image_size: int
    preprocess: str = "official"
    class_names: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        latent = self.image_size // self.vae.downsample
        if self.var.patch_nums[-1] != latent:
            raise AvarcError(
                f"the VAR's last scale is {self.var.patch_nums[-1]}x{self.var.patch_nums[-1]} but the VQ-VAE makes "
                f"a {latent}x{latent} latent at {self.image_size}px; use a VQ-VAE and VAR trained together"
            )


def _official_var(depth: int) -> VARSpec:
    big = depth == 36
    return VARSpec(depth=depth, embed_dim=64 * depth, num_heads=depth,
                   patch_nums=PATCH_NUMS_512 if big else PATCH_NUMS_256, shared_aln=big)


OFFICIAL_VAE = VQVAESpec()
OFFICIAL_DEPTHS = (16, 20, 24, 30, 36)


def official_spec(name: str) -> ModelSpec:
    """The spec of an official VAR checkpoint: ``d16``, ``d20``, ``d24``, ``d30`` or ``d36`` (``-cca`` fine-tunes
    share their base's architecture). ``vae`` gives d16's spec, whose VQ-VAE is the official one."""
    key = name.lower().removesuffix("-cca")
    if key == "vae":
        key = "d16"
    m = re.fullmatch(r"d(\d+)", key)
    if not m or int(m.group(1)) not in OFFICIAL_DEPTHS:
        raise AvarcError(f"unknown official model {name!r}; choose one of vae, "
                         + ", ".join(f"d{d}" for d in OFFICIAL_DEPTHS))
    depth = int(m.group(1))
    return ModelSpec(vae=OFFICIAL_VAE, var=_official_var(depth), image_size=512 if depth == 36 else 256)


def infer_patch_nums(num_tokens: int, num_scales: int, first: int = 1) -> tuple[int, ...]:
    """The scales of a VAR with ``num_tokens`` positions over ``num_scales`` scales whose first scale has ``first``²
    tokens: an official geometry if it fits, else the one increasing sequence that does; several fitting is an
    error that asks for them to be stated."""
    for pn in (PATCH_NUMS_256, PATCH_NUMS_512):
        if len(pn) == num_scales and sum(p * p for p in pn) == num_tokens and pn[0] == first:
            return pn
    fits: list[tuple[int, ...]] = []

    def extend(prefix: tuple[int, ...], left: int) -> None:
        if len(fits) > 1:
            return
        if len(prefix) == num_scales:
            if left == 0:
                fits.append(prefix)
            return
        p = prefix[-1] + 1
        while p * p * (num_scales - len(prefix)) <= left:
            extend(prefix + (p,), left - p * p)
            p += 1

    if first * first <= num_tokens:
        extend((first,), num_tokens - first * first)
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise AvarcError(f"no increasing scales from {first} fill {num_tokens} tokens in {num_scales} scales; "
                         "the checkpoint is damaged or not a VAR")
    raise AvarcError(f"the scales are ambiguous ({num_tokens} tokens in {num_scales} scales fit both "
                     f"{','.join(map(str, fits[0]))} and {','.join(map(str, fits[1]))}); state them as patch_nums")


def infer_var_spec(sd: Mapping[str, torch.Tensor], patch_nums: tuple[int, ...] | None = None) -> VARSpec:
    """Read depth, width, heads, classes, AdaLN sharing, vocabulary and patch_nums off a VAR state dict."""
    try:
        C = sd["class_emb.weight"].shape[1]
        num_classes = sd["class_emb.weight"].shape[0] - 1
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        heads = sd["blocks.0.attn.scale_mul_1H11"].shape[1] if "blocks.0.attn.scale_mul_1H11" in sd else max(1, C // 64)
        V, Cvae = sd["head.weight"].shape[0], sd["word_embed.weight"].shape[1]
        L = sd["pos_1LC"].shape[1]
        num_scales, first = sd["lvl_embed.weight"].shape[0], math.isqrt(sd["pos_start"].shape[1])
        hidden = sd["blocks.0.ffn.fc1.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise AvarcError(f"not a VAR state dict (missing {e})") from None
    patch_nums = tuple(patch_nums) if patch_nums else infer_patch_nums(L, num_scales, first)
    if sum(p * p for p in patch_nums) != L:
        raise AvarcError(f"patch_nums {patch_nums} give {sum(p * p for p in patch_nums)} tokens "
                         f"but the checkpoint has {L}")
    return VARSpec(
        depth=depth, embed_dim=C, num_heads=heads, num_classes=num_classes, patch_nums=patch_nums,
        shared_aln="shared_ada_lin.1.weight" in sd, attn_l2_norm="blocks.0.attn.scale_mul_1H11" in sd,
        mlp_ratio=hidden / C, vocab_size=V, z_channels=Cvae,
    )


def infer_vae_spec(sd: Mapping[str, torch.Tensor]) -> VQVAESpec:
    """Read ch, ch_mult, res blocks, vocabulary, z channels and Φ sharing off a VQ-VAE state dict."""
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        vocab, z = sd["quantize.embedding.weight"].shape
    except KeyError as e:
        raise AvarcError(f"not a VQ-VAE state dict (missing {e})") from None
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
    ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    res_blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
    if any(k.startswith("quantize.quant_resi.qresi_ls.") for k in sd):
        share = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("quantize.quant_resi.qresi_ls."))
    elif any(k.startswith("quantize.quant_resi.qresi.") for k in sd):
        share = 1
    else:
        share = 0
    return VQVAESpec(
        vocab_size=vocab, z_channels=z, ch=ch, ch_mult=ch_mult, num_res_blocks=res_blocks, share_quant_resi=share,
        using_sa=any(".attn.0." in k and k.startswith("encoder.down.") for k in sd),
        using_mid_sa="encoder.mid.attn_1.qkv.weight" in sd,
        num_groups=math.gcd(32, ch),
    )


def spec_to_dict(spec: ModelSpec) -> dict:
    """A JSON/weights_only-safe form of a spec (for metadata files)."""
    return dataclasses.asdict(spec)


def spec_from_dict(d: Mapping) -> ModelSpec:
    vae = dict(d["vae"])
    vae["ch_mult"] = tuple(vae["ch_mult"])
    var = dict(d["var"])
    var["patch_nums"] = tuple(var["patch_nums"])
    return ModelSpec(vae=VQVAESpec(**vae), var=VARSpec(**var), image_size=int(d["image_size"]),
                     preprocess=d.get("preprocess", "official"), class_names=tuple(d.get("class_names", ())))
