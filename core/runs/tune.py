"""Schedule search: replay any profile on a :class:`~core.runs.schedule_table.ScoreTable` exactly as ``avarc classify``
runs it, search stage counts, scales, samples, keeps and early-exit margins, and pick the most accurate schedule
within a compute budget on one part of the images, judged on the other.

The replay follows :func:`core.engine.schedule.run_stages` step by step: stage scores are the mean over the first
``samples`` samples of the summed log-likelihood of the first ``scales`` scales; candidates are ranked by score,
ties by class id; the best ``keep`` survive; an image whose best candidate leads the runner-up by ``exit_margin``
stops. Compute is counted as ``core/flops.py`` counts it: the paper's convention (every scored token, AdaLN per
sequence, encoder once) and what the engine executes (:class:`core.engine.scoring.Scorer`: a stage no longer than what a
(class, sample) has is free, a longer one extends the cached prefix, a neighbour starts from the clean sequence's
keys/values on the leading scales it shares with it). Executed compute assumes the keys/values fit the scorer's
cache budget, as they do unless a batch holds very many pairs of a large model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
from pydantic import TypeAdapter
from typing_extensions import TypedDict

from ..engine.flops import encoder_macs, sequence_macs
from ..engine.profile import Profile, Stage
from ..errors import AvarcError
from ..io.profiles import list_profiles
from ..io.records import model_identity
from ..io.registry import is_registry_name
from ..models.specs import ModelSpec
from ..tasks.calibration import (
    TemperatureFit,
    cross_fitted_temperatures,
    expected_calibration_error,
    fit_temperature,
    nll,
    posterior,
)
from .schedule_table import ScoreTable

if TYPE_CHECKING:
    from ..classifier import Classifier

KEEP_GRID = (2, 3, 4, 5, 10, 20, 50, 100, 200, 500)
MARGIN_QUANTILES = (0.5, 0.75, 0.9, 0.97)


@dataclass
class Costs:
    """MACs lookups for one geometry: ``linear[s, t]`` = one (sequence, class) pair scoring scales t+1…s on top of
    t cached scales (paper convention: linear layers, embedding and AdaLN; attention excluded)."""

    linear: np.ndarray
    encoder: float

    @classmethod
    def of(cls, spec: ModelSpec) -> Costs:
        ends = [0, *spec.var.scale_ends()]
        S = len(ends) - 1
        lin = np.zeros((S + 1, S + 1))
        for s in range(1, S + 1):
            for t in range(s):
                lin[s, t] = sequence_macs(spec.var, ends[s], ends[t]).linear
        return cls(lin, float(encoder_macs(spec.vae, spec.image_size, spec.var.patch_nums)))


@dataclass
class Replay:
    """What classify does with each image of a table under one schedule. Arrays are over the table's images;
    ``stage_scores[t]`` is N×K with NaN where stage t did not score a candidate; ``final_scores`` are the scores of
    each image's last stage (its posterior's input); ``exited`` is the 1-based stage of an early exit, else 0."""

    stages: tuple[Stage, ...]
    pred: np.ndarray
    stage_scores: list[np.ndarray]
    final_scores: np.ndarray
    exited: np.ndarray
    paper_macs: np.ndarray
    executed_macs: np.ndarray


class Replayer:
    """Replays schedules on one table (stage scores and their orders computed once, shared by every schedule)."""

    def __init__(self, table: ScoreTable, spec: ModelSpec):
        if len(spec.var.scale_ends()) != len(table.scale_ends):
            raise AvarcError("the score table was built for another model geometry")
        self.table, self.spec, self.costs = table, spec, Costs.of(spec)
        ends = np.asarray(table.scale_ends)
        self.agree_scales = np.searchsorted(ends, table.agree_NM, side="right")       # whole scales shared, N×M
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    @cached_property
    def scores_NKSM(self) -> np.ndarray:
        """[n, k, s−1, m−1]: a stage's score on s scales and m samples (mean of the first m samples' prefix sums)."""
        prefix = self.table.sums_NKSM.cumsum(2)
        return prefix.cumsum(3) / np.arange(1, self.table.max_samples + 1)

    def order(self, s: int, m: int) -> np.ndarray:
        """N×K candidate columns best first (stable: ties keep class-id order, as classify ranks them)."""
        if (s, m) not in self._orders:
            self._orders[(s, m)] = np.argsort(-self.scores_NKSM[:, :, s - 1, m - 1], axis=1, kind="stable")
        return self._orders[(s, m)]

    def start(self) -> _State:
        N, K = self.table.sums_NKSM.shape[:2]
        M = self.table.max_samples
        return _State(np.ones((N, K), bool), np.ones(N, bool), np.zeros(N, np.int64), np.zeros((N, M), np.int64),
                      np.zeros((N, M), np.int64), np.full(N, self.costs.encoder), np.full(N, self.costs.encoder),
                      np.zeros(N, np.int64), np.full((N, K), np.nan), ())

    def step(self, st: _State, stage: Stage, later: bool) -> _State:
        """One stage on every image still running; ``later``: a later stage can use this one's keys/values (in a
        searched schedule every later stage does more per candidate, so any later stage can)."""
        s, m = int(stage.scales), stage.samples
        if m > self.table.max_samples:
            raise AvarcError(f"stage asks for {m} samples but the table holds {self.table.max_samples}")
        N = st.alive.shape[0]
        rows = np.arange(N)[:, None]
        act = st.active
        cnt = st.alive.sum(1) * act
        paper = st.paper + cnt * m * self.costs.linear[s, 0]
        executed, scored, cached = st.executed.copy(), st.scored.copy(), st.cached.copy()
        clean = st.cached[:, 0]
        for j in range(m):
            free = st.scored[:, j] >= s
            begin = np.minimum(np.maximum(st.cached[:, j], np.minimum(clean, self.agree_scales[:, j])), s - 1)
            executed = executed + np.where(free, 0.0, self.costs.linear[s, begin]) * cnt
            run = ~free & act
            scored[run, j] = s
            cached[run, j] = s if later else 0
        score, order = self.table_scores(s, m), self.order(s, m)
        alive_sorted, pos, first, second = _ranked(st.alive & act[:, None], order)
        survive = np.zeros_like(st.alive)
        survive[rows, order] = alive_sorted & (pos <= stage.keep)
        n_alive = pos[:, -1]
        pred = np.where(act, first, st.pred)
        scored_now = np.where(st.alive & act[:, None], score, np.nan)
        final = np.where(act[:, None], scored_now, st.final)
        alive = np.where(act[:, None], survive, st.alive)
        exited, active = st.exited.copy(), act.copy()
        if stage.exit_margin is not None:
            lead = score[np.arange(N), first] - score[np.arange(N), second]
            out = act & (n_alive > 1) & (lead >= stage.exit_margin)
            exited[out] = len(st.stages) + 1
            active &= ~out
        return _State(alive, active, pred, scored, cached, paper, executed, exited, final,
                      (*st.stages, stage), (*st.stage_scores, scored_now))

    def table_scores(self, s: int, m: int) -> np.ndarray:
        return self.scores_NKSM[:, :, s - 1, m - 1]

    def leads(self, st: _State, stage: Stage) -> np.ndarray:
        """Best-minus-runner-up score at ``stage`` for the images still running (for choosing exit margins)."""
        s, m = int(stage.scales), stage.samples
        score = self.table_scores(s, m)
        _, pos, first, second = _ranked(st.alive, self.order(s, m))
        rows = np.arange(score.shape[0])
        return (score[rows, first] - score[rows, second])[st.active & (pos[:, -1] > 1)]

    def replay(self, stages: tuple[Stage, ...]) -> Replay:
        st = self.start()
        for t, stage in enumerate(stages):     # keys/values are kept when a later stage can use them, as classify does
            later = any(int(nxt.scales) > int(stage.scales) or nxt.samples > 1 for nxt in stages[t + 1:])
            st = self.step(st, stage, later=later)
        return st.result(self.table)


def _ranked(alive: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Alive candidates in rank order: the N×K mask in that order, its running count, and the best and
    second-best alive columns (meaningful where at least one / two are alive)."""
    rows = np.arange(alive.shape[0])
    alive_sorted = alive[rows[:, None], order]
    pos = alive_sorted.cumsum(1)
    return alive_sorted, pos, order[rows, (pos >= 1).argmax(1)], order[rows, (pos >= 2).argmax(1)]


@dataclass
class _State:
    alive: np.ndarray        # N×K candidates still in the running
    active: np.ndarray       # N images that have not exited
    pred: np.ndarray         # N best candidate column of the last stage run
    scored: np.ndarray       # N×M scales scored per sample (same for every surviving class)
    cached: np.ndarray       # N×M scales whose keys/values are kept per sample (0: none)
    paper: np.ndarray
    executed: np.ndarray
    exited: np.ndarray
    final: np.ndarray
    stages: tuple[Stage, ...]
    stage_scores: tuple[np.ndarray, ...] = ()

    def result(self, table: ScoreTable) -> Replay:
        cands = np.asarray(table.candidates)
        return Replay(self.stages, cands[self.pred], list(self.stage_scores), self.final, self.exited,
                      self.paper, self.executed)


@dataclass(frozen=True)
class Point:
    """One schedule's accuracy and mean compute per image (GFLOPs = 1e9 MACs, the paper's unit) on some images."""

    stages: tuple[Stage, ...]
    correct: int
    images: int
    paper_gflops: float
    executed_gflops: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.images if self.images else float("nan")

    def describe(self) -> str:
        return " | ".join(f"{s.scales}sc×{s.samples}" + (f"→{s.keep}" if s.keep > 1 else "")
                          + (f" exit≥{s.exit_margin:g}" if s.exit_margin is not None else "") for s in self.stages)


def point(r: Replay, labels: np.ndarray, idx: np.ndarray | None = None) -> Point:
    idx = np.arange(len(labels)) if idx is None else idx
    return Point(r.stages, int((r.pred[idx] == labels[idx]).sum()), len(idx), float(r.paper_macs[idx].mean()) / 1e9,
                 float(r.executed_macs[idx].mean()) / 1e9)


def candidate_stages(num_scales: int, max_samples: int, samples_ok: tuple[int, ...]) -> list[tuple[int, int]]:
    """(scales, samples) a stage may use (sample counts whose neighbours the table reproduces exactly)."""
    return [(s, m) for s in range(1, num_scales + 1) for m in range(1, max_samples + 1) if m in samples_ok]


def search(rep: Replayer, idx: np.ndarray, min_stages: int = 1, max_stages: int = 3,
           margins: bool = True) -> list[Point]:
    """Every schedule of ``min_stages``…``max_stages`` stages (each stage does more per candidate than the one
    before: no fewer scales and samples, one of them more; keeps shrink; the last keeps 1) on the images ``idx``,
    then each of them again with early-exit margins at quantiles of its stages' leads."""
    sub = Replayer(rep.table.subset(idx), rep.spec)
    labels = sub.table.labels
    K = len(sub.table.candidates)
    pairs = candidate_stages(len(sub.table.scale_ends), sub.table.max_samples, sub.table.exact_samples)
    keeps = [k for k in KEEP_GRID if k < K]
    points: list[Point] = []

    def grow(st: _State, prev: tuple[int, int] | None, prev_keep: int) -> None:
        depth = len(st.stages) + 1
        for s, m in pairs:
            if prev is not None and not (s >= prev[0] and m >= prev[1] and (s, m) != prev):
                continue
            if depth >= min_stages:
                done = sub.step(st, Stage(s, m, 1), later=False)
                points.append(point(done.result(sub.table), labels))
            if depth < max_stages:
                for k in keeps:
                    if k < prev_keep:
                        grow(sub.step(st, Stage(s, m, k), later=True), (s, m), k)

    grow(sub.start(), None, K)
    if margins:
        points += _with_margins(sub, points, labels)
    return points


def _with_margins(sub: Replayer, base: list[Point], labels: np.ndarray) -> list[Point]:
    """Each multi-stage schedule with exit margins on its non-last stages: no exit or a quantile of the stage's
    leads on these images (replayed stage by stage, sharing each prefix)."""
    out = []

    def grow(st: _State, stages: tuple[Stage, ...], exits: bool) -> None:
        t = len(st.stages)
        stage = stages[t]
        if t == len(stages) - 1:
            if exits:
                out.append(point(sub.step(st, stage, later=False).result(sub.table), labels))
            return
        leads = sub.leads(st, stage)
        grid = sorted({round(float(q), 1) for q in np.quantile(leads, MARGIN_QUANTILES)} - {0.0}) if len(leads) else []
        for margin in (None, *grid):
            grow(sub.step(st, replace(stage, exit_margin=margin), later=True), stages, exits or margin is not None)

    for p in base:
        if len(p.stages) > 1:
            grow(sub.start(), p.stages, False)
    return out


def pareto(points: list[Point]) -> list[Point]:
    """Schedules no other beats on both accuracy and executed compute, cheapest first."""
    best: list[Point] = []
    for p in sorted(points, key=lambda p: (p.executed_gflops, -p.correct)):
        if not best or p.correct > best[-1].correct:
            best.append(p)
    return best


def choose(points: list[Point], budget_gflops: float, option: str = "budget") -> Point:
    """Within the budget (executed GFLOPs per image), the simplest schedule whose accuracy is within one standard
    error of the best (the "one-SE rule": fewer stages mean fewer thresholds fitted to these images, which holds
    up best on others), then the most accurate, then the one that prunes least (most compute). ``option`` names
    the parameter that set the budget, for the message when nothing fits."""
    within = [p for p in points if p.executed_gflops <= budget_gflops]
    if not within:
        cheapest = min(points, key=lambda p: p.executed_gflops)
        raise AvarcError(f"no schedule fits {budget_gflops:.4g} GFLOPs per image; the cheapest needs "
                         f"{cheapest.executed_gflops:.4g}; raise the budget", option=option)
    best = max(within, key=lambda p: p.correct)
    n, acc = best.images, best.accuracy
    se = math.sqrt(max(acc * (1 - acc), 1 / n) / n) * n         # in images; at least one image's worth of noise
    near = [p for p in within if p.correct >= best.correct - se]
    return max(near, key=lambda p: (-len(p.stages), p.correct, p.executed_gflops))


def split(labels: np.ndarray, holdout: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fit / held-out image indices: a seeded shuffle within each class, ``holdout`` of each class held out."""
    if not 0 <= holdout < 1:
        raise AvarcError(f"must be in [0, 1), got {holdout}", option="holdout")
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_held = int(round(len(idx) * holdout))
        held += idx[:n_held].tolist()
        fit += idx[n_held:].tolist()
    return np.sort(np.asarray(fit, dtype=np.int64)), np.sort(np.asarray(held, dtype=np.int64))


@dataclass
class TuneResult:
    """The search on the fit part, the chosen schedule judged on both parts, the baseline and the calibration."""

    points: list[Point]                    # every schedule, on the fit images
    front: list[Point]                     # their Pareto front
    chosen: Point                          # on the fit images
    chosen_held: Point | None              # on the held-out images (None when nothing is held out)
    chosen_all: Point                      # on every tuning image (what classify with the profile measures)
    baseline: Point                        # the one-stage, all-scales, clean-only schedule (`varc`) on every image
    baseline_held: Point | None
    budget_gflops: float
    calibration: TemperatureFit            # on every tuning image; its ``temperature`` is the profile's
    ece_before: float | None               # on the held-out images, temperature 1
    ece_after: float | None                # on the held-out images, each with a temperature fitted without it
    nll_before: float | None               # the same for the NLL, over the held-out images whose true class
    nll_after: float | None                # reached the last stage (``nll_images`` of them)
    nll_images: int
    fit_idx: np.ndarray
    held_idx: np.ndarray
    replay: Replay                         # the chosen schedule on every tuning image
    front_held: list[Point | None] = field(default_factory=list)   # each front schedule on the held-out images

    @property
    def temperature(self) -> float:
        return self.calibration.temperature


def baseline_stages(num_scales: int) -> tuple[Stage, ...]:
    return (Stage(num_scales, 1, 1),)


def tune(table: ScoreTable, spec: ModelSpec, budget: float | None = None, budget_gflops: float | None = None,
         holdout: float = 0.5, min_stages: int = 1, max_stages: int = 3, seed: int = 0) -> TuneResult:
    """Search on the fit part, choose within the budget (``budget``: a fraction of the baseline's executed
    GFLOPs, or ``budget_gflops``), judge on the held-out part. The posterior temperature (only ever softening it:
    :mod:`core.tasks.calibration` says why) is fitted on every tuning image: it changes no prediction, so the held-out
    judgement of the schedule stands, and the held-out part holds the mistakes that the images the schedule was
    chosen on lack. Its held-out ECE and NLL are cross-fitted: each held-out image is judged with the temperature
    fitted on every tuning image outside its fold."""
    if (table.labels < 0).any():
        raise AvarcError("tuning needs labelled images (class sub-folders); some images have no label")
    rep = Replayer(table, spec)
    fit, held = split(table.labels, holdout, seed)
    if not len(fit):
        raise AvarcError(f"holding out {holdout:g} of each class leaves no image to choose a schedule on "
                         f"({len(table.labels)} readable images); lower it or add images", option="holdout")
    base_r = rep.replay(baseline_stages(len(table.scale_ends)))
    baseline = point(base_r, table.labels)
    share = budget if budget is not None else 1.0
    limit = budget_gflops if budget_gflops is not None else share * baseline.executed_gflops
    points = search(rep, fit, min_stages, max_stages)
    chosen = choose(points, limit, "budget_gflops" if budget_gflops is not None else "budget")
    r = rep.replay(chosen.stages)
    col = {c: k for k, c in enumerate(table.candidates)}
    y = np.asarray([col[c] for c in table.labels])
    calibration = fit_temperature(r.final_scores, y)
    ece: list[float | None] = [None, None]
    nlls: list[float | None] = [None, None]
    nll_images = 0
    if len(held):
        temperatures: tuple[float | np.ndarray, ...] = (1.0, cross_fitted_temperatures(r.final_scores, y, held,
                                                                                         seed=seed))
        for i, t in enumerate(temperatures):
            ece[i] = expected_calibration_error(posterior(r.final_scores[held], t), y[held])
            nlls[i], nll_images = nll(r.final_scores[held], y[held], t)
    front = pareto(points)
    front_held = [point(rep.replay(p.stages), table.labels, held) if len(held) else None for p in front]
    return TuneResult(points, front, chosen, point(r, table.labels, held) if len(held) else None,
                      point(r, table.labels), baseline, point(base_r, table.labels, held) if len(held) else None,
                      limit, calibration, ece[0], ece[1], nlls[0], nlls[1], nll_images, fit, held, r, front_held)


def model_name(clf: Classifier) -> str:
    """The model as a tuned profile names it: registry name or file identity, then the classes its extensions add."""
    base = clf.source if is_registry_name(clf.source) else model_identity(clf.model, clf.source)
    return base + "".join(f" +{e.names[0]}…" if len(e.names) > 1 else f" +{e.names[0]}" for e in clf.extensions)


def tuned_profile(result: TuneResult, table: ScoreTable, where: str, model: str,
                  name: str = "tuned") -> tuple[Profile, str]:
    """The chosen schedule as a profile (with the fitted temperature), and the comment that says what it was tuned
    on (``where``: the images' folder; ``model``: :func:`model_name`)."""
    r = result
    note = (f"tuned by `avarc tune` on {where} ({table.num_images} images: {len(r.fit_idx)} to choose, "
            f"{len(r.held_idx)} held out; seed {table.seed}), model {model}, "
            f"{len(table.candidates)} candidate classes\n"
            f"budget {r.budget_gflops:.4g} executed GFLOPs/image; varc needs {r.baseline.executed_gflops:.4g}\n"
            f"top-1 on the images it was chosen on {r.chosen.accuracy:.2%}"
            + (f", held out {r.chosen_held.accuracy:.2%} (varc {r.baseline_held.accuracy:.2%})"
               if r.chosen_held and r.baseline_held else "")
            + f"\nexecuted GFLOPs/image {r.chosen.executed_gflops:.4g}, paper convention {r.chosen.paper_gflops:.4g} "
            "(on the images it was chosen on)\n"
            f"posterior temperature, fitted on every tuning image: {r.calibration.describe()}"
            + (f"\nheld-out ECE {r.ece_before:.4f} → {r.ece_after:.4f} "
               "(each image with a temperature fitted without it)"
               if r.ece_before is not None else ""))
    profile = Profile(name=name, stages=r.chosen.stages, sigma=table.sigma, temperature=r.temperature,
                      description=f"Tuned for {model} by avarc tune (budget {r.budget_gflops:.4g} GFLOPs/image).")
    return profile, note


def shipped_points(result: TuneResult, table: ScoreTable, spec: ModelSpec) -> list[tuple[str, Point]]:
    """The shipped profiles this table can replay exactly (they fit the geometry and its samples), on the fit part."""

    rep, out = Replayer(table.subset(result.fit_idx), spec), []
    for prof in list_profiles():
        try:
            stages = prof.resolve(len(table.scale_ends)).stages
        except AvarcError:
            continue
        if prof.max_samples in table.exact_samples and abs(prof.sigma - table.sigma) < 1e-12:
            out.append((prof.name, point(rep.replay(stages), rep.table.labels)))
    return out


class TunePoint(TypedDict):
    """A schedule's row in ``tune --json``: its description, top-1 and compute per image on the images it ran on."""

    schedule: str
    top1: float
    images: int
    executed_gflops: float
    paper_gflops: float


class TuneJson(TypedDict):
    """What ``avarc tune --json`` prints: the choice, the baseline, the held-out calibration, the Pareto front and
    every schedule evaluated, and the files written."""

    schema: int
    chosen: TunePoint
    chosen_held_out: TunePoint | None
    varc: TunePoint
    budget_gflops: float
    temperature: float
    ece_held_out: list[float | None]
    nll_held_out: list[float | None]
    front: list[TunePoint]
    schedules: list[TunePoint]
    profile: str
    report: str | None


TUNE_JSON = TypeAdapter(TuneJson)
TUNE_SCHEMA = 1


def _point(p: Point | None) -> TunePoint | None:
    return None if p is None else {"schedule": p.describe(), "top1": p.accuracy, "images": p.images,
                                   "executed_gflops": p.executed_gflops, "paper_gflops": p.paper_gflops}


def tune_json(res: TuneResult, profile: str, report: str | None) -> dict:
    """``tune --json``'s document, checked by its declaration (:data:`TUNE_JSON`)."""
    doc = {"schema": TUNE_SCHEMA, "chosen": _point(res.chosen), "chosen_held_out": _point(res.chosen_held),
           "varc": _point(res.baseline), "budget_gflops": res.budget_gflops, "temperature": res.temperature,
           "ece_held_out": [res.ece_before, res.ece_after], "nll_held_out": [res.nll_before, res.nll_after],
           "front": [_point(p) for p in res.front], "schedules": [_point(p) for p in res.points],
           "profile": profile, "report": report}
    return TUNE_JSON.dump_python(TUNE_JSON.validate_python(doc), mode="json")
