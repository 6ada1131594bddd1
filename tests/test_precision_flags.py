"""Exact fp32 whatever the user set (issue 34, item 3): the precision guard's fp32 engine (and tokenisation) runs true
fp32 under ``torch.set_float32_matmul_precision("high"/"medium")``, the legacy ``allow_tf32`` flags and the newer
``fp32_precision`` settings, mixed or not; ``exact_fp32`` never raises and gives the caller's settings back. On this
CPU (native bf16) "medium" really changes fp32 matmuls (oneDNN runs them in bf16), so the guard's scores show it."""
from __future__ import annotations

import pytest
import torch

from avarc.models.quantizer import _fp32_settings, exact_fp32
from tests.conftest import ConformanceSet

b = torch.backends


def _default() -> None:
    torch.set_float32_matmul_precision("highest")
    for s in _fp32_settings():
        s.fp32_precision = "none"
    b.cudnn.conv.fp32_precision = b.cudnn.rnn.fp32_precision = "tf32"       # torch's defaults


def _high() -> None:
    torch.set_float32_matmul_precision("high")


def _medium() -> None:
    torch.set_float32_matmul_precision("medium")


def _legacy_tf32() -> None:
    b.cuda.matmul.allow_tf32 = True
    b.cudnn.allow_tf32 = True


def _new_api() -> None:
    b.fp32_precision = "tf32"
    b.mkldnn.matmul.fp32_precision = "bf16"


def _mixed() -> None:
    """Legacy flags, then the new API on one cuDNN part only: reading ``cudnn.allow_tf32`` now raises."""
    _legacy_tf32()
    torch.set_float32_matmul_precision("medium")
    b.cudnn.conv.fp32_precision = "ieee"


SETTINGS = {"high": _high, "medium": _medium, "legacy allow_tf32": _legacy_tf32, "fp32_precision API": _new_api,
            "mixed": _mixed}


@pytest.fixture
def restore():
    yield
    _default()


@pytest.fixture(scope="module")
def guard_case():
    conf = ConformanceSet("official256")
    model = conf.load()
    tokens, classes = conf.golden["tokens"][:2], torch.tensor([1, 4])
    with torch.no_grad():
        exact = model.pair_logp(tokens, classes, dtype=torch.float32)
    return model, tokens, classes, exact


def test_medium_changes_fp32_matmuls_on_this_cpu(restore):
    """The reason for all this: without exact_fp32, "medium" moves this CPU's fp32 matmuls (bf16 inside)."""
    a, w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)), torch.randn(512, 64)
    want = a @ w
    _medium()
    if b.mkldnn.matmul.fp32_precision != "bf16" or torch.equal(a @ w, want):
        pytest.skip("this CPU runs fp32 matmuls as fp32 under 'medium' (no native bf16)")
    with exact_fp32():
        assert torch.equal(a @ w, want)


@pytest.mark.parametrize("name", SETTINGS)
def test_guard_engine_is_exact_fp32_under_every_setting(guard_case, restore, name):
    model, tokens, classes, exact = guard_case
    SETTINGS[name]()
    before = [s.fp32_precision for s in _fp32_settings()]
    assert len(before) == 6                                      # torch 2.13 has the newer API
    with exact_fp32():                                           # never raises, whatever was mixed
        assert all(s.fp32_precision == "ieee" for s in _fp32_settings())
    assert [s.fp32_precision for s in _fp32_settings()] == before
    with torch.no_grad():
        got = model.pair_logp(tokens, classes, dtype=torch.float32)        # the guard's re-scoring call
    assert torch.equal(got, exact), (got - exact).abs().max()
