"""bf16 against fp32 on the 359 test digits with the bundled digits model: the precision guard makes bf16's
predictions fp32's, with oneDNN's native bf16 and with the emulated fallback (``AVARC_CPU_BF16=emulated``, the
AVX2 path), pruning and early exits included; unguarded bf16 keeps ≥ 99% of fp32's top-1.

The digits are encoded, their tokens sampled and fp32's predictions computed once per device for the whole file;
each test runs only its own bf16 pass."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from avarc.engine.model import Model
from avarc.engine.profile import Profile
from avarc.engine.schedule import sample_tokens
from avarc.engine.scoring import Scorer
from avarc.engine.stages import Prediction
from avarc.io.loading import resolve_model
from avarc.io.profiles import load_profile, parse_profile
from scripts import digits
from tests.conftest import DEVICES, predict_as

# Without a guard: full scales for all ten classes (its first stage is what `token_logp` sums), then 3 samples.
OFF = parse_profile({"stages": [{"scales": "all", "keep": 3}, {"scales": "all", "samples": 3}], "guard_margin": 0},
                    "off", "test")
# With the schedule `avarc tune` picks at half of varc's compute, a first-stage pruning tie of 0.003 nats (digit
# 1632) dropped the true class in bf16 when only the last stage was guarded: pruning and early exits are guarded too.
STAGED = parse_profile({"stages": [{"scales": 2, "keep": 5, "exit_margin": 3.6}, {"scales": 4, "keep": 1}]},
                       "staged", "test")


@dataclass
class Fp32Digits:
    """The 359 test digits on one device: their tokens (sampled once: the shipped profile's clean tokens and
    neighbours, which the other profiles' stages read a prefix of) and fp32's predictions."""

    model: Model
    shipped: Profile
    tokens: torch.Tensor
    fp32: list[Prediction]           # the shipped profile
    fp32_staged: list[Prediction]


_FP32: dict[str, Fp32Digits] = {}


@pytest.fixture(scope="module", params=DEVICES)
def fp32_digits(request) -> Fp32Digits:
    if request.param not in _FP32:
        model = resolve_model("digits", device=request.param)
        data = digits.load_digits("test")
        latents = model.encode(digits.to_tensor(data.images, model.spec.image_size))
        shipped = load_profile(model.meta.get("default_profile", "digits"))
        n = len(model.spec.var.patch_nums)
        assert {p.sigma for p in (shipped, OFF, STAGED)} == {shipped.sigma}     # one sample serves every profile
        samples = max(p.resolve(n).max_samples for p in (shipped, OFF, STAGED))
        tokens = sample_tokens(model, latents, samples, shipped.sigma, 0)
        _FP32[request.param] = Fp32Digits(model, shipped, tokens, predict_as(model, tokens, shipped, torch.float32),
                                          predict_as(model, tokens, STAGED, torch.float32))
    return _FP32[request.param]


@pytest.fixture(scope="module")
def unguarded_bf16(fp32_digits) -> list[Prediction]:
    """bf16 without the guard (native bf16 where the CPU has it)."""
    return predict_as(fp32_digits.model, fp32_digits.tokens, OFF, torch.bfloat16)


def test_guard_on_the_359_test_digits(fp32_digits, unguarded_bf16):
    """The shipped digits profile in bf16 with its default guard predicts exactly what fp32 does."""
    d = fp32_digits
    scorer = Scorer(d.model)
    bf16 = predict_as(d.model, d.tokens, d.shipped, torch.bfloat16, scorer)
    assert len(d.fp32) == 359 and [r.pred for r in bf16] == [r.pred for r in d.fp32]
    assert scorer.guarded < 36                           # only close calls pay for fp32
    assert sum(a.pred == b.pred for a, b in zip(unguarded_bf16, d.fp32)) >= 0.99 * 359
    scorer = Scorer(d.model)
    bf16 = predict_as(d.model, d.tokens, STAGED, torch.bfloat16, scorer)
    fp32 = d.fp32_staged
    assert [r.pred for r in bf16] == [r.pred for r in fp32]
    assert [set(r.stages[0].decisions(None)[1]) for r in bf16] == [set(r.stages[0].decisions(None)[1]) for r in fp32]
    assert [r.exited_after for r in bf16] == [r.exited_after for r in fp32]
    assert any(r.stages[0].exact for r in bf16) and scorer.guarded < 36


def test_bf16_agrees_with_fp32(fp32_digits, unguarded_bf16):
    """bf16 (what `--dtype auto` picks on AMX CPUs and GPUs) keeps ≥ 99% of fp32's top-1 on the test split: the
    summed log-likelihoods of all ten classes over all scales (the first stage of both runs)."""
    fp32 = torch.tensor([r.stages[0].scores for r in fp32_digits.fp32])
    bf16 = torch.tensor([r.stages[0].scores for r in unguarded_bf16])
    assert fp32.shape == bf16.shape == (359, 10) and not any(r.stages[0].exact for r in unguarded_bf16)
    agree = (bf16.argmax(1) == fp32.argmax(1)).float().mean().item()
    assert agree >= 0.99, f"bf16 agrees with fp32 on {agree:.3%} of the 359 test digits"
    assert not torch.equal(bf16, fp32)          # bf16 really ran


@pytest.mark.parametrize("fp32_digits", ["cpu"], indirect=True)
def test_emulated_bf16_guard_gives_fp32_predictions_on_the_test_digits(emulated, fp32_digits):
    """The 359 test digits, shipped profile, plain bf16 linears: the precision guard makes every prediction fp32's."""
    d = fp32_digits
    bf16 = predict_as(d.model, d.tokens, d.shipped, torch.bfloat16, Scorer(d.model))
    assert len(d.fp32) == 359 and [p.pred for p in bf16] == [p.pred for p in d.fp32]
