"""What a model draws for its classes, as files a person opens: one PNG per sample, a labelled contact sheet and
the token ids (``tokens.npz``: ``tokens`` B, L int64 in upstream order, coarse to fine; ``labels`` B)."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..io.files import atomic_write
from .explain import safe_stem
from .heatmap import BACKGROUND, _ascii, _fit

MIN_CELL = 64       # contact-sheet cells are at least this many pixels wide (8×8 digits drawn 8× larger)
GAP = 4


@dataclass
class Samples:
    """A batch of samples: class-major, ``n`` per class in the order asked."""

    labels: torch.Tensor            # B int64 class ids
    tokens: torch.Tensor            # B, L int64 token ids, scales concatenated coarse → fine
    images: torch.Tensor            # B, 3, R, R float32 in [0, 1] (decoded)
    names: list[str]                # B class names (index for a model without names)

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def pixels(self) -> np.ndarray:
        """B, R, R, 3 uint8: what the PNGs hold."""
        return self.images.mul(255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()

    def files(self) -> list[str]:
        """Each sample's PNG, relative to the output folder (see :func:`sample_files`)."""
        return sample_files(self.labels.tolist(), self.names)

    def save(self, folder: str | os.PathLike, exclusive: bool = True, captions: list[str] | None = None) -> list[Path]:
        """Write every sample's PNG, ``grid.png`` and ``tokens.npz`` into ``folder`` (each atomically;
        ``exclusive``: refuse a file that exists) → the paths written, the grid and tokens last. ``captions``: a
        line under each sample on the grid."""
        folder = Path(folder)
        written = []
        for rel, px in zip(self.files(), self.pixels):
            written.append(_write_png(Image.fromarray(px), folder / rel, exclusive))
        written.append(_write_png(self.contact_sheet(captions), folder / "grid.png", exclusive))
        buf = io.BytesIO()
        np.savez(buf, tokens=self.tokens.numpy().astype(np.int64), labels=self.labels.numpy().astype(np.int64))
        with atomic_write(folder / "tokens.npz", exclusive=exclusive, option="out") as f:
            f.write(buf.getvalue())
        return [*written, folder / "tokens.npz"]

    def contact_sheet(self, captions: list[str] | None = None) -> Image.Image:
        """One row per class (its name on the left), its samples left to right; small images upscaled by a whole
        factor (nearest-neighbour) so they stay crisp and readable. ``captions``: one line under each sample."""
        rows: dict[int, list[int]] = {}
        for i, y in enumerate(self.labels.tolist()):
            rows.setdefault(y, []).append(i)
        R = self.images.shape[-1]
        cell = R * max(1, -(-MIN_CELL // R))
        size = max(11, min(cell // 4, 20))
        font = ImageFont.load_default(size=size)
        names = {y: _ascii(self.names[idx[0]]) for y, idx in rows.items()}
        label_w = int(min(max(font.getlength(n) for n in names.values()) + size, 12 * size))
        line = round(1.25 * size) if captions else 0
        cols = max(len(v) for v in rows.values())
        W = label_w + cols * (cell + GAP)
        H = len(rows) * (cell + line + GAP) + GAP
        sheet = Image.new("RGB", (W, H), BACKGROUND)
        draw = ImageDraw.Draw(sheet)
        pixels = self.pixels
        for r, (y, idx) in enumerate(rows.items()):
            top = GAP + r * (cell + line + GAP)
            draw.text((size // 2, top + cell // 2 - size // 2), _fit(names[y], font, label_w - size), font=font,
                      fill=(0, 0, 0))
            for c, i in enumerate(idx):
                x = label_w + c * (cell + GAP)
                sheet.paste(Image.fromarray(pixels[i]).resize((cell, cell), Image.Resampling.NEAREST), (x, top))
                if captions:
                    draw.text((x, top + cell), _fit(_ascii(captions[i]), font, cell), font=font, fill=(0, 0, 0))
        return sheet


def sample_files(labels: list[int], names: list[str]) -> list[str]:
    """``<class name>/<k>.png`` per sample (k counting within its class), relative to the output folder. Two classes
    whose names give one folder name (ImageNet has two "crane" classes) get their id appended: ``crane-517``."""
    folders: dict[int, str] = {}
    for y, name in zip(labels, names):
        if y not in folders:
            stem = safe_stem(name)
            taken = {f.lower() for f in folders.values()}
            folders[y] = stem if stem.lower() not in taken else f"{stem}-{y}"
    seen: dict[int, int] = {}
    out = []
    for y in labels:
        k = seen[y] = seen.get(y, -1) + 1
        out.append(f"{folders[y]}/{k}.png")
    return out


def class_shares(labels: list[int], preds: list[int]) -> dict[int, tuple[int, int]]:
    """Per class asked (in order of first appearance): (samples classified as it, samples)."""
    out: dict[int, tuple[int, int]] = {}
    for y, p in zip(labels, preds):
        hit, n = out.get(y, (0, 0))
        out[y] = (hit + (p == y), n + 1)
    return out


def _write_png(img: Image.Image, path: Path, exclusive: bool) -> Path:
    with atomic_write(path, exclusive=exclusive, option="out") as f:
        img.save(f, format="PNG")
    return path
