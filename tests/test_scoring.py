"""Reuse across stages (core/scoring.py) changes no prediction and only removes work (conformance models)."""
import torch

from core.schedule import run_stages, sample_tokens, noise_generator
from core.profiles import Profile, Stage
from core.scoring import Scorer

PROFILE = Profile("test", (Stage(3, 1, 6), Stage(10, 1, 3), Stage(10, 3, 1)), sigma=0.1)


def test_reuse_matches_plain_path_with_less_work(conf, engine_model):
    latents = conf.golden["latent"][:3]
    gens = [noise_generator(0, f"img{i}") for i in range(3)]
    tokens = sample_tokens(engine_model, latents, 3, 0.1, gens)
    plain, reuse = Scorer(engine_model, reuse=False), Scorer(engine_model)
    a = run_stages(engine_model, tokens, range(10), PROFILE, plain)
    b = run_stages(engine_model, tokens, range(10), PROFILE, reuse)
    assert [p.pred for p in a] == [p.pred for p in b]
    for pa, pb in zip(a, b):
        for sa, sb in zip(pa.stages, pb.stages):
            assert sa.candidates == sb.candidates
            assert max(abs(x - y) for x, y in zip(sa.scores, sb.scores)) < 1e-2
    ends = engine_model.spec.var.scale_ends()
    # Stage 2 extends stage 1's prefix (6 survivors), stage 3's clean sample is free.
    saved = 3 * (6 * ends[2] + 3 * ends[9])
    assert plain.tokens_run - reuse.tokens_run >= saved


def test_neighbour_starts_from_clean_prefix(conf, engine_model):
    """A neighbour equal to the clean tokens on its first scales reuses the clean sequence's keys/values."""
    g, ends = conf.golden, engine_model.spec.var.scale_ends()
    clean = g["tokens"][:1]
    neighbour = clean.clone()
    neighbour[0, ends[4]:] = g["tokens"][1, ends[4]:]          # differs from scale 5 on
    scorer = Scorer(engine_model)
    cls = torch.tensor([2])
    scorer.score(clean, cls, 10, [(0, 0)], keep_for_later=True)
    before = scorer.tokens_run
    got = scorer.score(neighbour, cls, 10, [(0, 1)])
    assert scorer.tokens_run - before == ends[9] - ends[4]
    want = engine_model.pair_logp(neighbour, cls).sum(-1)
    assert abs(float(got - want)) < 1e-2
