"""Reuse across stages (core/scoring.py) changes no prediction and only removes work (conformance models; the
schedules that run whole stages, on the 256-px set only: reuse does not depend on the geometry)."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from avarc.engine.profile import Profile, Stage
from avarc.engine.schedule import _reusable_tokens, run_stages, sample_tokens
from avarc.engine.scoring import Scorer
from avarc.models.var_state import KVCache
from tests.conftest import AT_256

PROFILE = Profile("test", (Stage(3, 1, 6), Stage(10, 1, 3), Stage(10, 3, 1)), sigma=0.1)


@AT_256
def test_reuse_matches_plain_path_with_less_work(conf, engine_model):
    latents = conf.golden["latent"][:3]
    tokens = sample_tokens(engine_model, latents, 3, 0.1, 0)
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


class _HeldScorer(Scorer):
    """Records the keys/values bytes held after each stage."""

    def score(self, *a, **kw):
        out = super().score(*a, **kw)
        self.held = getattr(self, "held", []) + [sum(b.cache.nbytes for b in self.batches.values() if b.cache)]
        return out


@AT_256
def test_stages_keep_only_the_keys_values_a_later_stage_uses(conf, engine_model):
    """A later stage with more scales continues the whole sequence; one that only adds neighbours continues the
    clean sequence's shared whole scales; nothing continues the last stage. So A-VARC+'s second stage holds the
    neighbours' shared prefix, not every token, and the predictions equal the plain path's."""
    spec, ends = engine_model.spec.var, engine_model.spec.var.scale_ends()
    st1, st2, st3 = PROFILE.stages
    tokens = torch.randint(0, spec.vocab_size, (2, 3, ends[-1]))
    tokens[:, 1:] = tokens[:, :1]
    tokens[0, 1:, ends[2]:] += 1                    # image 0's neighbours share 3 scales
    tokens[1, 2, ends[4] + 3:] += 1                 # image 1's second neighbour shares 5 scales and 3 tokens
    tokens[1, 1, ends[1]:] += 1
    assert _reusable_tokens(tokens, st1, (st2, st3), ends) == ends[2]
    assert _reusable_tokens(tokens, st2, (st3,), ends) == ends[4]
    assert _reusable_tokens(tokens[:1], st2, (st3,), ends) == ends[2]
    assert _reusable_tokens(tokens, st3, (), ends) == 0
    assert _reusable_tokens(tokens, st2, (Stage(10, 1, 1),), ends) == 0     # a repeat is free
    latents = conf.golden["latent"][:2]
    sampled = sample_tokens(engine_model, latents, 3, 0.1, 0)
    held, plain = _HeldScorer(engine_model), Scorer(engine_model, reuse=False)
    got, want = run_stages(engine_model, sampled, range(10), PROFILE, held), run_stages(
        engine_model, sampled, range(10), PROFILE, plain)
    assert [p.pred for p in got] == [p.pred for p in want]
    shared = _reusable_tokens(sampled, st2, (st3,), ends)
    rows = 2 * st1.keep                                  # stage 2 scores the first stage's survivors
    assert 0 < shared < ends[9] and held.held[1] == rows * spec.depth * 2 * shared * spec.embed_dim * 4


def test_neighbour_starts_from_clean_prefix(conf, engine_model):
    """A neighbour equal to the clean tokens on its first scales reuses the clean sequence's keys/values."""
    g, ends = conf.golden, engine_model.spec.var.scale_ends()
    clean = g["tokens"][:1]
    neighbour = clean.clone()
    neighbour[0, ends[4]:] = g["tokens"][1, ends[4]:]          # differs from scale 5 on
    scorer = Scorer(engine_model)
    cls = torch.tensor([2])
    scorer.score(clean, cls, 10, [(0, 0)], keep_tokens=ends[9])
    before = scorer.tokens_run
    got = scorer.score(neighbour, cls, 10, [(0, 1)])
    assert scorer.tokens_run - before == ends[9] - ends[4]
    want = engine_model.pair_logp(neighbour, cls).sum(-1)
    assert abs(float(got - want)) < 1e-2


def test_reuse_is_the_engines_own_continuation(conf, conf_model):
    """Bit for bit, reuse adds no rounding of its own: an extension is the engine run on the gathered keys/values
    (here rows of two earlier forwards, interleaved) plus the stored prefix log-probs, a free ride the stored sum."""
    m, ends, g = conf_model, conf_model.spec.var.scale_ends(), conf.golden["tokens"]
    e3, e4 = ends[2], ends[3]
    clean = g[:2, :ends[5]]
    nb = clean.clone()
    nb[:, e3:] = g[2:4, e3:ends[5]]                     # the neighbours differ from scale 4 on
    assert all((nb[i, e3:e4] != clean[i, e3:e4]).any() for i in range(2))
    scorer, chunk = Scorer(m, chunk=3), 3
    c0, c1 = torch.tensor([1, 2, 3]), torch.tensor([4, 5])
    scorer.score(clean[[0, 0, 0]], c0, 4, [("a", 0)] * 3, keep_tokens=ends[3])
    scorer.score(clean[[1, 1]], c1, 4, [("b", 0)] * 2, keep_tokens=ends[3])
    pa = m.score_pairs(clean[[0, 0, 0]], c0, 4, chunk, keep_cache=True)
    pb = m.score_pairs(clean[[1, 1]], c1, 4, chunk, keep_cache=True)

    # Neighbours of both images, interleaved, start from their clean rows' first 3 scales; the clean row of class 3
    # continues its own 4 scales.
    before = scorer.tokens_run
    got = scorer.score(torch.stack([nb[1], nb[0], clean[0], nb[1], nb[0]]), torch.tensor([4, 1, 3, 5, 2]), 6,
                       [("b", 1), ("a", 1), ("a", 0), ("b", 1), ("a", 1)])
    assert scorer.tokens_run - before == 4 * (ends[5] - e3) + (ends[5] - e4)
    src = [(pb, 0), (pa, 0), (pb, 1), (pa, 1)]
    cache = KVCache.cat([p.cache.select(torch.tensor([r])) for p, r in src]).truncate(e3)
    prefix = torch.stack([p.logp[r, :e3] for p, r in src])
    ext = m.score_pairs(torch.stack([nb[1], nb[0], nb[1], nb[0]]), torch.tensor([4, 1, 5, 2]), 6, chunk, cache)
    own = m.score_pairs(clean[[0]], torch.tensor([3]), 6, chunk, pa.cache.select(torch.tensor([2])))
    assert torch.equal(got[[0, 1, 3, 4]], ext.logp.sum(-1) + prefix.sum(-1))
    assert torch.equal(got[[2]], own.logp.sum(-1) + pa.logp[2:].sum(-1))

    # Shorter again: free rides, the stored log-probs summed.
    before = scorer.tokens_run
    again = scorer.score(torch.stack([nb[0], clean[0]]), torch.tensor([2, 3]), 5, [("a", 1), ("a", 0)])
    assert scorer.tokens_run == before
    assert torch.equal(again, torch.stack([torch.cat((prefix[3], ext.logp[3]))[:ends[4]].sum(),
                                           torch.cat((pa.logp[2], own.logp[0]))[:ends[4]].sum()]))


class _AtenOps(TorchDispatchMode):
    """Counts the aten ops dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_bookkeeping_does_not_grow_with_rows(conf, conf_model):
    """The scorer's bookkeeping is a few tensor ops per stage and source batch, not per (image, sample, class) row:
    a staged run over 10 candidates dispatches about as many aten ops as one over 3 (per-row bookkeeping added
    ~18 per row, ~2000 here), and reuse still does its work."""
    latents = conf.golden["latent"][:4]
    tokens = sample_tokens(conf_model, latents, 3, 0.1, 0)
    profile = Profile("rows", (Stage(2, 1, 10), Stage(4, 3, 2), Stage(4, 1, 1)), sigma=0.1)

    def ops(candidates) -> tuple[int, int]:
        scorer = Scorer(conf_model, chunk=1000)
        with _AtenOps() as mode:
            run_stages(conf_model, tokens, candidates, profile, scorer)
        return mode.count, scorer.tokens_run

    (few, _), (many, run) = ops(range(3)), ops(range(10))
    extra_rows = 4 * (10 - 3) * (1 + 3)                  # 4 images, 7 more classes in stages 1 and 2
    assert many - few < extra_rows / 4
    ends = conf_model.spec.var.scale_ends()
    assert run < 4 * (10 * ends[1] + 3 * 10 * ends[3])   # stage 2's clean sample extends stage 1, stage 3 is free
