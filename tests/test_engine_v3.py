"""Engine v3's structure, counted on the CPU: aten ops per block, one attention call per forward, host syncs per
scoring step, the keys/values held against their budget, the class table, the fused head and the compiled block
(one graph, no graph breaks, no recompiles after warm-up; a compiler failure warns once, running out of memory is
raised). Numbers against the conformance vectors stay in test_conformance/test_likelihood."""
from __future__ import annotations

import dataclasses
import logging
import re
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from avarc.engine import likelihood
from avarc.engine.counters import SYNC_OPS, OpCounter, engine_counters
from avarc.engine.model import build_model
from avarc.engine.profile import Profile, Stage
from avarc.engine.schedule import run_stages, sample_tokens
from avarc.engine.scoring import Scorer
from avarc.models import block_ops
from avarc.models.block_ops import CompiledBlock
from avarc.models.specs import official_spec
from tests.conftest import ConformanceSet


def _small(depth: int, seed: int = 0):
    """The d16 geometry (10 scales, 16 heads) narrowed to width 64 and ``depth`` blocks, random weights."""
    spec = official_spec("d16")
    spec = dataclasses.replace(spec, var=dataclasses.replace(spec.var, depth=depth, embed_dim=64, num_heads=4))
    torch.manual_seed(seed)
    m = build_model(spec)
    m.var.init_weights()
    return m


@pytest.fixture(scope="module")
def small():
    return {d: _small(d) for d in (2, 4)}


def _forward_ops(model, num_scales: int = 10, keep_cache: bool = False, one_call: bool | None = True) -> OpCounter:
    """The ops of one forward; ``one_call`` True is the plan a GPU runs (one attention call), None the device's."""
    var, ends = model.var, model.spec.var.scale_ends()
    var.one_attention_call = one_call
    tokens = torch.randint(0, model.spec.var.vocab_size, (3, ends[num_scales - 1]))
    x_in = model.vae.quantize.var_input(tokens)
    mods = var.class_table([1, 2, 3]).lookup(torch.tensor([1, 2, 3]))
    with torch.no_grad():
        var.hidden(torch.tensor([1, 2, 3]), x_in, keep_cache=keep_cache, mods=mods)     # constants made once
    with torch.no_grad(), OpCounter() as mode:
        var.hidden(torch.tensor([1, 2, 3]), x_in, keep_cache=keep_cache, mods=mods)
    var.one_attention_call = None
    return mode


@pytest.mark.parametrize("keep_cache", [False, True])
@pytest.mark.parametrize("onednn", [True, False])
def test_aten_ops_per_block(small, keep_cache, onednn, monkeypatch):
    """The plan a GPU runs, run eagerly and counted in fp32 on a CPU: LN, modulate, qkv, q/k norm (norm, factor,
    scale), attention, proj, residual, LN, modulate, fc1 + GELU (one oneDNN call where oneDNN runs fp32 linears, as
    cuBLASLt's epilogue on CUDA; else fc1, then GELU), fc2, residual: 14 where the engine ran ~51 (15 on ATen's
    path, forced here too), and one more, the K/V write, when the forward keeps its cache. Eagerly it stays there:
    the AdaLN scale, shift and gains differ per row (per class), so they fold into no GEMM or epilogue without
    per-class weights, and this CPU has no fused rms_norm (aten's decomposes into five ops). Compiled, as a GPU runs
    it, a block is 10 kernels (:func:`test_compiled_kernels_per_block`)."""
    if not onednn:
        monkeypatch.setattr(block_ops, "onednn_fp32", lambda: False)
    fused = block_ops.onednn_fp32()
    a, b = _forward_ops(small[2], keep_cache=keep_cache), _forward_ops(small[4], keep_cache=keep_cache)
    per_block, ops = (sum(b.ops.values()) - sum(a.ops.values())) / 2, b.ops - a.ops
    assert per_block <= 15 - fused + keep_cache, ops
    assert ops["_scaled_dot_product_flash_attention_for_cpu"] == 2                      # one per block
    assert (ops["_linear_pointwise"], ops["gelu_"]) == ((8, 0) if fused else (0, 2)), ops


LAUNCH = re.compile(r"^\s*(?:\w+ = )?(cpp_fused_\w+|triton_\w+\.run|extern_kernels\.\w+|torch\.ops\.\w+\.\w+\.\w+"
                    r"|\w+\.copy_)\(", re.M)


def _compiled_launches(dtype: torch.dtype, keep_cache: bool) -> list[str]:
    """The kernels one block launches on the compiled plan (one attention call): the calls in the ``call`` function
    of the code inductor generates for :func:`block_step` (here C++ kernels, on CUDA Triton ones) plus the extern
    kernels (GEMMs, attention) and any copy left outside a kernel."""
    from torch._inductor.graph import GraphLowering
    model = _small(2)
    var = model.var.in_dtype(dtype).compiled(CompiledBlock())
    spec = model.spec.var
    tokens, classes = torch.randint(0, spec.vocab_size, (3, spec.seq_len)), torch.tensor([1, 2, 3])
    codes: list[str] = []
    with (torch._inductor.config.patch(fx_graph_cache=False), torch.no_grad(),
          mock.patch.object(GraphLowering, "save_output_code", codes.append)):
        var.hidden(classes, model.vae.quantize.var_input(tokens), keep_cache=keep_cache,
                   mods=var.class_table([1, 2, 3]).lookup(classes))
    assert var.block_fn.evidence() == {"graphs": 1, "recompiles": 0, "fallbacks": 0} and var.block_fn.runs == 2
    assert len(codes) == 1                                  # one graph for both blocks
    return LAUNCH.findall(re.split(r"\n\s*def ", codes[0][codes[0].index("def call("):])[0])


@pytest.mark.parametrize("dtype, keep_cache", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)])
def test_compiled_kernels_per_block(dtype, keep_cache):
    """The plan a GPU runs, compiled as it runs there (``CompiledBlock``), on this CPU's inductor: one kernel for LN +
    modulate, the qkv GEMM, one kernel for the q/k normalisation that also writes the new keys/values into the cache,
    attention, the proj GEMM, one kernel for residual + LN + modulate, fc1, GELU, fc2, the residual: 10 kernels per
    block, kept cache or not (the K/V write launches nothing of its own), in fp32 and in bf16."""
    launches = _compiled_launches(dtype, keep_cache)
    assert len(launches) <= 10, launches
    assert sum(k.startswith("extern_kernels.") for k in launches) == 4, launches                  # the four GEMMs
    assert sum(k.startswith("torch.ops.aten._scaled_dot") for k in launches) == 1, launches       # one attention
    assert not any(k.endswith(".copy_") for k in launches), launches


def test_dead_head_keeps_f_normalize_zero_vectors():
    """A head whose k weights are all zero gives zero keys for every input: the norm's floor is switched on for that
    model (and only there), so its keys stay zero as under F.normalize (attention spreads evenly) instead of 0/0."""
    live, dead = _small(2, seed=1), _small(2, seed=1)
    C, c = dead.spec.var.embed_dim, dead.spec.var.embed_dim // dead.spec.var.num_heads
    with torch.no_grad():
        dead.var.blocks[1].attn.mat_qkv.weight[C:C + c] = 0          # block 1, head 0: k ≡ 0
    assert [b.attn.constants()[2] for b in dead.var.blocks] == [False, True]
    assert not any(b.attn.constants()[2] for b in live.var.blocks)
    spec = dead.spec.var
    tokens, classes = torch.randint(0, spec.vocab_size, (2, spec.seq_len)), torch.tensor([1, 2])
    got = dead.pair_logp(tokens, classes, 5)
    assert torch.isfinite(got).all()
    x = torch.randn(1, 3, C)
    with torch.no_grad():
        q, k, v = dead.var.blocks[1].attn.qkv(x)
        ref = F.normalize(F.linear(x, dead.var.blocks[1].attn.mat_qkv.weight[C:2 * C]).view(1, 3, -1, c), dim=-1)
    assert torch.equal(k[0, 0], torch.zeros_like(k[0, 0])) and torch.allclose(k.transpose(1, 2), ref, atol=1e-6)


def test_attention_calls_do_not_grow_with_scales(small):
    """One call per block on a GPU's plan, however many scales; an eager CPU (nothing launched) runs one per scale,
    so the masked-out part is never computed; both give the same log-probs."""
    m, sdpa = small[2], "_scaled_dot_product_flash_attention_for_cpu"
    assert [_forward_ops(m, s).ops[sdpa] for s in (1, 4, 7, 10)] == [2, 2, 2, 2]
    assert [_forward_ops(m, s, one_call=None).ops[sdpa] for s in (1, 4, 7, 10)] == [2, 8, 14, 20]
    spec = m.spec.var
    tokens, classes = torch.randint(0, spec.vocab_size, (3, spec.seq_len)), torch.tensor([1, 2, 3])
    per_scale = m.score_pairs(tokens, classes, 6, keep_cache=True)
    m.var.one_attention_call = True
    try:
        counted = engine_counters(m)
        one = m.score_pairs(tokens, classes, 6, keep_cache=True)
        longer = [m.score_pairs(tokens, classes, 10, cache=r.cache).logp for r in (one, per_scale)]
    finally:
        m.var.one_attention_call = None
    assert counted["host_syncs_per_step"] <= 1 and counted["launches_per_forward"] <= 2 * 16 + 12
    assert (one.logp - per_scale.logp).abs().max() < 1e-4 and (longer[0] - longer[1]).abs().max() < 1e-4
    assert engine_counters(m)["launches_per_forward"] <= 2 * (16 + 10) + 12


def test_scoring_step_has_at_most_one_host_transfer(small):
    """score_pairs (one scoring step on the device): no unique, nonzero or item; the log-probs come back once."""
    m = small[2]
    tokens = torch.randint(0, m.spec.var.vocab_size, (2, m.spec.var.seq_len)).repeat_interleave(3, 0)
    classes = torch.tensor([0, 1, 2] * 2)
    m.score_pairs(tokens, classes, num_scales=6)            # warm: the class table, the attention plan
    with OpCounter() as mode:
        m.score_pairs(tokens, classes, num_scales=6, chunk=2, keep_cache=True)
    assert mode.syncs <= 1
    assert not any(name in mode.ops for name in SYNC_OPS)


def test_continuation_shares_one_key_value_buffer_and_still_trains(small):
    """A forward that continues a cache without keeping all its keys/values runs every block on one scratch buffer;
    under autograd (add-class trains through the blocks) each block gets its own, so backward still works. Both
    give the log-probs of the forward that keeps everything."""
    m = small[4]
    var, spec = m.var, m.spec.var
    ends = spec.scale_ends()
    tokens, classes = torch.randint(0, spec.vocab_size, (2, spec.seq_len)), torch.tensor([1, 2])
    x_in = m.vae.quantize.var_input(tokens)
    with torch.no_grad():
        _, prefix = var.hidden(classes, x_in[:, :ends[2] - 1], keep_cache=True)
        whole, _ = var.hidden(classes, x_in, prefix, keep_cache=True)
        short = prefix.truncate(ends[1])
        part, kept = var.hidden(classes, x_in, prefix, keep_cache=True, cache_out=dataclasses.replace(
            short, bufs=[torch.empty_like(b) for b in short.bufs]))
    assert torch.equal(part, whole) and all(torch.equal(k, p) for k, p in zip(kept.bufs, short.bufs))
    with torch.enable_grad():
        x_grad = x_in.clone().requires_grad_(True)
        trained, _ = var.hidden(classes, x_grad, prefix)
        trained.square().sum().backward()
    assert torch.allclose(trained.detach(), whole, atol=1e-5)
    assert x_grad.grad[:, ends[2] - 1:].abs().sum() > 0 and x_grad.grad.isfinite().all()


def test_kept_keys_values_fit_the_budget(small):
    """The cache holds only K and V (2·C per token and block, not the 3·C qkv buffer it used to view), in one
    preallocated buffer per block, and a scorer keeps no more than its budget."""
    m = small[2]
    spec = m.spec.var
    n_tok, rows = spec.scale_ends()[5], 6
    tokens = torch.randint(0, spec.vocab_size, (rows, spec.seq_len))
    res = m.score_pairs(tokens, torch.arange(rows), num_scales=6, chunk=4, keep_cache=True)
    exact = rows * spec.depth * 2 * n_tok * spec.embed_dim * 4
    assert res.cache.nbytes == exact and len(res.cache.bufs) == spec.depth
    budget = exact + 1
    scorer = Scorer(m, cache_bytes=budget)
    scorer.score(tokens, torch.arange(rows), 6, [(i, 0) for i in range(rows)], keep_tokens=n_tok)
    held = sum(b.cache.nbytes for b in scorer.batches.values() if b.cache is not None)
    assert 0 < held <= budget
    small_scorer = Scorer(m, cache_bytes=exact - 1)          # does not fit: nothing kept
    small_scorer.score(tokens, torch.arange(rows), 6, [(i, 0) for i in range(rows)], keep_tokens=n_tok)
    assert all(b.cache is None for b in small_scorer.batches.values())


def test_class_table_once_per_class_set(small):
    """Computed once per engine, in fixed blocks of class ids: asking for survivors (a subset) computes nothing,
    and a class's rows do not depend on which classes came first (bit for bit, so reuse across stages stays the
    engine's own continuation)."""
    var = small[2].var
    t = var.class_table([3, 5, 7])
    rows = t.rows
    assert var.class_table([5, 7]) is t and t.rows is rows
    with torch.no_grad():
        want = var.modulations(var.conditions(torch.tensor([7, 3])))
    assert torch.allclose(t.lookup(torch.tensor([7, 3])), want, atol=1e-6)
    fresh = _small(2).var.class_table([200, 7])
    assert torch.equal(fresh.lookup(torch.tensor([7, 3])), t.lookup(torch.tensor([7, 3])))
    assert len(fresh.blocks) == 2 and 200 in fresh.ids


def test_fused_head_equals_log_softmax(small, monkeypatch):
    """In tiles of a few tokens (no B×L×V logits at once) the target log-probs equal a full log-softmax's."""
    var = small[2].var
    h = torch.randn(2, 37, var.spec.embed_dim)
    targets = torch.randint(0, var.spec.vocab_size, (2, 37))
    want = torch.log_softmax(var.head(h), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    monkeypatch.setattr(likelihood, "HEAD_TILE_BYTES", 5 * 4 * var.spec.vocab_size)     # 5 tokens a tile
    got = likelihood.target_logp(var, h, targets)
    assert (got - want).abs().max() < 1e-4


def _schedule(model):
    latents = torch.randn(2, model.spec.vae.z_channels, 16, 16)
    profile = Profile("c", (Stage(2, 1, 3), Stage(3, 2, 2), Stage(3, 1, 1)), sigma=0.1)
    tokens = sample_tokens(model, latents, 2, 0.1, 0)
    return lambda: (run_stages(model, tokens, range(6), profile, Scorer(model)),
                    model.pair_logp(tokens[:1, 0], torch.tensor([1]), 3))


def test_compiled_block_one_graph_no_breaks_no_recompiles():
    """Under torch.compile (fullgraph: a break would raise) stages 1–3 with smoothing, the precision guard's fp32
    re-scoring and a 1-row forward compile once per dtype during warm-up; a second run compiles nothing more."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    model = _small(2)
    model.compile, model.dtype = True, torch.bfloat16
    model._engines.clear()
    for dt in (torch.bfloat16, torch.float32):
        model.engine_var(dt).block_fn.backend = "eager"
    run = _schedule(model)
    counters.clear()
    run()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and not counters["graph_break"]
    counters.clear()
    run()
    assert counters["stats"]["unique_graphs"] == 0 and not counters["recompiles"] and not counters["graph_break"]
    assert not any(model.engine_var(dt).block_fn.failed for dt in (torch.bfloat16, torch.float32))


def test_compiler_failure_warns_once_and_oom_is_raised(small, caplog):
    m = small[2]
    tokens = torch.randint(0, m.spec.vocab_size if hasattr(m.spec, "vocab_size") else 4096, (2, 30))
    want = m.pair_logp(tokens, torch.tensor([1, 2]), 4)

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    def oom(gm, example_inputs):
        def run(*args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return run

    var = m.var
    try:
        torch._dynamo.reset()
        var.block_fn = CompiledBlock(broken)
        with caplog.at_level(logging.WARNING, logger="avarc"):
            got = [m.pair_logp(tokens, torch.tensor([1, 2]), 4) for _ in range(2)]
        assert all(torch.allclose(g, want, atol=1e-5) for g in got)
        assert len([r for r in caplog.records if "compiling the blocks failed" in r.message]) == 1
        torch._dynamo.reset()
        var.block_fn = CompiledBlock(oom)
        with pytest.raises(torch.OutOfMemoryError):
            m.pair_logp(tokens, torch.tensor([1, 2]), 4, chunk=1)
        assert not var.block_fn.failed
    finally:
        var.block_fn = None
        torch._dynamo.reset()


def test_bench_reports_the_counters(conf_model):
    """`avarc bench` rows carry launches per forward and host syncs per step (JSON fields, table columns)."""
    from avarc.io.profiles import load_profile
    from avarc.runs.bench import run
    size = conf_model.spec.image_size
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    row = run(conf_model, load_profile("a-varc-plus"), x, [0, 1], warmup=0, repeat=1).to_json()
    depth, scales = conf_model.spec.var.depth, len(conf_model.spec.var.patch_nums)
    assert depth * 8 <= row["launches_per_forward"] <= depth * (16 + scales) + 12      # a CPU: a call per scale
    assert row["host_syncs_per_step"] <= 1


def test_bf16_score_error_not_larger_than_before():
    """bf16 − fp32 summed class scores of the 256 px conformance images (every class and the null class) stay within
    what the engine gave before v3 on this CPU path (0.145 / 0.334 nats RMS / max, emulated bf16 on an AVX2 host;
    0.14 / 0.41 on an H200): the single masked attention call and the in-place q/k scaling add no error beyond
    rounding noise."""
    conf = ConformanceSet("official256")
    model = conf.load()
    classes = range(conf.meta["num_classes"] + 1)
    fp32 = model.token_logp(conf.golden["tokens"], classes)
    with model.computing_in(torch.bfloat16):
        bf16 = model.token_logp(conf.golden["tokens"], classes)
    err = bf16.sum(-1) - fp32.sum(-1)
    assert err.pow(2).mean().sqrt() < 0.15 and err.abs().max() < 0.41
    assert torch.equal(bf16.sum(-1).argmax(1), fp32.sum(-1).argmax(1))


def test_mask_built_once_with_aligned_rows(small):
    """The one-call plan's mask is built once per geometry and dtype, its rows padded to 16 keys in memory (the
    memory-efficient GPU kernel re-pads any other mask on every call)."""
    var = small[2].var
    plan = var.plan(0, 91, torch.device("cpu"))
    m = plan.mask(torch.float32)
    assert m.shape == (91, 91) and m.stride(0) % 16 == 0 and plan.mask(torch.float32) is m
    assert var.plan(0, 91, torch.device("cpu")) is plan
