"""Compute accounting against the paper's Table 1/2 GFLOPs for VAR-d16 with 100 classes."""
from dataclasses import dataclass

import pytest

from avarc import official_spec
from avarc.engine.flops import encoder_macs, schedule_macs, sequence_macs


@dataclass
class Stage:
    scales: int
    samples: int
    keep: int


VARC = [Stage(10, 1, 1)]
A_VARC_PLUS = [Stage(6, 1, 10), Stage(10, 1, 3), Stage(10, 3, 1)]
SMOOTH_TOP10 = [Stage(10, 1, 10), Stage(10, 10, 1)]


@pytest.mark.parametrize("stages, paper_gflops", [(VARC, 14105.0), (A_VARC_PLUS, 4649.4), (SMOOTH_TOP10, 28210.0)])
def test_paper_convention_within_2_percent(stages, paper_gflops):
    macs = schedule_macs(official_spec("d16"), stages, num_classes=100)
    assert abs(macs.paper / 1e9 / paper_gflops - 1) < 0.02


def test_reuse_counts_only_new_work():
    spec = official_spec("d16")
    paper, executed = schedule_macs(spec, A_VARC_PLUS, 100), schedule_macs(spec, A_VARC_PLUS, 100, reuse=True)
    ends = spec.var.scale_ends()
    saved = (sequence_macs(spec.var, ends[9]) * 10 + sequence_macs(spec.var, ends[9]) * 3).linear \
        - (sequence_macs(spec.var, ends[9], ends[5]) * 10).linear
    assert paper.linear - executed.linear == pytest.approx(saved)
    assert schedule_macs(spec, VARC, 100, reuse=True) == schedule_macs(spec, VARC, 100)


def test_encoder_counted_once_per_image():
    spec = official_spec("d16")
    enc = encoder_macs(spec.vae, spec.image_size, spec.var.patch_nums)
    assert 100e9 < enc < 115e9   # ch160 f16 encoder at 256 px
    assert schedule_macs(spec, VARC, 1).encoder == enc == schedule_macs(spec, VARC, 100).encoder
