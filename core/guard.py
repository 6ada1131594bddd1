"""The precision guard: predictions of a bf16/fp16 run equal fp32's at almost bf16 cost.

bf16 moves a class score by up to about a nat (the body's matmuls, not the head, dominate), as much as the gap
between close final candidates. Only the best two of the last stage decide the prediction, so an image whose two
are closer than the profile's guard margin (``Profile.margin``) has just those two re-scored in fp32 (all of the
stage's samples); every other image keeps its bf16 scores. Images decided by a wide margin pay nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .model import Model
from .profiles import Profile
from .scoring import Scorer

if TYPE_CHECKING:
    from .schedule import StageScores


def needs_guard(stage: StageScores, margin: float) -> list[int]:
    """The best two candidates of a stage if they are closer than ``margin`` nats, else nothing."""
    ranked = stage.ranked()
    if margin <= 0 or len(ranked) < 2 or ranked[0][1] - ranked[1][1] >= margin:
        return []
    return [ranked[0][0], ranked[1][0]]


def apply_guard(model: Model, scorer: Scorer, tokens_BSL: torch.Tensor, last: dict[int, StageScores],
                profile: Profile) -> None:
    """Re-score in fp32 the close top two of each image's last stage (``last``: image index → that stage) and
    write the fp32 scores into the stage, in place. Nothing happens in fp32 or with a margin of 0."""
    if model.dtype == torch.float32:
        return
    ends = model.spec.var.scale_ends()
    by_scales: dict[int, list[tuple[int, int, int]]] = {}      # scales → (image, candidate, sample) rows
    for i, st in last.items():
        for c in needs_guard(st, profile.margin(ends[st.scales - 1])):
            by_scales.setdefault(st.scales, []).extend((i, c, j) for j in range(st.samples))
    for scales, rows in by_scales.items():
        n_tok = ends[scales - 1]
        seq = torch.stack([tokens_BSL[i, j, :n_tok] for i, _, j in rows])
        sums = scorer.score_fp32(seq, torch.tensor([c for _, c, _ in rows]), scales)
        per: dict[int, dict[int, list[float]]] = {}
        for (i, c, _), s in zip(rows, sums.tolist()):
            per.setdefault(i, {}).setdefault(c, []).append(s)
        for i, by_class in per.items():
            st = last[i]
            before = st.ranked()[0][0]
            for c, vals in by_class.items():
                st.scores[st.candidates.index(c)] = sum(vals) / len(vals)
            scorer.guarded += 1
            scorer.guard_flips += st.ranked()[0][0] != before
