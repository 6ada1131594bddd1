"""Insertion/deletion AUC: the metric code on a toy case whose AUCs are known, and `avarc explain --metrics` end to
end on bundled digits (the heatmap's ranking beats random on average)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from avarc.tasks.explain_metrics import auc, curve_images, ranking_metrics, region_ids
from tests.conftest import run_cli, save_digits


def test_regions_and_curves():
    assert region_ids(4, 2).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    pixels = np.full((4, 4, 3), 200, np.uint8)
    ins = curve_images(pixels, np.zeros_like(pixels), [3, 0, 1, 2], region_ids(4, 2), "insertion")
    assert len(ins) == 5 and (ins[0] == 0).all() and (ins[-1] == pixels).all()
    assert (ins[1][2:, 2:] == 200).all() and ins[1].sum() == 200 * 4 * 3
    dele = curve_images(pixels, np.zeros_like(pixels), [3, 0, 1, 2], region_ids(4, 2), "deletion")
    assert (dele[0] == pixels).all() and (dele[-1] == 0).all() and (dele[1][2:, 2:] == 0).all()
    assert auc([0, 0.25, 0.5, 0.75, 1]) == pytest.approx(0.5) and auc([1, 1, 1]) == 1.0


def test_toy_case_with_known_auc():
    """Only region 0 holds the evidence: the posterior is the share of its ink present. Ranked first, insertion
    gives 0, 1, 1, 1, 1 (AUC 7/8) and deletion 1, 0, 0, 0, 0 (AUC 1/8); ranked last, the reverse."""
    pixels = np.zeros((4, 4, 3), np.uint8)
    pixels[:2, :2] = 255
    post = lambda ims: ims[:, :2, :2].mean(axis=(1, 2, 3)) / 255       # noqa: E731
    good = ranking_metrics(pixels, np.array([[9.0, 1.0], [2.0, 3.0]]), post)
    assert (good.insertion, good.deletion) == (pytest.approx(0.875), pytest.approx(0.125))
    assert good.curves["insertion"] == [0, 1, 1, 1, 1]
    bad = ranking_metrics(pixels, np.array([[-9.0, 1.0], [2.0, 3.0]]), post)
    assert (bad.insertion, bad.deletion) == (pytest.approx(0.125), pytest.approx(0.875))
    assert 0.125 <= good.random_insertion <= 0.875 and good.random_insertion + good.random_deletion == pytest.approx(1)


def test_cli_explain_metrics_on_digits(tmp_path, monkeypatch, capsys):
    digits = save_digits(tmp_path / "digits", 1438, 1458)
    code, out, err = run_cli(monkeypatch, capsys, "explain", digits, "-o", tmp_path / "ex", "--metrics",
                           "--device", "cpu")
    assert code == 0, err
    doc = json.loads((tmp_path / "ex" / "metrics.json").read_text())
    assert doc["images"] == 20 and len(doc["per_image"]) == 20
    s = doc["summary"]
    assert s["insertion"]["mean"] > s["random_insertion"]["mean"]
    assert s["deletion"]["mean"] < s["random_deletion"]["mean"]
    assert all(len(r["curves"]["insertion"]) == 17 and r["curves"]["deletion"][0] > 0.5 for r in doc["per_image"])
    assert (tmp_path / "ex" / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    code, out, err = run_cli(monkeypatch, capsys, "explain", digits, "-o", tmp_path / "ex", "--metrics")
    assert code == 2 and "--force" in err
