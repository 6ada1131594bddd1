"""avarc.tasks.heatmap: colormaps, normalisation (constant maps never NaN), panel geometry and the rendered PNG."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from avarc import AvarcError
from avarc.tasks.explain import explain_logp
from avarc.tasks.heatmap import GAP, caption_height, figure_size, jet, normalise, overlay, panel_size, render, turbo

PATCH_NUMS = (1, 2, 4)


def explanation(logp: torch.Tensor):
    return explain_logp(logp, (0, 1), PATCH_NUMS)


def test_colormaps_run_dark_blue_to_dark_red():
    assert jet(np.array(0.0)) == pytest.approx([0, 0, 0.5])
    assert jet(np.array(0.5)) == pytest.approx([0.5, 1, 0.5])
    assert jet(np.array(1.0)) == pytest.approx([0.5, 0, 0])
    lo, mid, hi = turbo(np.array([0.0, 0.5, 1.0]))
    assert lo.sum() < 0.5                                                # near black
    assert mid.argmax() == 1 and mid[1] > 0.9                            # bright green
    assert hi.argmax() == 0 and hi[1] < 0.1 and hi[2] < 0.1              # dark red
    v = np.linspace(0, 1, 257)
    for cmap in (jet, turbo):
        c = cmap(v)
        assert c.shape == (257, 3) and c.min() >= 0 and c.max() <= 1


def test_normalise_clips_at_zero_and_never_makes_nan():
    assert np.array_equal(normalise(np.full((4, 4), 3.0)), np.zeros((4, 4)))        # constant
    assert np.array_equal(normalise(-np.arange(16.0).reshape(4, 4)), np.zeros((4, 4)))  # no evidence for
    m = normalise(np.array([[-5.0, 0.0], [1.0, 3.0]]))
    assert m == pytest.approx(np.array([[0, 0], [1 / 3, 1]]))
    assert np.isfinite(normalise(np.array([[np.nan, np.inf], [1.0, 2.0]]))).all()


def test_overlay_alpha_blends_the_colormap_over_the_input():
    base = np.full((8, 8, 3), 200, np.uint8)
    m = np.zeros((2, 2))
    m[0, 0] = 1.0
    assert np.array_equal(overlay(base, m, alpha=0.0), base)
    full = overlay(base, m, "jet", alpha=1.0)
    assert full[0, 0] == pytest.approx([128, 0, 0], abs=1)       # hottest token → dark red
    assert full[7, 7] == pytest.approx([0, 0, 128], abs=1)       # zero → dark blue
    half = overlay(base, m, "jet", alpha=0.5)
    assert half[7, 7] == pytest.approx([100, 100, 164], abs=1)


@pytest.mark.parametrize("size, panel", [(8, 256), (16, 256), (24, 264), (32, 256), (256, 256), (512, 512)])
def test_panels_are_a_whole_multiple_of_the_input(size, panel):
    assert panel_size(size) == panel and panel % size == 0
    assert figure_size(size) == (4 * panel + 3 * GAP, panel + caption_height(panel))


def test_render_has_four_equal_panels_with_the_input_pixels_first():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    logp = torch.from_numpy(rng.normal(size=(3, 21))).float()
    img = render(pixels, explanation(logp), ("cat/dog", "big bird"), alpha=0.5)
    P = panel_size(16)
    assert img.size == figure_size(16) and img.mode == "RGB"
    fig = np.asarray(img)
    assert np.array_equal(fig[:P, :P], np.repeat(np.repeat(pixels, 16, 0), 16, 1))     # input, nearest ×16
    assert (fig[:P, P:P + GAP] == 255).all()                                               # gap between panels
    for i in range(1, 4):                                                                  # heatmaps differ from input
        assert not np.array_equal(fig[:P, i * (P + GAP):i * (P + GAP) + P], fig[:P, :P])
    strip = fig[P:, :P]
    assert (strip == 16).mean() > 0.5 and (strip > 200).any()                              # dark strip, white text


def test_constant_maps_render_as_the_zero_colour():
    pixels = np.full((16, 16, 3), 100, np.uint8)
    logp = torch.zeros(3, 21)                                        # A, B and null identical: every map is 0
    img = np.asarray(render(pixels, explanation(logp), ("a", "b"), colormap="jet", alpha=0.5))
    P = panel_size(16)
    zero = np.round(0.5 * 100 + 0.5 * jet(np.array(0.0)) * 255)
    for i in range(1, 4):
        panel = img[:P, i * (P + GAP):i * (P + GAP) + P]
        assert (panel == zero).all()


def test_contrast_panel_follows_the_more_likely_class():
    pixels = np.full((16, 16, 3), 0, np.uint8)
    logp = torch.zeros(3, 21)
    logp[1, -1] = 5.0                                                # B beats A at the last token only
    ex = explanation(logp)
    assert ex.ratios[2] == pytest.approx(-5.0)
    img = np.asarray(render(pixels, ex, ("a", "b"), colormap="jet", alpha=1.0))
    P = panel_size(16)
    contrast = img[:P, 3 * (P + GAP):]
    assert contrast[-1, -1] == pytest.approx([128, 0, 0], abs=1)     # hottest where B won (bottom-right token)
    assert contrast[0, 0] == pytest.approx([0, 0, 128], abs=1)


def test_bad_style_is_a_user_error():
    ex = explanation(torch.zeros(3, 21))
    with pytest.raises(AvarcError, match="colormap 'viridis'"):
        render(np.zeros((16, 16, 3), np.uint8), ex, ("a", "b"), colormap="viridis")
    with pytest.raises(AvarcError, match="opacity 1.5"):
        render(np.zeros((16, 16, 3), np.uint8), ex, ("a", "b"), alpha=1.5)


def test_png_round_trips(tmp_path):
    ex = explanation(torch.randn(3, 21))
    render(np.zeros((16, 16, 3), np.uint8), ex, ("ünïcode 名前", "x" * 200)).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:
        assert im.size == figure_size(16)


def test_captions_fold_accents_for_the_bundled_font():
    pixels = np.zeros((16, 16, 3), np.uint8)
    ex = explanation(torch.randn(3, 21, generator=torch.Generator().manual_seed(0)))
    folded = np.asarray(render(pixels, ex, ("uni", "cafe"), note="true: uni"))
    assert np.array_equal(np.asarray(render(pixels, ex, ("ünï", "café"), note="true: ünï")), folded)
    assert not np.array_equal(np.asarray(render(pixels, ex, ("uno", "cafe"), note="true: uni")), folded)
