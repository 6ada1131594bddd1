"""The precision guard: predictions of a bf16/fp16 run equal fp32's at almost bf16 cost.

bf16 moves a class score by up to about a nat (the body's matmuls, not the head, dominate), as much as the gap
between close candidates. Three decisions read the scores: which candidates survive a stage (its ``keep``),
whether an image exits early (its lead against ``exit_margin``) and the prediction (the best of its last stage).
Where a decision hangs on scores closer than the profile's guard margin (``Profile.margin``), just the candidates
it hangs on are re-scored in fp32 (all of the stage's samples); every other candidate keeps its bf16 score.
Images decided by wide margins pay nothing. On the digits, a pruning tie of 0.003 nats at the first stage cost
one image its true class in bf16 before stages other than the last were guarded.
"""
from __future__ import annotations

import torch

from .model import Model
from .profile import Profile
from .scoring import Scorer
from .stages import StageScores
from .transfers import host_read


def at_risk(stage: StageScores, margin: float, last: bool, exit_margin: float | None = None) -> set[int]:
    """The candidates whose bf16 scores could flip a decision of this stage: for an image's last stage its best two
    if they are closer than ``margin``; else those within ``margin`` of the keep boundary (a survivor within it of
    the best pruned score, a pruned one within it of the worst surviving score), and the best two if their lead is
    within ``margin`` of ``exit_margin``."""
    if margin <= 0 or len(stage.candidates) < 2:
        return set()
    ranked = stage.ranked()
    lead = ranked[0][1] - ranked[1][1]
    top_two = {ranked[0][0], ranked[1][0]}
    if last:
        return top_two if lead < margin else set()
    out = set()
    k = stage.keep
    if k < len(ranked):
        weakest_kept, best_pruned = ranked[k - 1][1], ranked[k][1]
        out |= {c for c, s in ranked[:k] if s < best_pruned + margin}
        out |= {c for c, s in ranked[k:] if s > weakest_kept - margin}
    if exit_margin is not None and abs(lead - exit_margin) < margin:
        out |= top_two
    return out


def guard_stages(model: Model, scorer: Scorer, tokens_BSL: torch.Tensor, stages: dict[int, StageScores],
                 profile: Profile, last: bool, exit_margin: float | None) -> tuple[set[int], set[int]]:
    """The guard on one stage of each image (``stages``: image index → its stage; ``last``: each image's last stage,
    whose best candidate is the prediction): re-score the candidates at risk in fp32, in place. Returns the images
    re-scored and those whose decisions that changed. fp32 runs need no guard."""
    if model.dtype == torch.float32:
        return set(), set()
    ends = model.spec.var.scale_ends()
    risky = {i: (st, r) for i, st in stages.items()
             if (r := at_risk(st, profile.margin(ends[st.scales - 1]), last, exit_margin))}

    def outcome(st: StageScores) -> tuple:           # the survivors as a set: their order decides nothing
        best, survivors, exits = st.decisions(exit_margin)
        return best, frozenset(survivors), exits

    before = {i: outcome(st) for i, (st, _) in risky.items()}
    _rescore(scorer, tokens_BSL, risky, ends)
    return set(risky), {i for i, (st, _) in risky.items() if outcome(st) != before[i]}


def _rescore(scorer: Scorer, tokens_BSL: torch.Tensor, risky: dict[int, tuple[StageScores, set[int]]],
             ends: list[int]) -> None:
    """Write the fp32 scores (mean over the stage's samples) of the given candidates into each stage; a candidate
    already re-scored in fp32 keeps its score. ``ends``: the model's token count after each scale."""
    by_scales: dict[int, list[tuple[int, int, int]]] = {}      # scales → (image, candidate, sample) rows
    for i, (st, cands) in risky.items():
        for c in sorted(cands - st.exact):
            by_scales.setdefault(st.scales, []).extend((i, c, j) for j in range(st.samples))
    for scales, rows in by_scales.items():
        n_tok = ends[scales - 1]
        seq = torch.stack([tokens_BSL[i, j, :n_tok] for i, _, j in rows])
        sums = scorer.score_fp32(seq, torch.tensor([c for _, c, _ in rows]), scales)
        per: dict[int, dict[int, list[float]]] = {}
        for (i, c, _), s in zip(rows, host_read(sums)[0].tolist()):
            per.setdefault(i, {}).setdefault(c, []).append(s)
        for i, by_class in per.items():
            st = risky[i][0]
            for c, vals in by_class.items():
                st.scores[st.candidates.index(c)] = sum(vals) / len(vals)
            st.exact |= by_class.keys()
