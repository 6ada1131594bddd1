"""The likelihood engine's shortcuts give the same numbers as a plain forward (tests/data/conformance golden logp)."""
import torch

from avarc.engine.likelihood import pairs_per_chunk
from tests.conftest import LOGP_TOL


def test_extending_a_cached_prefix_equals_full_forward(conf, engine_model):
    g, TOL = conf.golden, LOGP_TOL[engine_model.device.type]
    tokens, classes = g["tokens"], torch.tensor([0, 1, 2, 3, 4, conf.meta["null_class"]])
    golden = g["logp"][torch.arange(len(classes)), classes]
    first = engine_model.score_pairs(tokens, classes, num_scales=6, keep_cache=True)
    ends = engine_model.spec.var.scale_ends()
    assert first.cache.num_tokens == ends[5] and first.logp.shape == (6, ends[5])
    rest = engine_model.score_pairs(tokens, classes, cache=first.cache, chunk=4)
    assert rest.start == ends[5] and (torch.cat([first.logp, rest.logp], 1) - golden).abs().max() < TOL
    shorter = engine_model.score_pairs(tokens, classes, num_scales=8,
                                       cache=first.cache.truncate(ends[2]).select(torch.arange(6)))
    assert (shorter.logp - golden[:, ends[2]:ends[7]]).abs().max() < TOL


def test_chunking_does_not_change_results(engine_model, conf):
    tokens = conf.golden["tokens"][:3].repeat_interleave(2, 0)
    classes = torch.tensor([1, 7] * 3)
    a = engine_model.pair_logp(tokens, classes, num_scales=7, chunk=1)
    b = engine_model.pair_logp(tokens, classes, num_scales=7, chunk=6)
    assert (a - b).abs().max() < LOGP_TOL[engine_model.device.type]


def test_chunk_size_follows_memory_budget(engine_model):
    spec = engine_model.spec.var
    small, big = pairs_per_chunk(spec, spec.seq_len, 64 << 20), pairs_per_chunk(spec, spec.seq_len, 1 << 30)
    assert 1 <= small < big
    assert pairs_per_chunk(spec, 1, 1 << 30) > big
