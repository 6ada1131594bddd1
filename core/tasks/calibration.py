"""Calibrating the posterior: a softmax temperature fitted by minimum negative log-likelihood, and the expected
calibration error (ECE) that says how far the top-1 confidence is from the top-1 accuracy.

A stage's score sums the log-likelihoods of many tokens as if each were independent evidence; they are not, so
the untempered posterior tends to be overconfident, and a temperature above 1 softens it. The temperature is
fitted only in that direction (T ≥ 1; the NLL is convex in 1/T, so this is the unconstrained fit or 1): half the
images ``avarc tune`` fits it on are the ones it chose the schedule to get right, so they hold fewer mistakes than
new images will, and a fit on a handful of mistakes, or on one near tie, sharpens (T < 1) where new images need
the opposite. Where no image is ranked wrongly the NLL only falls as T shrinks and says nothing about T. In
either case the posterior stays untempered (T = 1), and tune says why. What a fitted temperature does to images
it has not seen is measured by cross-fitting (:func:`cross_fitted_temperatures`).
Scores are N×K arrays with NaN where a class was not among an image's last-stage candidates (its probability is 0);
a temperature is one number for every image or one per image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike

NUM_BINS = 15
_FAR = -1e30      # a finite stand-in for "not a candidate", so gradients stay finite


def posterior(scores_NK: np.ndarray, temperature: float | np.ndarray) -> np.ndarray:
    """softmax(scores / T) over each image's candidates (float64, as ``core.engine.schedule`` computes it)."""
    t = torch.as_tensor(np.asarray(temperature, dtype=np.float64)).reshape(-1, 1)
    return torch.softmax(torch.from_numpy(np.where(np.isnan(scores_NK), -np.inf, scores_NK)) / t, 1).numpy()


def nll(scores_NK: np.ndarray, label_cols: np.ndarray, temperature: float | np.ndarray) -> tuple[float, int]:
    """Mean NLL of the true class over the images whose true class is a candidate (a pruned one has probability
    0), and how many images that is."""
    use = ~np.isnan(scores_NK[np.arange(len(label_cols)), label_cols])
    if not use.any():
        return float("nan"), 0
    t = np.broadcast_to(np.asarray(temperature, dtype=np.float64), use.shape)[use]
    p = posterior(scores_NK[use], t)[np.arange(int(use.sum())), label_cols[use]]
    return float(-np.log(p).mean()), int(use.sum())


@dataclass(frozen=True)
class TemperatureFit:
    """The minimum-NLL temperature over T > 0 (``fitted``) on some images, and the one to use (``temperature``):
    the fit where it softens the posterior, else 1."""

    fitted: float
    images: int          # images whose NLL depends on T (true class a candidate, not the only one)
    mistakes: int        # of them, those ranked wrongly

    @property
    def temperature(self) -> float:
        return max(self.fitted, 1.0) if self.mistakes else 1.0

    def describe(self) -> str:
        """What was fitted and why it is or is not used, in one line."""
        seen = f"minimum NLL on {self.images} images, {self.mistakes or 'none'} ranked wrongly"
        if not self.mistakes:
            return f"1 ({seen}: nothing to fit)"
        if self.fitted >= 1:
            return f"{self.fitted:.4g} ({seen})"
        return f"1 ({seen}, would sharpen to {self.fitted:.4g}; only softening is fitted)"


def fit_temperature(scores_NK: np.ndarray, label_cols: np.ndarray) -> TemperatureFit:
    """The T minimising the mean NLL of the true class over the images where it depends on T, kept in
    [0.01, 1000] and rounded to 4 digits, as a profile holds it."""
    cand = ~np.isnan(scores_NK)
    use = cand[np.arange(len(label_cols)), label_cols] & (cand.sum(1) > 1)
    if not use.any():
        return TemperatureFit(1.0, 0, 0)
    s = torch.from_numpy(np.where(cand, scores_NK, _FAR)[use])
    s = s - s.max(1, keepdim=True).values
    y = torch.from_numpy(label_cols[use])
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1, max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")
    lo, hi = float(np.log(0.01)), float(np.log(1000.0))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(s / log_t.clamp(lo, hi).exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    fitted = float(f"{float(log_t.detach().clamp(lo, hi).exp()):.4g}")
    return TemperatureFit(fitted, int(use.sum()), int((s.argmax(1) != y).sum()))


def cross_fitted_temperatures(scores_NK: np.ndarray, label_cols: np.ndarray, judged: np.ndarray, folds: int = 10,
                               seed: int = 0) -> np.ndarray:
    """For each ``judged`` image, the temperature fitted (as :func:`fit_temperature`, softening only) on every image
    outside its fold: the judged images split into ``folds`` seeded folds, so each gets the posterior of a fit that
    never saw it, and their ECE and NLL say what the fitted temperature does to new images."""
    judged = np.asarray(judged, dtype=np.int64)
    out = np.ones(len(judged))
    order = np.random.default_rng(seed).permutation(len(judged))
    for fold in np.array_split(order, max(1, min(folds, len(judged)))):
        rest = np.ones(len(label_cols), dtype=bool)
        rest[judged[fold]] = False
        out[fold] = fit_temperature(scores_NK[rest], label_cols[rest]).temperature
    return out


@dataclass
class Reliability:
    """Per confidence bin: mean top-1 confidence, top-1 accuracy and image count (equal-width bins on [0, 1])."""

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray

    @property
    def ece(self) -> float:
        n = self.count.sum()
        gap = np.abs(np.nan_to_num(self.accuracy) - np.nan_to_num(self.confidence))
        return float((self.count * gap).sum() / n) if n else float("nan")


def reliability(confidence: ArrayLike, correct: np.ndarray, bins: int = NUM_BINS) -> Reliability:
    confidence, correct = np.asarray(confidence, float), np.asarray(correct, float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(which, confidence, bins) / count
        acc = np.bincount(which, correct, bins) / count
    return Reliability(edges, conf, acc, count)


def expected_calibration_error(probs_NK: np.ndarray, label_cols: np.ndarray, bins: int = NUM_BINS) -> float:
    """ECE of the top-1 prediction: Σ_bins (n_b / N)·|accuracy_b − confidence_b|."""
    top = probs_NK.argmax(1)
    return reliability(probs_NK.max(1), top == label_cols, bins).ece
