"""One scoring pass that lets every schedule be evaluated offline: per image × candidate class × scale × sample,
the summed token log-likelihood of that scale.

A stage's score is a prefix sum over scales, averaged over the first ``samples`` samples, so any profile's stage
scores are sums of this table. The samples are exactly the ones ``avarc classify`` draws (clean tokens, then
latent-noise neighbours from the image's own generator, seeded from the seed and the image's key). A profile with
fewer samples draws a shorter noise tensor; its neighbours are the first ones of the table's only when torch's
normal sampler fills a prefix identically, which :func:`exact_sample_counts` checks for this model's latent size.
The table also keeps, per image and sample, how many leading tokens a neighbour shares with the clean tokens: the
engine starts a neighbour from the clean sequence's keys/values there, which decides the executed compute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from ..engine.schedule import sample_tokens
from ..engine.tokenizer import draw_noise
from ..errors import AvarcError
from ..io import distributed
from ..io.data import Item
from ..io.preprocess import pixels_to_tensor

if TYPE_CHECKING:
    from ..classifier import Classifier


@dataclass
class ScoreTable:
    """``sums_NKSM[n, k, s, m]``: log p(tokens of scale s | class candidates[k], earlier scales) of image n's
    sample m (0 = clean), float64 from the fp32 per-token log-probs. ``agree_NM``: leading tokens sample m shares
    with the clean tokens. ``labels`` are model class ids (−1: unlabelled). Candidates are sorted by class id."""

    sums_NKSM: np.ndarray
    agree_NM: np.ndarray
    labels: np.ndarray
    paths: list[str]
    candidates: list[int]
    scale_ends: list[int]
    sigma: float
    seed: int
    exact_samples: tuple[int, ...]     # sample counts whose neighbours equal those `classify` draws for them
    skipped: list[tuple[str, str]]     # (path, reason) of images that could not be read

    @property
    def num_images(self) -> int:
        return self.sums_NKSM.shape[0]

    @property
    def max_samples(self) -> int:
        return self.sums_NKSM.shape[3]

    def subset(self, idx: Sequence[int] | np.ndarray) -> ScoreTable:
        """The rows of some images (e.g. the fit or the held-out part)."""
        idx = np.asarray(idx, dtype=np.int64)
        return ScoreTable(self.sums_NKSM[idx], self.agree_NM[idx], self.labels[idx],
                          [self.paths[i] for i in idx], self.candidates, self.scale_ends, self.sigma, self.seed,
                          self.exact_samples, [])


def exact_sample_counts(latent_1: torch.Tensor, max_samples: int) -> tuple[int, ...]:
    """Sample counts n ≤ max_samples whose n−1 neighbours are the first n−1 of a max_samples draw (the same
    generator state gives the same leading normals)."""
    full = draw_noise(latent_1, max_samples - 1, torch.Generator().manual_seed(0))
    ok = [n for n in range(1, max_samples + 1)
          if torch.equal(draw_noise(latent_1, n - 1, torch.Generator().manual_seed(0)), full[:n - 1])]
    return tuple(ok)


def _agreement(tokens_BSL: torch.Tensor) -> np.ndarray:
    """B, S: how many leading tokens each sample shares with sample 0."""
    differ = tokens_BSL != tokens_BSL[:, :1]
    L = tokens_BSL.shape[2]
    first = torch.where(differ.any(-1), differ.int().argmax(-1), torch.full(differ.shape[:2], L))
    return first.numpy()


@torch.no_grad()
def build_table(clf: Classifier, items: Sequence[Item], candidates: Sequence[int], max_samples: int, sigma: float,
                seed: int = 0, on_step: Callable[[int], None] | None = None) -> ScoreTable:
    """Score every candidate on every scale and sample of every image, through the classifier's own batch loop
    (images loaded, skipped and encoded in the steps ``avarc classify`` uses). ``on_step(n)``: n more images done."""
    if max_samples < 1:
        raise AvarcError(f"must be at least 1, got {max_samples}", option="max_samples")
    model = clf.model
    cands = sorted(dict.fromkeys(int(c) for c in candidates))
    ends = model.spec.var.scale_ends()
    K, S, M = len(cands), len(ends), max_samples
    bounds = np.asarray([0, *ends])
    classes = torch.tensor(cands)
    exact: list[tuple[int, ...]] = []      # set by the first batch (it depends on the latent's size only)

    def step(batch: list[Item], pixels: list[np.ndarray | str]) -> list[tuple[np.ndarray, np.ndarray] | str]:
        good = [(it, px) for it, px in zip(batch, pixels) if not isinstance(px, str)]
        if good:
            latents = model.encode(torch.stack([pixels_to_tensor(px) for _, px in good]))
            if not exact:
                exact.append(exact_sample_counts(latents[:1].cpu(), M))
            # B, M, L
            tokens = sample_tokens(model, latents, M, sigma, seed)
            B = tokens.shape[0]
            seq = tokens.repeat_interleave(K, 1).flatten(0, 1)                             # B·M·K, L (class fastest)
            lp = model.pair_logp(seq, classes.repeat(B * M)).double()                      # B·M·K, L
            per_scale = torch.stack([lp[:, a:b].sum(-1) for a, b in zip(bounds[:-1], bounds[1:])], -1)
            rows = iter(zip(per_scale.view(B, M, K, S).permute(0, 2, 3, 1).numpy(), _agreement(tokens)))  # K, S, M
        out = [px if isinstance(px, str) else next(rows) for px in pixels]
        if on_step:
            on_step(len(batch))
        return out

    per_step = distributed.images_per_step(clf.batch_size, K)
    with clf.settings():
        done = list(zip(items, (r for batch in distributed.run(items, clf.load, step, per_step=per_step)
                                for r in batch)))
    rows = [(it, r) for it, r in done if not isinstance(r, str)]
    if not rows:
        raise AvarcError("no readable images to tune on; check the folder")
    return ScoreTable(np.stack([r[0] for _, r in rows]), np.stack([r[1] for _, r in rows]),
                      np.asarray([-1 if it.label is None else it.label for it, _ in rows], dtype=np.int64),
                      [it.path for it, _ in rows], cands, ends, float(sigma), seed,
                      exact[0], [(it.path, r) for it, r in done if isinstance(r, str)])
