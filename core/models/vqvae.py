"""The VQ-VAE: convolutional encoder/decoder (the latent-diffusion f16 design) around the multi-scale quantiser.

Parameter names match ``vae_ch160v4096z32.pth`` exactly. Shapes are written B, C, H, W.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantizer import MultiScaleQuantizer
from .specs import VQVAESpec


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over the H·W positions."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)   # each B, C, HW
        w = torch.bmm(q.transpose(1, 2), k).mul_(C ** -0.5).softmax(dim=2)    # B, HW(q), HW(k)
        h = torch.bmm(v, w.transpose(1, 2)).view(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution: ``block`` res-blocks, ``attn`` at the lowest resolution, then a resampler."""

    downsample: Downsample   # set on every level of the encoder but the last (torch registers it as a submodule)
    upsample: Upsample       # set on every level of the decoder but the first

    def __init__(self) -> None:
        super().__init__()
        # torch's ModuleList does not say its items' type: declared here, so level.block[i](h) is typed
        self.block: list[ResnetBlock] = nn.ModuleList()  # type: ignore[assignment]
        self.attn: list[AttnBlock] = nn.ModuleList()  # type: ignore[assignment]


class _Mid(nn.Module):
    def __init__(self, ch: int, groups: int, attn: bool):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups) if attn else nn.Identity()
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """B, 3, R, R image in [-1, 1] → B, z, R/f, R/f latent."""

    def __init__(self, s: VQVAESpec, in_channels: int = 3):
        super().__init__()
        g, n = s.num_groups, len(s.ch_mult)
        self.conv_in = nn.Conv2d(in_channels, s.ch, 3, 1, 1)
        self.down: list[_Level] = nn.ModuleList()  # type: ignore[assignment]  # (see _Level)
        ch_in = s.ch
        for i, mult in enumerate(s.ch_mult):
            level, ch_out = _Level(), s.ch * mult
            for _ in range(s.num_res_blocks):
                level.block.append(ResnetBlock(ch_in, ch_out, g))
                ch_in = ch_out
                if i == n - 1 and s.using_sa:
                    level.attn.append(AttnBlock(ch_in, g))
            if i != n - 1:
                level.downsample = Downsample(ch_in)
            self.down.append(level)
        self.mid = _Mid(ch_in, g, s.using_mid_sa)
        self.norm_out = _norm(ch_in, g)
        self.conv_out = nn.Conv2d(ch_in, s.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """B, z, h, w latent → B, 3, h·f, w·f image (unclamped)."""

    def __init__(self, s: VQVAESpec, out_channels: int = 3):
        super().__init__()
        g, n = s.num_groups, len(s.ch_mult)
        ch_in = s.ch * s.ch_mult[-1]
        self.conv_in = nn.Conv2d(s.z_channels, ch_in, 3, 1, 1)
        self.mid = _Mid(ch_in, g, s.using_mid_sa)
        levels: list[_Level] = []
        for i in reversed(range(n)):
            level, ch_out = _Level(), s.ch * s.ch_mult[i]
            for _ in range(s.num_res_blocks + 1):
                level.block.append(ResnetBlock(ch_in, ch_out, g))
                ch_in = ch_out
                if i == n - 1 and s.using_sa:
                    level.attn.append(AttnBlock(ch_in, g))
            if i != 0:
                level.upsample = Upsample(ch_in)
            levels.insert(0, level)
        self.up: list[_Level] = nn.ModuleList(levels)  # type: ignore[assignment]  # (see _Level)
        self.norm_out = _norm(ch_in, g)
        self.conv_out = nn.Conv2d(ch_in, out_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQVAE(nn.Module):
    def __init__(self, spec: VQVAESpec, patch_nums: tuple[int, ...]):
        super().__init__()
        self.spec = spec
        self.encoder = Encoder(spec)
        self.decoder = Decoder(spec)
        self.quantize = MultiScaleQuantizer(spec, patch_nums)
        self.quant_conv = nn.Conv2d(spec.z_channels, spec.z_channels, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(spec.z_channels, spec.z_channels, 3, 1, 1)

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """Image → pre-quantisation latent f (encoder + quant_conv)."""
        return self.quant_conv(self.encoder(img))

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat))
