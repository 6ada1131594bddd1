"""The engine's precision and robustness on every available device: exact fp32 tokenisation (TF32 off), the
compute dtype where it belongs, the precision guard (bf16 predictions equal fp32's; on the 359 test digits in
test_bf16_digits), OOM recovery, thread choice."""
from __future__ import annotations

import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from avarc.engine.profile import GUARD_NATS_PER_TOKEN
from avarc.engine.runtime import resolve_threads, usable_cores
from avarc.engine.schedule import sample_tokens
from avarc.engine.scoring import Scorer
from avarc.io.loading import resolve_model
from avarc.io.profiles import load_profile, parse_profile
from avarc.models.specs import official_spec
from tests.conftest import AT_256, predict_as

MATMUL, CONV = torch.backends.cuda.matmul, torch.backends.cudnn.conv   # torch's per-backend precision API


def _tf32() -> tuple[bool, bool]:
    """Whether fp32 matmuls and convolutions may use TF32 now (read with the API the engine sets: mixing in the
    legacy ``allow_tf32`` getters raises once the new one is used)."""
    return MATMUL.fp32_precision == "tf32", CONV.fp32_precision == "tf32"


def test_tf32_is_off_inside_tokenisation_and_restored(conf, engine_model):
    """Every convolution of encode, tokenise and var_input sees TF32 off; the caller's settings come back."""
    seen = []
    convs = [m for m in engine_model.vae.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks = [c.register_forward_hook(lambda *_: seen.append(_tf32())) for c in convs]
    saved = MATMUL.fp32_precision, CONV.fp32_precision
    MATMUL.fp32_precision = CONV.fp32_precision = "tf32"
    try:
        images = conf.golden["latent"].new_zeros(1, 3, conf.meta["image_size"], conf.meta["image_size"])
        tokens = engine_model.tokenize(images)
        engine_model.vae.quantize.var_input(tokens)
        assert _tf32() == (True, True)
    finally:
        MATMUL.fp32_precision, CONV.fp32_precision = saved
        for h in hooks:
            h.remove()
    assert len(seen) > 10 and set(seen) == {(False, False)}


def test_bf16_weights_cache_and_fp32_logits(conf, engine_model):
    """Native bf16: the blocks' linears hold bf16 weights (converted once), q/k/v and the kept cache are bf16, the
    head and the log-probs fp32; the fp32 model itself is untouched."""
    engine_model.dtype = torch.bfloat16
    try:
        low = engine_model.engine_var()
        assert low is engine_model.engine_var()                     # converted once, not per call
        blk = low.blocks[0]
        assert {blk.attn.mat_qkv.weight.dtype, blk.ffn.fc1.weight.dtype} == {torch.bfloat16}
        assert (low.head.weight.dtype == torch.float32
                and engine_model.var.blocks[0].ffn.fc1.weight.dtype == torch.float32)
        q, k, v = blk.attn.qkv(torch.zeros(1, 4, engine_model.spec.var.embed_dim, device=engine_model.device,
                                           dtype=torch.bfloat16))
        assert {q.dtype, k.dtype, v.dtype} == {torch.bfloat16}
        res = engine_model.score_pairs(conf.golden["tokens"][:2], torch.tensor([0, 1]), num_scales=4, keep_cache=True)
        assert res.logp.dtype == torch.float32 and res.cache.kv[0][0].dtype == torch.bfloat16
    finally:
        engine_model.dtype = torch.float32


def test_head_uses_tf32_only_under_reduced_precision(conf, engine_model):
    """The head's fp32 matmul may use TF32 on a GPU only when the body runs in bf16; an fp32 engine (and so the
    precision guard's re-scoring) stays true fp32, and the caller's setting comes back either way."""
    tokens, classes = conf.golden["tokens"][:2], torch.tensor([0, 1])
    seen, vocab = {}, engine_model.spec.var.vocab_size
    saved = MATMUL.fp32_precision

    class HeadMatmul(TorchDispatchMode):        # the fused head's tiles: addmm with vocab-wide outputs
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "addmm" and args[2].shape[-1] == vocab:
                seen[dtype] = _tf32()[0]
            return func(*args, **(kwargs or {}))

    try:
        for dtype in (torch.float32, torch.bfloat16):
            engine_model.dtype = dtype
            with HeadMatmul():
                engine_model.score_pairs(tokens, classes, num_scales=3)
            assert MATMUL.fp32_precision == saved
    finally:
        engine_model.dtype = torch.float32
    assert seen == {torch.float32: False, torch.bfloat16: True}


@AT_256
def test_guard_makes_bf16_predictions_fp32s(conf, engine_model):
    """With every image's top two closer than the margin, the guard re-scores all of them: predictions and final
    top-two scores are fp32's."""
    prof = load_profile("a-varc-plus").resolve(len(engine_model.spec.var.patch_nums))
    wide = parse_profile({"stages": [{"scales": 6, "keep": 3}, {"scales": "all", "samples": 2, "keep": 1}],
                          "guard_margin": 1e9}, "wide", "test")
    latents = conf.golden["latent"]
    assert prof.sigma == wide.sigma            # one draw of tokens for both (tokenisation is fp32 whatever the dtype)
    tokens = sample_tokens(engine_model, latents, max(prof.max_samples, wide.max_samples), prof.sigma, 0)
    for p in (prof, wide):
        scorer = Scorer(engine_model)
        fp32 = predict_as(engine_model, tokens, p, torch.float32)
        bf16 = predict_as(engine_model, tokens, p, torch.bfloat16, scorer)
        assert [r.pred for r in bf16] == [r.pred for r in fp32]
    assert scorer.guarded == latents.shape[0]
    for a, b in zip(bf16, fp32):
        assert abs(a.ranking[0][1] - b.ranking[0][1]) < 1e-2


def test_out_of_memory_halves_the_chunk(conf, engine_model, monkeypatch, caplog):
    """An out-of-memory error (injected for chunks over 2 pairs) is retried with half the chunk: same numbers,
    one log line."""
    tokens, classes = conf.golden["tokens"][:3].repeat(2, 1), torch.tensor([0, 1, 2, 3, 4, 5])
    want = engine_model.pair_logp(tokens, classes, num_scales=5, chunk=1)      # what the retry ends with
    real = type(engine_model.var).hidden

    def tight(self, class_idx, *a, **kw):
        if class_idx.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, class_idx, *a, **kw)

    monkeypatch.setattr(type(engine_model.var), "hidden", tight)
    with caplog.at_level(logging.WARNING, logger="avarc"):
        got = engine_model.pair_logp(tokens, classes, num_scales=5, chunk=6)
    assert torch.equal(got, want)
    assert [r.getMessage() for r in caplog.records] == [
        "out of device memory with 6 pairs per forward; retrying with 3",
        "out of device memory with 3 pairs per forward; retrying with 1"]


def test_guard_margin_default_and_validation():
    prof = load_profile("a-varc-plus")
    assert prof.guard_margin is None and prof.margin(680) == pytest.approx(680 * GUARD_NATS_PER_TOKEN)
    assert parse_profile({"stages": [{"scales": 2}], "guard_margin": 0}, "x", "t").margin(680) == 0
    with pytest.raises(Exception, match="guard_margin"):
        parse_profile({"stages": [{"scales": 2}], "guard_margin": -1}, "x", "t")


def test_threads_follow_the_work_and_a_request_beyond_the_cores_is_cut_with_one_warning(caplog):
    """A tiny model runs on one thread (a busy core would stall a second one); a large one on every usable core,
    whatever the load average says; a request is kept up to the usable cores."""
    tiny = resolve_model("digits").spec.var
    cores = usable_cores()
    assert resolve_threads(tiny) == 1 and resolve_threads(tiny, cores) == cores
    assert resolve_threads(official_spec("d16").var) == cores
    with caplog.at_level("WARNING", logger="avarc"):
        assert resolve_threads(tiny, 999) == cores
    assert [r.message for r in caplog.records] == [f"warning: 999 threads asked for, but this process may use {cores} "
                                                   f"core(s); using {cores} (more threads than cores wait for each "
                                                   "other)"]
