"""Out-of-distribution scores: how well *any* class explains an image, from what a schedule already computed plus one
null-class forward, and the abstention rule that turns a score into "none of these".

log p(x) = logsumexp_y [log p(x|y) + log p(y)] (p(y) uniform over the candidates, x = the image's clean tokens on the
final stage's scales) is bounded exactly: a class scored on those scales with the clean tokens alone (a stage's score,
or the prediction's extra forward after an early exit) contributes its exact term to the lower bound; every other
class is bounded above by its smallest clean-token score on no more scales (each further token's log-probability is
≤ 0), or by 0 when it never had one, which gives the upper bound. "Exact" is in the model's dtype: in bf16 the bounds
hold for bf16's scores.

Every score is "higher = more in-distribution":

- ``likelihood``: the lower bound of log p(x) per token, in nats;
- ``ratio``: log p(x|ŷ) − log p(x|∅), the predicted class against the unconditional (null-class) model;
- ``posterior``: the posterior's maximum (the discriminative baseline).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..choices import OOD_SCORES
from ..engine.model import Model
from ..engine.profile import OodRule, Profile
from ..engine.stages import Prediction
from ..errors import AvarcError

DEFAULT_OOD_SCORE = "likelihood"


def check_score(name: str) -> str:
    if name not in OOD_SCORES:
        raise AvarcError(f"unknown OOD score {name!r}; use one of {', '.join(OOD_SCORES)}", option="ood-score")
    return name


def _logsumexp(values: Sequence[float]) -> float:
    return float(torch.logsumexp(torch.tensor(values, dtype=torch.float64), 0)) if values else -math.inf


def class_bounds(p: Prediction, final_scales: int) -> tuple[dict[int, float], dict[int, float]]:
    """(exact, upper): per class, its exact clean-token log-likelihood on ``final_scales`` scales where a stage scored
    it so, and an upper bound on it for every candidate (0 when no clean-token stage on ≤ those scales scored it)."""
    exact: dict[int, float] = {}
    upper: dict[int, float] = {c: 0.0 for c in p.stages[0].candidates}
    for st in p.stages:
        if st.samples != 1 or st.scales > final_scales:
            continue
        for c, s in zip(st.candidates, st.scores):
            upper[c] = min(upper[c], s)
            if st.scales == final_scales:
                exact[c] = s
    return exact, upper


def log_px_bounds(exact: dict[int, float], upper: dict[int, float]) -> tuple[float, float]:
    """[lower, upper] on log p(x) with a uniform prior over the candidates (``upper``'s keys)."""
    prior = -math.log(len(upper))
    return _logsumexp([s + prior for s in exact.values()]), _logsumexp([s + prior for s in upper.values()])


@torch.no_grad()
def ood_scores(model: Model, latents: torch.Tensor, preds: Sequence[Prediction], profile: Profile,
               chunk: int | None = None) -> list[dict]:
    """Every prediction's ``ood`` object: the bounds on log p(x) (also per token), the ratio against the null
    class and the posterior's maximum. One forward per image for the null class on the final stage's scales, and one
    for the predicted class when no stage scored it exactly there (an early exit); that score joins the bounds."""
    S = int(profile.stages[-1].scales)
    n_tok = model.spec.var.scale_ends()[S - 1]
    tokens = model.tokenize_latent(latents).cpu()[:, :n_tok]
    bounds = [class_bounds(p, S) for p in preds]
    rows = [(i, model.null_class) for i in range(len(preds))]
    rows += [(i, p.pred) for i, p in enumerate(preds) if p.pred not in bounds[i][0]]
    sums = model.pair_logp(tokens[[i for i, _ in rows]], torch.tensor([c for _, c in rows]), S, chunk).double().sum(-1)
    got = {row: float(s) for row, s in zip(rows, sums)}
    out = []
    for i, p in enumerate(preds):
        exact, upper = bounds[i]
        if p.pred not in exact:
            exact[p.pred] = got[(i, p.pred)]
            upper[p.pred] = min(upper[p.pred], exact[p.pred])
        lo, hi = log_px_bounds(exact, upper)
        null = got[(i, model.null_class)]
        out.append({"log_px": [lo, hi], "log_px_per_token": [lo / n_tok, hi / n_tok], "tokens": n_tok,
                    "log_px_given_pred": exact[p.pred], "log_px_given_null": null,
                    "likelihood": lo / n_tok, "ratio": exact[p.pred] - null, "posterior": p.posterior[0][1]})
    return out


def decide(ood: dict, score: str, rule: OodRule | None) -> bool:
    """Whether an image is abstained on: its ``score`` is below the rule's threshold for that score."""
    threshold = rule.threshold(score) if rule is not None else None
    ood.update(score=score, threshold=threshold)
    return threshold is not None and ood[score] < threshold


def fit_thresholds(oods: Sequence[Mapping[str, Any]], coverage: float) -> dict[str, float]:
    """Per score, the largest threshold that still accepts at least ``coverage`` of these in-distribution images
    (accept: score ≥ threshold)."""
    if not 0 < coverage <= 1:
        raise AvarcError(f"coverage must be in (0, 1], got {coverage}", option="coverage")
    if not oods:
        raise AvarcError("no in-distribution images could be scored; check the inputs")
    out = {}
    for name in OOD_SCORES:
        values = np.sort([o[name] for o in oods])
        out[name] = float(values[int(math.floor(len(values) * (1 - coverage) + 1e-9))])
    return out


def auroc(inside: Sequence[float], outside: Sequence[float]) -> float:
    """The probability that an in-distribution image scores above an out-of-distribution one (ties count half)."""
    a, b = np.asarray(inside, np.float64)[:, None], np.asarray(outside, np.float64)[None, :]
    return float(((a > b).sum() + 0.5 * (a == b).sum()) / (a.size * b.size))
