"""Out-of-distribution scores and abstention on the bundled digits model: the bounds on log p(x) hold against a
`varc`-style run that scores every class on every scale, abstention never changes a prediction it keeps, the rule
round-trips through a profile file, and the CLI (calibrate-ood → classify) abstains on noise and counts it."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from avarc import AvarcError, Classifier
from avarc.engine.profile import OodRule, Profile, Stage
from avarc.io.data import Item
from avarc.io.profiles import load_profile, write_profile
from avarc.io.records import ok_record
from avarc.tasks.ood import OOD_SCORES, auroc, fit_thresholds
from scripts.digits import load_digits
from scripts.ood_digits import letters, noise
from tests.conftest import run_cli, save_digits


@pytest.fixture(scope="module")
def clf() -> Classifier:
    return Classifier.from_pretrained("digits", device="cpu", dtype="fp32", threads=1)


@pytest.fixture(scope="module")
def images() -> tuple[list[Image.Image], list[int]]:
    """30 test digits, then 8 letters and 8 noise images (unlabelled)."""
    d = load_digits("all")
    digits = [Image.fromarray(d.images[i]) for i in range(1438, 1468)]
    return digits + letters(8) + noise(8), d.labels[1438:1468].tolist()


PROFILES = {
    "digits (smoothed last stage)": None,
    "partial first stage": Profile("p", (Stage(2, keep=5), Stage(3, samples=2, keep=3), Stage("all", keep=1))),
    "early exits": Profile("e", (Stage(3, keep=4, exit_margin=3.0), Stage("all", samples=2, keep=1))),
    "final stage on 3 of 4 scales": Profile("s", (Stage(2, keep=4), Stage(3, samples=2, keep=1))),
}


@pytest.mark.parametrize("name", PROFILES)
def test_bounds_hold_against_every_class_on_every_scale(clf, images, name):
    profile = (PROFILES[name] or load_profile("digits")).resolve(4)
    final = int(profile.stages[-1].scales)
    truth = replace(clf, profile=Profile("varc", (Stage(final, keep=1),)))
    exact = [torch.logsumexp(torch.tensor([s for _, s in p.ranking], dtype=torch.float64), 0).item() - math.log(10)
             for p in truth.classify(images[0])]
    preds = replace(clf, profile=profile).classify(images[0])
    if name == "early exits":
        assert any(p.exited_after for p in preds)
    widths = []
    for p, x in zip(preds, exact):
        lo, hi = p.ood["log_px"]
        assert lo - 1e-3 <= x <= hi + 1e-3, (name, lo, x, hi)
        assert p.ood["likelihood"] == pytest.approx(lo / p.ood["tokens"])
        widths.append(hi - lo)
    if name.startswith("digits"):
        assert max(widths) < 1e-9       # stage 1 scores every class exactly: the bounds meet
    elif name == "partial first stage":
        assert max(widths) > 0          # pruned classes only have partial scores: a real interval


def test_ratio_and_posterior_are_what_they_say(clf, images):
    p = clf.classify(images[0][:3])[0]
    null = clf.model.null_class
    tokens = clf.model.tokenize(torch.stack([torch.from_numpy(np.array(images[0][0].convert("RGB"))).permute(2, 0, 1)
                                             .float().div(255).mul(2).sub(1)]))
    logp = clf.model.token_logp(tokens, [p.pred, null]).double().sum(-1)[0]
    assert p.ood["ratio"] == pytest.approx((logp[0] - logp[1]).item(), abs=1e-3)
    assert p.ood["posterior"] == p.posterior[0][1]


def test_abstention_never_changes_a_prediction_it_keeps(clf, images):
    fit = [p.ood for p in clf.classify(images[0][:20])]
    rule = OodRule("likelihood", 0.9, tuple(fit_thresholds(fit, 0.9).items()))
    assert sum(o["likelihood"] >= rule.threshold("likelihood") for o in fit) >= 18
    plain = clf.classify(images[0][20:])
    for score in OOD_SCORES:
        ruled = replace(clf, profile=replace(clf.profile, ood=rule)).classify(images[0][20:], ood_score=score)
        assert [p.pred for p in ruled] == [p.pred for p in plain]
        assert [p.ranking for p in ruled] == [p.ranking for p in plain]
        for p in ruled:
            assert p.abstained == (p.ood[score] < rule.threshold(score))
            rec = ok_record(Item("x.png"), p, clf.class_names, {}, 3)
            assert (rec["pred"], rec["status"]) == ((None, "abstained") if p.abstained else (p.pred, "ok"))
        if score == "likelihood":
            assert all(p.abstained for p in ruled[-8:])      # every noise image is none of these


def test_fit_thresholds_and_auroc():
    oods = [{s: float(v) for s in OOD_SCORES} for v in range(100)]
    t = fit_thresholds(oods, 0.95)
    assert t["likelihood"] == 5.0 and sum(o["likelihood"] >= 5.0 for o in oods) == 95
    assert auroc([2, 3], [0, 1]) == 1.0 and auroc([0, 1], [2, 3]) == 0.0 and auroc([1, 2], [1, 0]) == 0.875
    with pytest.raises(AvarcError, match="coverage"):
        fit_thresholds(oods, 0)


def test_ood_rule_round_trips_and_bad_rule_is_one_line(tmp_path):
    rule = OodRule("ratio", 0.95, (("likelihood", -2.5), ("ratio", 1.25), ("posterior", 0.99)))
    path = write_profile(replace(load_profile("digits"), ood=rule), tmp_path / "o.yaml")
    assert load_profile(path).ood == rule
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("score: ratio", "score: nonsense"))
    with pytest.raises(AvarcError, match=r"bad\.yaml: ood:"):
        load_profile(bad)


def test_cli_calibrate_then_classify_abstains_on_noise(tmp_path, monkeypatch, capsys):
    digits = save_digits(tmp_path / "digits", 1438, 1478)
    (tmp_path / "noise").mkdir()
    for i, im in enumerate(noise(6)):
        im.save(tmp_path / "noise" / f"n{i}.png")
    prof = tmp_path / "ood.yaml"
    code, out, err = run_cli(monkeypatch, capsys, "calibrate-ood", digits, "--coverage", "0.95", "-o", prof,
                           "--device", "cpu")
    assert code == 0, err
    assert load_profile(prof).ood.score == "likelihood"
    code, out, err = run_cli(monkeypatch, capsys, "classify", tmp_path / "noise", "-p", prof, "-o",
                             tmp_path / "r.jsonl",
                           "--csv", tmp_path / "s.csv", "--device", "cpu")
    assert code == 0, err
    recs = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["status"] for r in recs] == ["abstained"] * 6 and all(r["pred"] is None for r in recs)
    assert all(r["ood"]["likelihood"] < r["ood"]["threshold"] for r in recs)
    row = next(csv.DictReader(open(tmp_path / "s.csv")))
    assert row["abstained"] == "6" and row["skipped"] == "0"
    code, out, err = run_cli(monkeypatch, capsys, "classify", digits, "--ood-score", "nonsense")
    assert code == 2 and "--ood-score" in err and "'nonsense' is not one of" in err and "Traceback" not in err
