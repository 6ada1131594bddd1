"""Counterfactual explanations: what an image would look like as another class, drawn by the model itself.

The image's own first K scales (its layout: coarse shape, position, brightness) are teacher-forced; the finer
scales are drawn once under the predicted class and once under the asked class, from the same seed, so the two
differ by the class alone. The panel shows the input, its reconstruction (all of its own tokens, decoded), both
drawings, and the token-wise log-likelihood ratio of the counterfactual's tokens (asked class over predicted class)
drawn over it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import AvarcError
from ..io.files import atomic_write
from .explain import Explanation, safe_stem
from .heatmap import BACKGROUND, GAP, STRIP, TEXT, _ascii, _fit, _font_size, _line_height, overlay, panel_size


def check_keep_scales(keep_scales: int, num_scales: int) -> int:
    if not 0 <= keep_scales <= num_scales:
        raise AvarcError(f"keep {keep_scales} scales asked for, but this model has {num_scales}; use 0…{num_scales}",
                         option="keep_scales")
    return keep_scales


@dataclass
class Counterfactual:
    """One image as its predicted class and as the asked class (``target``), from its first ``keep_scales``."""

    pixels: np.ndarray              # R, R, 3 uint8: the input as the model saw it
    reconstruction: np.ndarray      # R, R, 3 uint8: the input's own tokens decoded
    as_pred: np.ndarray             # R, R, 3 uint8: drawn under the predicted class
    as_target: np.ndarray           # R, R, 3 uint8: drawn under the asked class
    pred: int
    target: int
    keep_scales: int
    explanation: Explanation        # the counterfactual's tokens: A = target, B = pred (maps[2]: A − B)
    as_target_pred: int             # what the classifier calls the counterfactual
    as_target_p: float              # its probability of the asked class
    names: tuple[str, str] = ("", "")   # display names of pred and target
    as_target_name: str = ""            # display name of what the classifier calls the counterfactual

    @property
    def log_ratio(self) -> float:
        """log p(counterfactual tokens | target) − log p(… | pred), in nats."""
        return self.explanation.ratios[2]

    def __repr__(self) -> str:
        return (f"Counterfactual({self.names[0]!r} → {self.names[1]!r}, keep {self.keep_scales} scales: classified "
                f"as {self.as_target_pred}, p(target) {self.as_target_p:.3f}, {self.log_ratio:+.2f} nats)")

    def to_pil(self, colormap: str = "turbo", alpha: float = 0.5) -> Image.Image:
        """Five captioned panels: input, reconstruction, as predicted, as the asked class, the log-ratio map."""
        R = self.pixels.shape[0]
        P = panel_size(R)

        def big(px: np.ndarray) -> np.ndarray:
            return np.asarray(Image.fromarray(px).resize((P, P), Image.Resampling.NEAREST))

        pred, target = (_ascii(n) for n in self.names)
        S = len(self.explanation.patch_nums)
        heat = overlay(big(self.as_target), self.explanation.maps[2].numpy(), colormap, alpha)
        panels = [(big(self.pixels), "input", f"predicted {pred}"),
                  (big(self.reconstruction), "reconstruction", f"its {S} scales"),
                  (big(self.as_pred), f"as {pred}", f"own scales: {self.keep_scales} of {S}"),
                  (big(self.as_target), f"as {target}", f"classified {self.as_target_name}, "
                                                        f"p={self.as_target_p:.2f}"),
                  (heat, f"log p(x|{target})/p(x|{pred})", f"{self.log_ratio:+.2f} nats")]
        size = _font_size(P)
        font = ImageFont.load_default(size=size)
        H = P + 2 * _line_height(size) + size
        fig = Image.new("RGB", (len(panels) * P + (len(panels) - 1) * GAP, H), BACKGROUND)
        draw = ImageDraw.Draw(fig)
        for i, (img, first, second) in enumerate(panels):
            x = i * (P + GAP)
            fig.paste(Image.fromarray(img), (x, 0))
            draw.rectangle((x, P, x + P - 1, H - 1), fill=STRIP)
            for j, line in enumerate((first, second)):
                draw.text((x + size // 2, P + size // 2 + j * _line_height(size)), _fit(line, font, P - size),
                          font=font, fill=TEXT)
        return fig

    def save(self, folder: str | os.PathLike, stem: str, exclusive: bool = False) -> tuple[Path, Path]:
        """``<stem>.as_<class>.png`` (the counterfactual, at the model's size) and ``<stem>.counterfactual.png``
        (the panel) in ``folder``, each atomically."""
        folder = Path(folder)
        image = folder / f"{stem}.as_{safe_stem(self.names[1])}.png"
        panel = folder / f"{stem}.counterfactual.png"
        for path, img in ((image, Image.fromarray(self.as_target)), (panel, self.to_pil())):
            with atomic_write(path, exclusive=exclusive, option="out") as f:
                img.save(f, format="PNG")
        return image, panel
