"""An explanation as a picture a person can read: four captioned panels side by side (Pillow and numpy only).

Panel 1 is the input exactly as the model saw it (tiny inputs upscaled by a whole factor, nearest-neighbour, so
pixels stay crisp); panels 2–4 colour the A-vs-null, B-vs-null and contrast maps over it. Each map is clipped at
zero (only evidence *for* the class is drawn), min–max normalised (a constant map is drawn as zero), upsampled
bilinearly and alpha-blended. The contrast panel is drawn in the direction of the class with the higher
likelihood (A over B, or B over A), as the paper does for misclassified images; the saved maps stay A − B.
Captions use Pillow's bundled font, which has ASCII glyphs only: accents are folded (``ü`` → ``u``) and other
characters drawn as ``?`` (the NPZ and the terminal keep the exact class names).
"""
from __future__ import annotations

import math
import unicodedata
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import AvarcError

if TYPE_CHECKING:
    import torch


class Drawable(Protocol):
    """What :func:`render` draws of an explanation (:class:`avarc.tasks.explain.Explanation`, a layer above)."""

    @property
    def ratios(self) -> tuple[float, float, float]: ...   # nats: A vs null, B vs null, A vs B

    @property
    def maps(self) -> torch.Tensor: ...                    # 3, p, p: A vs null, B vs null, A − B

    @property
    def patch_nums(self) -> tuple[int, ...]: ...           # the scales it was computed on

    @property
    def samples(self) -> int: ...                          # token samples averaged

    @property
    def stage(self) -> int | None: ...                     # the run's deciding stage (None: not from a run)


MIN_PANEL = 256     # panels are at least this many pixels wide
GAP = 4             # pixels between panels
BACKGROUND = (255, 255, 255)
STRIP = (16, 16, 16)
TEXT = (255, 255, 255)


def jet(v: np.ndarray) -> np.ndarray:
    """The classic MATLAB jet: dark blue → cyan → yellow → dark red. [0, 1] → …, 3 in [0, 1]."""
    v = np.asarray(v, dtype=np.float64)[..., None]
    return np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)


# Turbo (Google, 2019) as a degree-5 polynomial per channel in v, coefficients of v^0 … v^5.
_TURBO = np.array([
    [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
    [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
    [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
])


def turbo(v: np.ndarray) -> np.ndarray:
    """Turbo, a perceptually smoother jet: dark blue → cyan → green → yellow → dark red. [0, 1] → …, 3 in [0, 1]."""
    v = np.clip(np.asarray(v, dtype=np.float64), 0.0, 1.0)[..., None]
    powers = v ** np.arange(6)                                   # …, 6
    return np.clip(powers @ _TURBO.T, 0.0, 1.0)


COLORMAPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"turbo": turbo, "jet": jet}


def panel_size(image_size: int) -> int:
    """The panel edge: the image size times the smallest whole factor that reaches ``MIN_PANEL``."""
    return image_size * math.ceil(MIN_PANEL / image_size)


def caption_height(panel: int) -> int:
    """Two caption lines, then the colour bar and its scale in nats."""
    size = _font_size(panel)
    return 4 * _line_height(size) + size


def figure_size(image_size: int) -> tuple[int, int]:
    """(width, height) of the PNG for a model's input size: 4 panels, 3 gaps, one caption strip."""
    p = panel_size(image_size)
    return 4 * p + 3 * GAP, p + caption_height(p)


def _clipped(m: np.ndarray) -> np.ndarray:
    return np.nan_to_num(np.clip(np.asarray(m, dtype=np.float64), 0.0, None), nan=0.0, posinf=0.0)


def value_range(m: np.ndarray) -> tuple[float, float]:
    """The (lo, hi) in nats that :func:`normalise` maps to 0 and 1 when left to choose: the clipped map's min–max."""
    m = _clipped(m)
    return float(m.min()), float(m.max())


def normalise(m: np.ndarray, scale: tuple[float, float] | None = None) -> np.ndarray:
    """Clip at zero, then ``scale`` (lo, hi; default: the map's own min–max) to [0, 1]; a constant (or non-finite)
    map becomes all zeros, never NaN."""
    lo, hi = scale or value_range(m)
    return np.clip((_clipped(m) - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(_clipped(m))


def overlay(base: np.ndarray, m: np.ndarray, colormap: str = "turbo", alpha: float = 0.5,
            scale: tuple[float, float] | None = None) -> np.ndarray:
    """P, P, 3 uint8 panel and a p, p signed map → the map's colours blended over the panel (uint8)."""
    P = base.shape[0]
    heat = Image.fromarray(normalise(m, scale).astype(np.float32), mode="F").resize((P, P), Image.Resampling.BILINEAR)
    colour = COLORMAPS[colormap](np.asarray(heat)) * 255.0
    return np.round((1.0 - alpha) * base + alpha * colour).clip(0, 255).astype(np.uint8)


def check_style(colormap: str, alpha: float) -> None:
    if colormap not in COLORMAPS:
        raise AvarcError(f"unknown colormap {colormap!r}; use {' or '.join(COLORMAPS)}", option="colormap")
    if not 0.0 <= alpha <= 1.0:
        raise AvarcError(f"opacity {alpha} is not between 0 (input only) and 1 (heatmap only)", option="alpha")


def render(pixels: np.ndarray, expl: Drawable, names: tuple[str, str], colormap: str = "turbo",
           alpha: float = 0.5, note: str = "", shared_scale: bool = False) -> Image.Image:
    """R, R, 3 uint8 model input + explanation → the four-panel figure. ``names`` are A's and B's display names;
    ``note`` is the input panel's second caption line (e.g. the true and predicted class); its first says on how
    many scales the run decided, for an explanation of a run's stage. Each map panel has a
    colour bar in nats per cell of the map's grid; ``shared_scale`` gives the three maps one scale (0 to the
    largest value of the three), so a weak map looks weak."""
    check_style(colormap, alpha)
    R = pixels.shape[0]
    P = panel_size(R)
    base = np.asarray(Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).resize((P, P),
                                                                                            Image.Resampling.NEAREST))
    a, b = (_ascii(n) for n in names)
    note = _ascii(note)
    r_a, r_b, r_ab = expl.ratios
    maps = expl.maps.numpy()
    win, lose, contrast, r_win = (a, b, maps[2], r_ab) if r_ab >= 0 else (b, a, -maps[2], -r_ab)
    drawn = [maps[0], maps[1], contrast]
    shared = (0.0, max(value_range(m)[1] for m in drawn)) if shared_scale else None
    scales = [shared or value_range(m) for m in drawn]
    title = "input" if expl.stage is None else f"decided on {len(expl.patch_nums)} scales"
    mean = f" (mean of {expl.samples} samples)" if expl.samples > 1 else ""
    # image, (title or the two names of a ratio, second line), colour-bar scale
    panels: list[tuple[np.ndarray, tuple[str | tuple[str, str | None], str], tuple[float, float] | None]]
    panels = [(base, (title, note), None)]
    panels += [(overlay(base, m, colormap, alpha, sc), cap, sc) for m, sc, cap in zip(
        drawn, scales, [((a, None), f"{r_a:+.2f} nats{mean}"), ((b, None), f"{r_b:+.2f} nats{mean}"),
                        ((win, lose), f"{r_win:+.2f} nats{mean}")])]
    W, H = figure_size(R)
    fig = Image.new("RGB", (W, H), BACKGROUND)
    draw = ImageDraw.Draw(fig)
    size = _font_size(P)
    font = ImageFont.load_default(size=size)
    for i, (img, (first, second), scale) in enumerate(panels):
        x = i * (P + GAP)
        fig.paste(Image.fromarray(img), (x, 0))
        draw.rectangle((x, P, x + P - 1, H - 1), fill=STRIP)
        title = first if isinstance(first, str) else _ratio_title(first, font, P - size)
        for j, line in enumerate((title, second)):
            draw.text((x + size // 2, P + size // 2 + j * _line_height(size)), _fit(line, font, P - size), font=font,
                      fill=TEXT)
        if scale is not None:
            _colour_bar(fig, draw, font, (x + size // 2, P + size // 2 + 2 * _line_height(size)), P - size, size,
                        colormap, scale)
    return fig


def _colour_bar(fig: Image.Image, draw: ImageDraw.ImageDraw, font, at: tuple[int, int], width: int, size: int,
                colormap: str, scale: tuple[float, float]) -> None:
    """A horizontal bar of the colormap at ``at`` and, under it, the values its ends stand for."""
    x, y = at
    ramp = COLORMAPS[colormap](np.linspace(0.0, 1.0, width))[None].repeat(max(size // 2, 4), 0)
    fig.paste(Image.fromarray(np.round(ramp * 255).astype(np.uint8)), (x, y + size // 4))
    lo, hi = scale
    right = f"{hi:.3g} nats"
    draw.text((x, y + _line_height(size)), f"{lo:.3g}", font=font, fill=TEXT)
    draw.text((x + width - font.getlength(right), y + _line_height(size)), right, font=font, fill=TEXT)


def _font_size(panel: int) -> int:
    return max(11, panel // 16)


def _line_height(size: int) -> int:
    return round(1.25 * size)


def _ratio_title(names: tuple[str, str | None], font, width: int) -> str:
    """``log p(x|a)/p(x|b)`` (``/p(x)`` against the null class), names shortened alike until the line fits."""
    a, b = names
    keep = max(len(a), len(b or ""))
    while True:
        sa, sb = _shorten(a, keep), (_shorten(b, keep) if b is not None else None)
        text = f"log p(x|{sa}) / p(x{'|' + sb if sb is not None else ''})"
        if keep <= 1 or font.getlength(text) <= width:
            return text
        keep -= 1


def _ascii(text: str) -> str:
    folded = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return "".join(c if " " <= c <= "~" else "?" for c in folded)


def _shorten(name: str, keep: int) -> str:
    return name if len(name) <= keep else name[:max(keep - 2, 1)] + ".."


def _fit(text: str, font, width: int) -> str:
    while text and font.getlength(text) > width:
        text = text[:-3] + ".." if len(text) > 3 else text[:-1]
    return text
