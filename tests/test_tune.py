"""avarc.runs.schedule_table + avarc.runs.tune: a schedule replayed from the one-pass score table is the same schedule
run by the classifier (predictions to the image, scores to 1e-4, executed compute to the MAC), on real digits."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from avarc import Classifier
from avarc.engine.flops import encoder_macs
from avarc.engine.profile import Profile, Stage
from avarc.io.data import collect
from avarc.io.profiles import load_profile
from avarc.runs import tune
from avarc.runs.schedule_table import build_table, exact_sample_counts
from avarc.tasks.calibration import cross_fitted_temperatures
from tests.conftest import counted_run, save_digits

SCHEDULES = {
    "varc": (Stage(4, 1, 1),),
    "digits": (Stage(4, 1, 3), Stage(4, 3, 1)),
    "pruned+exits": (Stage(2, 1, 5, exit_margin=3.0), Stage(3, 1, 3, exit_margin=6.0), Stage(4, 2, 1)),
    "smoothed-early": (Stage(1, 2, 4), Stage(3, 3, 2), Stage(4, 3, 1)),
}


@pytest.fixture(scope="module")
def digits_case(tmp_path_factory):
    clf = Classifier.from_pretrained("digits", device="cpu", dtype="fp32", threads=1)
    root = save_digits(tmp_path_factory.mktemp("tune") / "digits", 1438, 1518)
    found = collect([str(root)], clf.space, "auto", None, None, None)
    table = build_table(clf, found.items, found.candidates, max_samples=3, sigma=0.1, seed=0)
    return clf, found, table


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_table_replay_equals_the_classifier(digits_case, name):
    base, found, table = digits_case
    model = base.model
    profile = Profile(name, SCHEDULES[name], sigma=0.1)
    clf = replace(base, profile=profile)
    records = [r for batch in clf.classify_items(found.items, found.candidates, seed=0) for r in batch]
    preds, linear_macs = counted_run(clf, found.items, found.candidates)
    assert [p.pred for p in preds] == [rec["pred"] for rec in records]
    r = tune.Replayer(table, model.spec).replay(profile.stages)
    assert [rec["path"] for rec in records] == table.paths
    assert [rec["pred"] for rec in records] == r.pred.tolist()                    # to the image
    assert [rec["exited_after"] or 0 for rec in records] == r.exited.tolist()
    worst = 0.0
    for n, rec in enumerate(records):
        for t, st in enumerate(rec["stages"]):
            ours = r.stage_scores[t][n]
            assert sorted(st["candidates"]) == [table.candidates[k] for k in np.flatnonzero(~np.isnan(ours))]
            col = [table.candidates.index(c) for c in st["candidates"]]
            worst = max(worst, float(np.abs(np.asarray(st["scores"]) - ours[col]).max()))
    assert worst < 1e-4 + 5e-5, worst      # records round scores to 1e-4
    enc = encoder_macs(model.spec.vae, model.spec.image_size, model.spec.var.patch_nums)
    assert r.executed_macs.sum() == pytest.approx(linear_macs + enc * len(records), rel=1e-12)


def test_neighbour_prefix_is_what_classify_draws_for_fewer_samples():
    assert exact_sample_counts(torch.zeros(1, 8, 4, 4), 5) == (1, 2, 3, 4, 5)
    assert exact_sample_counts(torch.zeros(1, 3, 5, 5), 3) == (1, 3)    # 75 normals: torch refills the tail


def test_paper_compute_matches_flops_schedule_macs(digits_case):
    clf, _, table = digits_case
    model = clf.model
    from avarc.engine.flops import schedule_macs
    for stages in SCHEDULES.values():
        if any(s.exit_margin is not None for s in stages):
            continue
        r = tune.Replayer(table, model.spec).replay(stages)
        assert r.paper_macs == pytest.approx(schedule_macs(model.spec, stages, 10).paper)
    shipped = load_profile("digits").resolve(4)
    r = tune.Replayer(table, model.spec).replay(shipped.stages)
    assert r.executed_macs.mean() == pytest.approx(schedule_macs(model.spec, shipped.stages, 10, reuse=True).paper,
                                                   rel=0.05)


def test_cross_fitted_temperature_never_sees_the_image_it_judges(digits_case):
    """Each held-out image's temperature is fitted without its fold: making one image a confident mistake changes
    the temperature of the images in other folds (it is in their fit), never its own."""
    clf, _, table = digits_case
    scores = tune.Replayer(table, clf.spec).replay(SCHEDULES["varc"]).final_scores
    y = np.searchsorted(table.candidates, table.labels)
    _, held = tune.split(table.labels, 0.5)
    before = cross_fitted_temperatures(scores, y, held)
    i = held[0]
    worse = scores.copy()
    worse[i, (y[i] + 1) % worse.shape[1]] = worse[i, y[i]] + 50.0      # another class 50 nats ahead of the true one
    after = cross_fitted_temperatures(worse, y, held)
    assert after[0] == before[0]
    assert (after[1:] > before[1:]).sum() >= len(held) - len(held) // 10 - 1 and (after >= 1).all()
