"""What a stage of the schedule decides, as plain data: each image's candidates and scores per stage, the one
ranking rule, and the final :class:`Prediction`. The schedule writes these, the precision guard re-scores them,
results and tasks read them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


def rank(candidates: Sequence[int], scores: Sequence[float]) -> list[tuple[int, float]]:
    """Candidates best first; ties by class index, for a stable order (the one ranking rule of every stage)."""
    return sorted(zip(candidates, scores), key=lambda cs: (-cs[1], cs[0]))


def choose_survivors(cands_AK: torch.Tensor, scores_AK: torch.Tensor, keep: int,
                     exit_margin: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`StageScores.decisions` for A images at once, where their scores are (on the device, so no stage waits
    for a read before the next one is queued): each row's best ``keep`` candidates by :func:`rank`'s rule (score,
    then class index: a stable sort by class, then a stable sort by score) and whether its lead, taken in float64
    as the host takes it, reaches ``exit_margin``. → A, keep survivor classes (best first) and A exits."""
    by_class = cands_AK.argsort(dim=1, stable=True)
    order = by_class.gather(1, scores_AK.gather(1, by_class).argsort(dim=1, descending=True, stable=True))
    survivors_AK = cands_AK.gather(1, order[:, :keep])
    if exit_margin is None or cands_AK.shape[1] < 2:
        return survivors_AK, torch.zeros(cands_AK.shape[0], dtype=torch.bool, device=cands_AK.device)
    top_A2 = scores_AK.gather(1, order[:, :2]).to(torch.float64)
    return survivors_AK, top_A2[:, 0] - top_A2[:, 1] >= exit_margin


@dataclass
class StageScores:
    """One stage of one image: the candidates it scored (in input order) and their scores."""

    scales: int
    samples: int
    keep: int
    candidates: list[int]
    scores: list[float]
    exact: set[int] = field(default_factory=set)     # candidates the precision guard re-scored in fp32

    def ranked(self) -> list[tuple[int, float]]:
        return rank(self.candidates, self.scores)

    def decisions(self, exit_margin: float | None) -> tuple[int, list[int], bool]:
        """What the scores decide, from one ranking: the best candidate, the survivors (best first) and whether the
        image exits early (its lead reaches ``exit_margin``)."""
        ranked = self.ranked()
        exits = exit_margin is not None and len(ranked) > 1 and ranked[0][1] - ranked[1][1] >= exit_margin
        return ranked[0][0], [c for c, _ in ranked[:self.keep]], exits


@dataclass
class ClassScore:
    """One ranked class of a :class:`Prediction`."""

    id: int
    name: str
    score: float        # the class's score in the last stage that scored it (log-likelihood in nats, up to a constant)
    p: float            # its posterior probability (0 for a class pruned before the last stage)
    stage: int          # the 1-based stage that gave ``score``: scores of different stages do not compare

    def to_dict(self) -> dict:
        """The shape of a record's ``topk`` entry and of ``Prediction.to_dict()``'s ``top``."""
        return {"class": self.id, "name": self.name, "score": round(self.score, 4), "stage": self.stage,
                "p": round(self.p, 6)}


@dataclass(repr=False)
class Prediction:
    """The outcome for one image. ``ranking`` is every candidate: the last stage's by score, then classes pruned
    earlier by their last score (later stages first); ``posterior`` is over the last stage's candidates."""

    pred: int
    ranking: list[tuple[int, float]]
    stages: list[StageScores]
    posterior: list[tuple[int, float]]
    exited_after: int | None = None        # 1-based stage after which the image stopped early
    pred_name: str | None = None           # the predicted class's name (set by ``Classifier``)
    label: int | None = None               # the true class, when the caller knows it
    gflops: dict[str, float] | None = None  # this image's compute, {"executed", "paper"} (set by ``Classifier``)
    ood: dict | None = None                # out-of-distribution scores (``core.tasks.ood``; set by ``Classifier``)
    abstained: bool = False                # the profile's OOD rule answered "none of these" (``pred`` is kept)
    class_names: Sequence[str] | None = field(default=None, repr=False)   # every class's name (set by ``Classifier``)
    path: str | None = None                # the file (or ``DATASET[split]#ROW``) it came from; None: given in memory

    @property
    def top(self) -> list[ClassScore]:
        """Every candidate, best first, with its name, score (nats) and posterior probability (0 for a class
        pruned before the last stage)."""
        post = dict(self.posterior)
        names = self.class_names
        stage = {c: i for i, st in enumerate(self.stages, 1) for c in st.candidates}     # the last that scored c
        return [ClassScore(c, names[c] if names is not None else str(c), s, post.get(c, 0.0), stage.get(c, 1))
                for c, s in self.ranking]

    def to_dict(self, topk: int = 5) -> dict:
        """Plain data (JSON-ready): the prediction, the true class if known and the best ``topk`` classes (each as a
        record's ``topk`` entry: ``class``, ``name``, ``score``, ``stage``, ``p``)."""
        names = self.class_names
        return {"path": self.path, "pred": self.pred, "pred_name": self.pred_name,
                "label": self.label, "label_name": names[self.label] if names is not None and self.label is not None
                else None, "exited_after": self.exited_after, "top": [t.to_dict() for t in self.top[:topk]],
                "abstained": self.abstained, "ood": self.ood, "gflops": self.gflops}

    def __repr__(self) -> str:
        best = ", ".join(f"{t.name!r} p={t.p:.3g}" for t in self.top[:3])
        true = "" if self.label is None else f", label={self.label}"
        where = "" if self.path is None else f", path={self.path!r}"
        return f"Prediction({self.pred_name or self.pred!r}; top: {best}{true}{where})"

    def label_rank(self, label: int) -> int | None:
        """1-based rank of a class in the ranking (None if it was not a candidate)."""
        return next((i for i, (c, _) in enumerate(self.ranking, 1) if c == label), None)


@dataclass
class Skipped:
    """An image of a list, folder or dataset that could not be read: where it is, why, and its label if known (the
    library's counterpart of a skipped record; the other images still get their results)."""

    path: str
    reason: str
    label: int | None = None

    def to_dict(self) -> dict:
        return {"path": self.path, "skipped": self.reason, "label": self.label}
