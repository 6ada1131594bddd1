"""avarc.engine.schedule: the staged schedule against the conformance vectors (tests/data/conformance/official256/
golden.npz: ``logp`` and ``neighbor_logp`` of all tokens for all classes, computed by the upstream VAR code)."""
from __future__ import annotations

import pytest
import torch

from avarc import AvarcError
from avarc.engine.profile import Profile, Stage
from avarc.engine.schedule import Scorer, classify, noise_generator, run_stages, sample_tokens
from avarc.engine.tokenizer import draw_noise, neighbour_tokens
from avarc.io.profiles import load_profile
from tests.conftest import ConformanceSet

K = 10


@pytest.fixture(scope="module")
def c256():
    cs = ConformanceSet("official256")
    return cs, cs.load()


def golden_sums(cs, num_tokens: int) -> torch.Tensor:
    """B, 3, K: summed log-likelihoods of the clean tokens and the two neighbours over the first tokens."""
    g = cs.golden
    clean = g["logp"][:, None, :K, :num_tokens].sum(-1)
    return torch.cat([clean, g["neighbor_logp"][:, :, :K, :num_tokens].sum(-1)], 1)


def assert_same_ranking(scores: dict[int, float], golden: torch.Tensor) -> None:
    """Order agrees with the golden order for every pair of classes whose golden gap exceeds 0.1 nats."""
    for a in range(K):
        for b in range(K):
            if golden[a] - golden[b] > 0.1:
                assert scores[a] > scores[b], (a, b)


def test_varc_final_scores_are_the_golden_loglikelihood_sums(c256):
    cs, model = c256
    tokens = cs.golden["tokens"][:, None]
    preds = run_stages(model, tokens, range(K), load_profile("varc"))
    gold = golden_sums(cs, tokens.shape[-1])[:, 0]
    for p, g in zip(preds, gold):
        scores = dict(p.ranking)
        assert sorted(scores) == list(range(K))
        assert max(abs(scores[c] - g[c].item()) for c in range(K)) < 0.01
        assert_same_ranking(scores, g)
        assert p.pred == g.argmax().item() and [c for c, _ in p.ranking] == sorted(range(K), key=lambda c: -scores[c])
        assert abs(sum(q for _, q in p.posterior) - 1) < 1e-9 and p.posterior[0][0] == p.pred


def test_each_stage_rescores_the_golden_survivors_and_averages_neighbours(c256):
    cs, model = c256
    g = cs.golden
    tokens = torch.cat([g["tokens"][:, None], g["neighbor_tokens"]], 1)          # B, 3, L: clean + 2 neighbours
    ends = model.spec.var.scale_ends()
    profile = Profile("t", (Stage(4, 1, 4), Stage(7, 1, 2), Stage(8, 3, 1)))
    preds = run_stages(model, tokens, range(K), profile)
    for i, p in enumerate(preds):
        s1, s2, s3 = (golden_sums(cs, ends[s - 1])[i] for s in (4, 7, 8))
        assert [len(st.candidates) for st in p.stages] == [K, 4, 2]
        for st, gold in zip(p.stages, (s1[0], s2[0], s3.mean(0))):
            assert max(abs(v - gold[c].item()) for c, v in zip(st.candidates, st.scores)) < 0.01
        top4 = s1[0].argsort(descending=True)
        if s1[0][top4[3]] - s1[0][top4[4]] > 0.1:                  # a clear cut: the survivors are the golden top 4
            assert set(p.stages[1].candidates) == set(top4[:4].tolist())
        final = dict(zip(p.stages[2].candidates, p.stages[2].scores))
        assert p.pred == max(final, key=final.get)
        # full ranking: last stage's candidates, then the stage-2 dropout, then the six stage-1 dropouts by score
        order = [c for c, _ in p.ranking]
        assert order[:2] == sorted(p.stages[2].candidates, key=lambda c: -final[c]) and len(order) == K
        assert set(order[2:4]) == set(p.stages[1].candidates) - set(p.stages[2].candidates)
        s1_scores = dict(zip(p.stages[0].candidates, p.stages[0].scores))
        assert [s1_scores[c] for c in order[4:]] == sorted((s1_scores[c] for c in order[4:]), reverse=True)


def test_early_exit_stops_images_whose_lead_reaches_the_margin(c256):
    cs, model = c256
    tokens = cs.golden["tokens"][:, None]
    n4 = model.spec.var.scale_ends()[3]
    s1 = golden_sums(cs, n4)[:, 0]
    top2 = s1.topk(2, dim=1).values
    leads = (top2[:, 0] - top2[:, 1]).tolist()
    ranked = sorted(leads)
    gap, lo, hi = max((b - a, a, b) for a, b in zip(ranked, ranked[1:]))
    assert gap > 0.02
    margin = (lo + hi) / 2                                          # no lead within 0.01 nats of the margin
    profile = Profile("x", (Stage(4, 1, 3, exit_margin=margin), Stage(5, 1, 1)))
    preds = run_stages(model, tokens, range(K), profile)
    assert [p.exited_after for p in preds] == [1 if lead > margin else None for lead in leads]
    assert 0 < sum(lead > margin for lead in leads) < len(leads)
    for p, row in zip(preds, s1):
        assert len(p.stages) == (1 if p.exited_after else 2)
        if p.exited_after:
            assert p.pred == row.argmax().item()


def test_smoothing_tokens_are_seeded_by_the_seed_and_the_images_own_tokens(c256):
    cs, model = c256
    latent = cs.golden["latent"]
    toks = sample_tokens(model, latent, 3, 0.1, 7)
    assert toks.shape == (6, 3, cs.golden["tokens"].shape[1])
    assert torch.equal(toks[:, 0], cs.golden["tokens"])
    for i in (0, 4):
        noise = draw_noise(latent[i:i + 1], 2, noise_generator(7, cs.golden["tokens"][i]))
        assert torch.equal(toks[i, 1:], neighbour_tokens(model.vae, latent[i:i + 1], noise, 0.1)[0])
    assert not torch.equal(toks[0, 1:], sample_tokens(model, latent[:1], 3, 0.1, 8)[0, 1:])
    # the same image anywhere in a batch (here twice, reversed order) draws the same neighbours
    again = sample_tokens(model, torch.cat([latent[4:5], latent.flip(0)]), 3, 0.1, 7)
    assert torch.equal(again[0], toks[4]) and torch.equal(again[1:], toks.flip(0))


def test_results_do_not_depend_on_batch_composition(c256):
    cs, model = c256
    latent = cs.golden["latent"]
    profile = Profile("p", (Stage(3, 1, 3), Stage(5, 2, 1)), sigma=0.3)
    together = classify(model, latent, [1, 3, 5, 7, 9], profile, 0, Scorer(model, chunk=4))
    for i in (1, 5):
        alone = classify(model, latent[i:i + 1], [1, 3, 5, 7, 9], profile, 0)[0]
        assert alone.pred == together[i].pred and [c for c, _ in alone.ranking] == [c for c, _ in together[i].ranking]
        assert max(abs(a - b) for (_, a), (_, b) in zip(alone.ranking, together[i].ranking)) < 1e-3


def test_temperature_softens_the_posterior_and_bad_candidates_fail(c256):
    cs, model = c256
    tokens = cs.golden["tokens"][:1, None]
    profile = Profile("p", (Stage(3, 1, 1),))
    sharp = run_stages(model, tokens, range(K), profile)[0].posterior
    soft = run_stages(model, tokens, range(K), profile, temperature=100.0)[0].posterior
    assert soft[0][1] < sharp[0][1] and abs(sum(q for _, q in soft) - 1) < 1e-9
    with pytest.raises(AvarcError, match="candidate class 10 is out of range"):
        run_stages(model, tokens, [0, 10], profile)
