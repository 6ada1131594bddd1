"""Insertion and deletion AUC of an explanation, in the protocol of the A-VARC paper's Table 3 (after RISE).

The explanation's token-wise mutual-information map (A vs the null class, on the finest grid explained) ranks the
grid's regions, each the block of pixels its finest-scale token covers. *Insertion* starts from a start image (black,
or the image blurred) and puts the image's regions back best first; *deletion* starts from the image and replaces its
regions by the start image's, best first. After each step the explained class's posterior is read (softmax over every
class of the exact log-likelihood of the modified image's clean tokens on the explained scales, at the profile's
temperature). The AUC is the curve's trapezoid area over the fraction of regions changed (0…1): a good explanation
inserts high (the class comes back fast) and deletes low (it goes fast). A random ranking of the same regions is the
baseline.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

from ..choices import METRICS_STARTS
from ..engine.model import Model
from ..engine.profile import Profile
from ..errors import AvarcError
from ..io.files import atomic_write
from ..io.preprocess import pixels_to_tensor
from .explain import Explanation

STARTS = METRICS_STARTS
RANDOM_ORDERS = 3      # random rankings averaged per image for the baseline
MAX_STEPS = 16         # points along a curve beyond the first (a finer grid changes several regions per step)


def region_ids(size: int, grid: int) -> np.ndarray:
    """size×size: the index (row-major on the grid×grid token grid) of the region each pixel belongs to."""
    cell = np.arange(size) * grid // size
    return cell[:, None] * grid + cell[None, :]


def start_image(pixels: np.ndarray, start: str) -> np.ndarray:
    """``blank``: black; ``blur``: the image under a Gaussian blur of radius size/8 (its content no longer legible)."""
    if start == "blank":
        return np.zeros_like(pixels)
    if start == "blur":
        radius = max(1.0, pixels.shape[0] / 8)
        return np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(radius)))
    raise AvarcError(f"unknown start image {start!r}; use one of {', '.join(STARTS)}", option="metrics-start")


def curve_images(pixels: np.ndarray, start: np.ndarray, order: Sequence[int] | np.ndarray, regions: np.ndarray,
                 mode: str, max_steps: int = MAX_STEPS) -> np.ndarray:
    """The images along a curve (at most ``max_steps`` + 1, evenly spaced in regions): insertion puts the image's
    regions into ``start`` in ``order``; deletion puts ``start``'s regions into the image."""
    base, fill = (start, pixels) if mode == "insertion" else (pixels, start)
    out = [base.copy()]
    for step in np.array_split(np.asarray(order), min(len(order), max_steps)):
        nxt = out[-1].copy()
        mask = np.isin(regions, step)
        nxt[mask] = fill[mask]
        out.append(nxt)
    return np.stack(out)


def auc(ys: Sequence[float]) -> float:
    """Trapezoid area under a curve sampled at evenly spaced fractions 0…1."""
    y = np.asarray(ys, np.float64)
    return float(((y[1:] + y[:-1]) / 2).mean()) if len(y) > 1 else float(y[0])


@torch.no_grad()
def class_posterior(model: Model, images: np.ndarray, cls: int, num_scales: int,
                    temperature: float = 1.0) -> np.ndarray:
    """N, R, R, 3 uint8 → N posteriors of ``cls`` over every class (exact clean-token scores on ``num_scales``)."""
    x = torch.stack([pixels_to_tensor(im) for im in images])
    logp = model.token_logp(model.tokenize(x).cpu(), range(model.num_classes), num_scales).double().sum(-1)
    return torch.softmax(logp / temperature, 1)[:, cls].numpy()


@dataclass
class ImageMetrics:
    """One image: its explained class, the AUCs of its map's ranking and of random rankings, and the curves."""

    cls: int
    insertion: float
    deletion: float
    random_insertion: float
    random_deletion: float
    curves: dict[str, list[float]]      # insertion, deletion, random_insertion, random_deletion (mean of randoms)


def ranking_metrics(pixels: np.ndarray, heat: np.ndarray, posterior: Callable[[np.ndarray], np.ndarray],
                    start: str = "blank", seed: int = 0, cls: int = -1) -> ImageMetrics:
    """One image's metrics, from its p×p heatmap and ``posterior`` (images → the explained class's posterior)."""
    grid = heat.shape[-1]
    regions = region_ids(pixels.shape[0], grid)
    base = start_image(pixels, start)
    order = np.argsort(-heat.reshape(-1), kind="stable")
    rng = np.random.default_rng(seed)
    randoms = [rng.permutation(grid * grid) for _ in range(RANDOM_ORDERS)]
    curves: dict[str, list[float]] = {}
    for mode in ("insertion", "deletion"):
        curves[mode] = posterior(curve_images(pixels, base, order, regions, mode)).tolist()
        runs = [posterior(curve_images(pixels, base, o, regions, mode)) for o in randoms]
        curves[f"random_{mode}"] = np.mean(runs, 0).tolist()
    return ImageMetrics(cls, auc(curves["insertion"]), auc(curves["deletion"]), auc(curves["random_insertion"]),
                        auc(curves["random_deletion"]), curves=curves)


def image_metrics(model: Model, expl: Explanation, profile: Profile, start: str = "blank",
                  seed: int = 0) -> ImageMetrics:
    """Insertion/deletion metrics of an explanation (with its ``pixels``), ranked by its A-vs-null map."""
    if expl.pixels is None:
        raise ValueError("the explanation needs the pixels the model saw")
    cls, scales, temperature = expl.classes[0], len(expl.patch_nums), profile.temperature or 1.0
    return ranking_metrics(expl.pixels, expl.maps[0].numpy(),
                           lambda ims: class_posterior(model, ims, cls, scales, temperature), start, seed, cls)


def summarise(results: Sequence[ImageMetrics]) -> dict[str, tuple[float, float]]:
    """Mean and standard error over images of each AUC (s.e. 0 for a single image)."""
    out = {}
    for k in ("insertion", "deletion", "random_insertion", "random_deletion"):
        v = np.array([getattr(r, k) for r in results], np.float64)
        out[k] = (float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0)
    return out


METRICS_FILES = ("metrics.png", "metrics.json")      # written in this order: the JSON completes the pair
_SOFTWARE = "avarc explain --metrics"                  # metrics.png's Software text: the pair's half is recognised


def write_metrics(results: Sequence[tuple[str, ImageMetrics]], folder: str | os.PathLike,
                  force: bool = False) -> tuple[Path, Path]:
    """``metrics.json`` (summary and per image: AUCs and curves) and ``metrics.png`` (mean curves) in ``folder``. The
    plot is written first and the JSON last, so a run stopped between them (a full disk) leaves a plot marked as
    avarc's (:func:`metrics_clash` lets the next run replace it) and never a JSON without its plot."""
    folder = Path(folder)
    summary = summarise([m for _, m in results])
    doc = {"summary": {k: {"mean": m, "se": se} for k, (m, se) in summary.items()}, "images": len(results),
           "per_image": [{"path": p, **asdict(m)} for p, m in results]}
    png, js = (folder / name for name in METRICS_FILES)
    with atomic_write(png, "wb") as f:
        f.write(curves_png([m for _, m in results], summary))
    with atomic_write(js, "w", exclusive=not force, option="out") as f:
        json.dump(doc, f, indent=1)
    return js, png


def metrics_clash(folder: Path) -> list[Path]:
    """The metrics files in ``folder`` that a new run would replace and that are not a half pair of its own: the
    JSON (a whole pair), or a plot that avarc did not write."""
    png, js = (folder / name for name in METRICS_FILES)
    if js.exists():
        return [js, *([png] if png.exists() else [])]
    if not png.exists():
        return []
    try:
        with Image.open(png) as im:
            ours = im.info.get("Software") == _SOFTWARE
    except (OSError, ValueError, SyntaxError):
        ours = False
    return [] if ours else [png]


def curves_png(results: Sequence[ImageMetrics], summary: dict[str, tuple[float, float]]) -> bytes:
    """Mean insertion and deletion curves, the map's ranking against the random one."""
    import io

    try:
        import matplotlib
    except ImportError:
        raise AvarcError("--metrics plots need matplotlib; pip install 'avarc[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, mode in zip(axes, ("insertion", "deletion")):
        for key, style in ((mode, "-"), (f"random_{mode}", "--")):
            ys = np.mean([r.curves[key] for r in results], 0)
            m, se = summary[key]
            ax.plot(np.linspace(0, 1, len(ys)), ys, style,
                    label=f"{'random' if key.startswith('random') else 'heatmap'}: AUC {m:.3f} ± {se:.3f}")
        done = "inserted" if mode == "insertion" else "deleted"
        ax.set(title=f"{mode} ({len(results)} images)", xlabel=f"fraction of regions {done}",
               ylabel="posterior of the explained class", ylim=(0, 1))
        ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": _SOFTWARE})
    plt.close(fig)
    return buf.getvalue()
