"""Abstention ("none of these") fitted on in-distribution images: classify them with a classifier's profile and
set each OOD score's threshold to accept a target share of them; the profile then carries the rule."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

from ..classifier import Classifier
from ..engine.profile import OodRule, Profile
from ..io.data import Item
from ..tasks.ood import DEFAULT_OOD_SCORE, check_score, fit_thresholds


def calibrate_ood(clf: Classifier, items: Sequence[Item], candidates: Sequence[int], coverage: float = 0.95,
                  score: str = DEFAULT_OOD_SCORE, seed: int = 0,
                  on_step: Callable[[int], None] | None = None) -> tuple[Profile, int]:
    """Abstention for in-distribution ``items``: classify them with the classifier's profile and fit each OOD score's
    threshold to accept ``coverage`` of them; the profile with that rule (``score`` decides) and the images used."""
    oods = []
    for batch in clf.classify_items(items, candidates, seed, topk=1):
        oods += [r["ood"] for r in batch if r["ood"] is not None]
        if on_step is not None:
            on_step(len(batch))
    rule = OodRule(check_score(score), coverage, tuple(fit_thresholds(oods, coverage).items()))
    return replace(clf.profile, ood=rule), len(oods)
