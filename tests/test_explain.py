"""avarc.tasks.explain: maps and scores against the formula applied to the conformance golden ``logp``
(tests/data/conformance/<set>/golden.npz), pair choice, one-class models and safe output names."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from avarc import AvarcError, build_model
from avarc.io.profiles import load_profile
from avarc.tasks.explain import Target, choose_pair, explain_images, explain_tokens, scale_maps, unique_stems
from tests.conftest import IMAGE, A, B, expected_maps, tiny_spec


def test_maps_and_scores_equal_the_formula_on_golden_logp(conf, conf_model):
    g = conf.golden
    null = conf.meta["null_class"]
    (ex,) = explain_tokens(conf_model, g["tokens"][IMAGE:IMAGE + 1], [(A, B)])
    lp = g["logp"][IMAGE].double().numpy()
    patch_nums = tuple(conf.meta["patch_nums"])
    want = expected_maps(lp[A], lp[B], lp[null], patch_nums)
    p = patch_nums[-1]
    assert ex.classes == (A, B) and ex.maps.dtype == torch.float32 and ex.maps.shape == (3, p, p)
    assert np.abs(ex.maps.numpy() - want).max() < 1e-4
    assert np.abs(ex.per_scale.numpy() - np.stack([lp[A] - lp[null], lp[B] - lp[null], lp[A] - lp[B]])).max() < 1e-4
    assert np.abs(ex.scores.numpy() - lp[[A, B, null]].sum(-1)).max() < 0.05      # sums of ≤ 2240 tokens


def test_pmi_tokens_sum_to_the_log_likelihood_ratio(conf, conf_model):
    (ex,) = explain_tokens(conf_model, conf.golden["tokens"][:1], [(A, B)])
    per_token = ex.per_scale.double().sum(-1).numpy()
    a, b, null = ex.scores.numpy()
    assert per_token[0] == pytest.approx(a - null, abs=1e-3)
    assert per_token[1] == pytest.approx(b - null, abs=1e-3)
    assert per_token[2] == pytest.approx(a - b, abs=1e-3)
    assert ex.ratios == pytest.approx((a - null, b - null, a - b))


def test_fewer_scales_explain_on_the_last_used_grid(conf, conf_model):
    g = conf.golden
    null, S = conf.meta["null_class"], 6
    patch_nums = tuple(conf.meta["patch_nums"][:S])
    (ex,) = explain_tokens(conf_model, g["tokens"][IMAGE:IMAGE + 1], [(A, B)], num_scales=S)
    L = sum(k * k for k in patch_nums)
    lp = g["logp"][IMAGE, :, :L].double().numpy()
    assert ex.patch_nums == patch_nums and ex.maps.shape == (3, patch_nums[-1], patch_nums[-1])
    assert np.abs(ex.maps.numpy() - expected_maps(lp[A], lp[B], lp[null], patch_nums)).max() < 1e-4
    assert np.abs(ex.scores.numpy() - lp[[A, B, null]].sum(-1)).max() < 0.01
    with pytest.raises(AvarcError, match="11 scales asked for"):
        explain_tokens(conf_model, g["tokens"][:1], [(A, B)], num_scales=11)


def test_map_sum_is_the_ratio_when_the_grid_is_a_multiple_of_every_scale():
    per_token = torch.randn(2, 1 + 4 + 16 + 64, dtype=torch.float64)
    maps = scale_maps(per_token, (1, 2, 4, 8))
    assert maps.shape == (2, 8, 8)
    assert torch.allclose(maps.sum((-1, -2)), per_token.sum(-1))
    assert maps[0, 0, 0] == pytest.approx(per_token[0, :1].sum() / 64 + per_token[0, 1] / 16 + per_token[0, 5] / 4
                                          + per_token[0, 21])


@pytest.mark.parametrize("target, ranking, want", [
    (Target(), [4, 2, 7], (4, 2)),                      # prediction vs runner-up
    (Target(label=2), [4, 2, 7], (2, 4)),               # true class vs best wrong class (paper)
    (Target(label=4), [4, 2, 7], (4, 2)),
    (Target(cls=7), [4, 2, 7], (7, 4)),
    (Target(vs=4), [4, 2, 7], (2, 4)),                  # A = best class other than the fixed B
    (Target(cls=1, vs=10), None, (1, 10)),              # both fixed: no ranking needed
    (Target(), [0], (0, 10)),                           # one-class model: B = null
])
def test_choose_pair(target, ranking, want):
    assert choose_pair(target, ranking, null_class=10) == want


def test_choose_pair_rejects_a_pair_of_one_class():
    with pytest.raises(AvarcError, match="same class"):
        choose_pair(Target(label=3, vs=3), None, null_class=10)
    with pytest.raises(AvarcError, match="null class"):
        choose_pair(Target(cls=10), [1, 2], null_class=10)


def test_one_class_model_explains_against_null():
    torch.manual_seed(0)
    model = build_model(tiny_spec(num_classes=1), "cpu")
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    for ex in explain_images(model, images, [Target()] * 3, load_profile("varc"), 0):
        assert ex.classes == (0, model.null_class) and ex.pred == 0
        assert not ex.maps[1].any() and torch.equal(ex.maps[2], ex.maps[0])
        assert ex.ratios[1] == 0.0 and ex.ratios[0] == ex.ratios[2]


def test_an_impossible_pair_skips_only_its_image():
    torch.manual_seed(0)
    model = build_model(tiny_spec(num_classes=3), "cpu")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    out = explain_images(model, images, [Target(vs=1, label=1), Target(vs=1, label=2)], load_profile("varc"), 0)
    assert isinstance(out[0], AvarcError) and "same class" in str(out[0])
    assert out[1].classes == (2, 1) and out[1].label == 2 and out[1].pred is None


def test_output_stems_are_safe_and_unique():
    paths = ["x/cat dog.png", "y/cat dog.jpg", "z/Cat Dog.png", "猫.png", "café.png", ".hidden.png", "a/b.c.png",
             "x/cat_dog-2.png"]
    assert unique_stems(paths) == ["cat_dog", "cat_dog-2", "Cat_Dog-3", "image", "cafe", "hidden", "b.c",
                                   "cat_dog-2-2"]
