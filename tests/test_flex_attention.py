"""FlexAttention on the one-call plan (issue 34, item 4): a compiled block step on a GPU runs the block-sparse kernel
with a :class:`BlockMask` built once per geometry, skipping the tiles no query sees; forced on this CPU's inductor it
compiles inside the fullgraph step and scores every token as the goldens do. The eager one-call plan (dense mask),
the compiled one a CPU runs (dense mask too) and the per-scale plan are held to the goldens in test_conformance and
test_compile."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from avarc.engine.counters import OpCounter
from avarc.models import block_ops
from avarc.models.specs import official_spec
from tests.conftest import LOGP_TOL, ConformanceSet

CONF = ConformanceSet("official256")


def test_d16_block_mask_issues_only_the_tiles_a_query_sees():
    """d16, all 10 scales (680 tokens) in 32 × 32 tiles: a tile is issued exactly where some query sees some key
    (321 of 484), and only the 64 a scale boundary cuts are masked element-wise; the dense call computes all 484."""
    spec = official_spec("d16").var
    plan = block_ops.AttentionPlan(spec, 0, spec.seq_len, torch.device("cpu"))
    bm = plan.block_mask()
    keep = torch.zeros(spec.seq_len, spec.seq_len, dtype=torch.bool)
    for lo, hi, keys in spec.attention_spans(spec.seq_len):
        keep[lo:hi, :keys] = True
    tiles = F.pad(keep, (0, 22 * 32 - 680, 0, 22 * 32 - 680)).view(22, 32, 22, 32)
    assert bm.BLOCK_SIZE == (32, 32) and torch.equal(bm.to_dense()[0, 0].bool(), tiles.any(3).any(1))
    assert int(bm.kv_num_blocks.sum()) + int(bm.full_kv_num_blocks.sum()) == 321
    assert int(bm.kv_num_blocks.sum()) == 64 and plan.block_mask() is bm


def test_compiled_one_call_plan_equals_goldens(monkeypatch):
    """Compiled with FlexAttention forced on the CPU (inductor, inside the fullgraph block step): a full forward of
    every class, then the same scores as 6 scales keeping keys/values and a continuation to 10, each within LOGP_TOL
    of the golden; the block masks are built once per geometry (a second pass builds none), one graph per variant,
    no fallback."""
    built = []

    def counting(*args, **kw):
        built.append(args[3:5])
        return create(*args, **kw)
    create = block_ops.create_block_mask
    monkeypatch.setattr(block_ops, "create_block_mask", counting)
    monkeypatch.setattr(block_ops, "FLEX_DEVICES", {"cpu"})      # the GPU's plan (on a CPU the dense mask is faster)
    model = CONF.load(device="cpu")
    model.compile = True
    K = CONF.meta["num_classes"] + 1
    tokens, golden = CONF.golden["tokens"], CONF.golden["logp"]
    B, L = tokens.shape
    rows, classes = tokens.repeat_interleave(K, 0), torch.arange(K).repeat(B)
    for _ in range(2):
        full = model.token_logp(tokens, list(range(K)))
        first = model.score_pairs(rows, classes, 6, keep_cache=True)
        rest = model.score_pairs(rows, classes, 10, cache=first.cache)
        split = torch.cat((first.logp, rest.logp), 1).view(B, K, L)
        assert (full - golden).abs().max() < LOGP_TOL["cpu"] and (split - golden).abs().max() < LOGP_TOL["cpu"]
    assert built == [(L, L), (91, 91), (L - 91, L)]
    # variants: a full forward (no keys/values kept), 6 scales keeping them (start 0), the continuation (start 91)
    assert model.compile_evidence() == {"graphs": 3, "recompiles": 0, "fallbacks": 0}


def test_op_counter_counts_flex_attention_as_one_kernel():
    """Counting a compiled GPU engine runs it eagerly (``engine_counters``' stance) inside a dispatch mode:
    FlexAttention is one op there (the kernel it compiles to), and its values are the masked SDPA's."""
    spec = official_spec("d16").var
    plan = block_ops.AttentionPlan(spec, 0, 91, torch.device("cpu"))
    q, k, v = torch.randn(3, 1, 16, 91, 64, generator=torch.Generator().manual_seed(0))
    block = plan.block_mask()
    with torch.no_grad(), torch.compiler.set_stance("force_eager"), OpCounter() as mode:
        got = flex_attention(q, k, v, block_mask=block, scale=0.125)
    assert dict(mode.ops) == {"flex_attention": 1}
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask(torch.float32), scale=0.125)
    assert (got - want).abs().max() < 1e-5
