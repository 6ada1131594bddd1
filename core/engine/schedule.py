"""The staged schedule of A-VARC / A-VARC+: score every candidate class cheaply, keep the best few, rescore those
more carefully, and predict the best of the last stage.

Stage scores are mean-over-samples summed token log-likelihoods of the first ``scales`` scales; sample 0 is the
image's own tokens, samples 1… are tokens of ``latent + σ·noise`` re-quantised (likelihood smoothing). An image's
noise is drawn from a generator seeded by the run seed and the image's own clean tokens (:func:`noise_generator`), so
the same pixels get the same neighbours however they were passed (file, PIL image, tensor, dataset row) and whatever
else shares the batch, its order or its shard.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from ..errors import AvarcError
from . import tokenizer
from .guard import guard_stages
from .model import Model
from .profile import Profile, Stage
from .scoring import Scorer, shared_scales
from .stages import Prediction, StageScores, choose_survivors
from .transfers import host_read, upload


def noise_generator(seed: int, tokens_L: torch.Tensor) -> torch.Generator:
    """The generator of one image's smoothing noise, seeded by the run seed and a SHA-256 of its clean tokens (L).
    Keyed by content, not by name: the tokens are what the model sees of the pixels, discrete (a float tensor and
    the file it came from give the same ones even where their floats differ by rounding), and where they differ the
    scores differ anyway. Identical images therefore share their neighbours."""
    body = tokens_L.to(torch.int64).numpy().astype("<i8").tobytes()
    digest = hashlib.sha256(f"{seed}:".encode() + body).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def sample_tokens(model: Model, latents: torch.Tensor, num_samples: int, sigma: float, seed: int) -> torch.Tensor:
    """B, Cvae, h, w latents → B, S, L tokens: the clean tokens, then S−1 neighbours, each image's from its own
    :func:`noise_generator`."""
    clean = model.tokenize_latent(latents).cpu().unsqueeze(1)                   # B, 1, L
    if num_samples == 1:
        return clean
    noise = torch.cat([tokenizer.draw_noise(latents[i:i + 1], num_samples - 1, noise_generator(seed, clean[i, 0]))
                       for i in range(latents.shape[0])], 1)
    neighbours = tokenizer.neighbour_tokens(model.vae, latents.to(model.device), noise.to(model.device), sigma)
    return torch.cat([clean, neighbours.cpu()], 1)


def _check_candidates(model: Model, candidates: Sequence[int]) -> list[int]:
    cands = list(dict.fromkeys(int(c) for c in candidates))
    if not cands:
        raise AvarcError("no candidate classes; give at least one class to choose from")
    bad = [c for c in cands if not 0 <= c < model.num_classes]
    if bad:
        raise AvarcError(f"candidate class {bad[0]} is out of range; this model has classes 0…{model.num_classes - 1}")
    return cands


@torch.no_grad()
def classify(model: Model, latents: torch.Tensor, candidates: Sequence[int], profile: Profile,
             seed: int = 0, scorer: Scorer | None = None, temperature: float = 1.0) -> list[Prediction]:
    """Run a profile's stages on a batch of encoder latents (B, Cvae, h, w); ``seed`` and each image's content seed
    its smoothing noise."""
    profile = profile.resolve(len(model.spec.var.patch_nums))
    tokens = sample_tokens(model, latents, profile.max_samples, profile.sigma, seed)
    return run_stages(model, tokens, candidates, profile, scorer, temperature)


@torch.no_grad()
def run_stages(model: Model, tokens: torch.Tensor, candidates: Sequence[int], profile: Profile,
               scorer: Scorer | None = None, temperature: float = 1.0) -> list[Prediction]:
    """The schedule itself, on B, S, L sample tokens (sample 0 clean; a stage with n samples uses the first n)."""
    profile = profile.resolve(len(model.spec.var.patch_nums))
    if tokens.shape[1] < profile.max_samples:
        raise ValueError(f"profile {profile.name} needs {profile.max_samples} samples per image, got {tokens.shape[1]}")
    if temperature <= 0:
        raise AvarcError(f"the posterior's temperature must be positive, got {temperature}", option="temperature")
    scorer = scorer or Scorer(model)
    scorer.reset()
    cands = _check_candidates(model, candidates)
    B = tokens.shape[0]
    alive = {i: list(cands) for i in range(B)}        # each image's candidates (all of them the same number)
    history: list[list[StageScores]] = [[] for _ in range(B)]
    exited: dict[int, int] = {}
    ends = model.spec.var.scale_ends()
    guarded: set[int] = set()                # images the precision guard re-scored
    flipped: set[int] = set()                # … and those it changed
    for s_idx, stage in enumerate(profile.stages, 1):
        active = [i for i in range(B) if i not in exited]
        if not active:
            break
        # Inside the stage the host only queues work: rows, scores and survivors stay on the device.
        scales, S = int(stage.scales), stage.samples   # resolved above
        n_tok = ends[scales - 1]
        cands_AK = torch.tensor([alive[i] for i in active])
        A, K = cands_AK.shape
        seq = tokens[active, :S, None, :n_tok].expand(-1, -1, K, -1).reshape(-1, n_tok)   # rows: image, sample, class
        cls = cands_AK[:, None].expand(-1, S, -1).reshape(-1)
        keys = [(i, j) for i in active for j in range(S) for _ in range(K)]
        later = profile.stages[s_idx:]
        reusable = _reusable_tokens(tokens[active], stage, later, ends)
        scores_AK = scorer.score(seq, cls, scales, keys, keep_tokens=reusable).view(A, S, K).mean(1)
        survivors_AK, exits_A = choose_survivors(upload(cands_AK, scores_AK.device), scores_AK, stage.keep,
                                                 stage.exit_margin)
        # Between stages: the one read, of what the host records, guards and drops.
        scores_AK, survivors_AK, exits_A = host_read(scores_AK, survivors_AK, exits_A)
        now = {i: StageScores(scales, S, stage.keep, alive[i], scores_AK[a].tolist()) for a, i in enumerate(active)}
        for i, st in now.items():
            history[i].append(st)
        rescored: set[int] = set()
        if later:
            rescored, changed = guard_stages(model, scorer, tokens, now, profile, False, stage.exit_margin)
            guarded, flipped = guarded | rescored, flipped | changed
        for a, i in enumerate(active):
            if i in rescored:       # the guard moved some scores: decide again from them
                _, alive[i], exits = now[i].decisions(stage.exit_margin)
            else:
                alive[i], exits = survivors_AK[a].tolist(), bool(exits_A[a])
            if exits:
                exited[i] = s_idx
    rescored, changed = guard_stages(model, scorer, tokens, {i: h[-1] for i, h in enumerate(history) if h}, profile,
                                     True, None)
    scorer.guarded += len(guarded | rescored)
    scorer.guard_flips += len(flipped | changed)
    return [_prediction(history[i], exited.get(i), temperature) for i in range(B)]


def _reusable_tokens(tokens: torch.Tensor, stage: Stage, later: Sequence[Stage], ends: list[int]) -> int:
    """How many leading tokens' keys/values of this stage a later one can start from (B, S, L sample tokens of
    the active images): all of them if a later stage runs more scales; else, if it adds samples, the longest
    whole-scale prefix such a neighbour shares with the clean tokens (it continues from the clean sequence's
    keys/values); else none (a repeat of these pairs is free). A-VARC+'s second stage thus keeps the few tokens its
    neighbours share, not all 680."""
    n_tok = ends[int(stage.scales) - 1]   # a resolved profile's stages
    if any(int(st.scales) > int(stage.scales) for st in later):
        return n_tok
    more = max((st.samples for st in later), default=0)
    if more <= stage.samples:
        return 0
    return int(shared_scales(tokens[:, stage.samples:more, :n_tok], tokens[:, :1, :n_tok], ends).max())


def _prediction(stages: list[StageScores], exited_after: int | None, temperature: float) -> Prediction:
    last = stages[-1]
    ranking = last.ranked()
    placed = set(last.candidates)
    for st in reversed(stages[:-1]):
        ranking += [(c, s) for c, s in st.ranked() if c not in placed]
        placed.update(st.candidates)
    pred = ranking[0][0]
    scores = torch.tensor([s for _, s in last.ranked()], dtype=torch.float64) / temperature
    probs = torch.softmax(scores, 0).tolist()
    posterior = [(c, p) for (c, _), p in zip(last.ranked(), probs)]
    return Prediction(pred=pred, ranking=ranking, stages=stages, posterior=posterior, exited_after=exited_after)
