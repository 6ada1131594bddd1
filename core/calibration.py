"""Calibrating the posterior: a softmax temperature fitted by minimum negative log-likelihood, and the expected
calibration error (ECE) that says how far the top-1 confidence is from the top-1 accuracy.

Summed token log-likelihoods of different classes are tens of nats apart on small models, so the untempered
posterior puts nearly all mass on one class, right or wrong; one temperature fitted on labelled images fixes that.
Scores are N×K arrays with NaN where a class was not among an image's last-stage candidates (its probability is 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NUM_BINS = 15
_FAR = -1e30      # a finite stand-in for "not a candidate", so gradients stay finite


def posterior(scores_NK: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(scores / T) over each image's candidates (float64, as ``core.schedule`` computes it)."""
    s = torch.from_numpy(np.where(np.isnan(scores_NK), -np.inf, scores_NK)) / temperature
    return torch.softmax(s, 1).numpy()


def fit_temperature(scores_NK: np.ndarray, label_cols: np.ndarray) -> float:
    """The T minimising the mean NLL of the true class over images where it is a candidate (and not the only
    one); 1 when no image says anything about T. Kept in [0.01, 1000]."""
    cand = ~np.isnan(scores_NK)
    rows = np.arange(len(label_cols))
    use = cand[rows, label_cols] & (cand.sum(1) > 1)
    if not use.any():
        return 1.0
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
    return float(log_t.detach().clamp(lo, hi).exp())


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


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = NUM_BINS) -> Reliability:
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
