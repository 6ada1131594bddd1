"""Compute in the record (core/engine/flops.py ``image_gflops``, core/engine/scoring.py ``Scorer.executed``): a
run's records' ``gflops.executed`` summed equals what ``avarc bench`` measures on the same images and profile, early
exits included; with a no-exit profile it equals ``bench --flops-only``; report shows the distribution."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "examples" / "digits"
# no smoothing samples (the bench seeds its noise by image number, classify by file: clean tokens are the same)
EXITS = ("stages:\n  - {scales: 3, keep: 4, exit_margin: 3}\n  - {scales: all, keep: 2, exit_margin: 1}\n"
         "  - {scales: all}\n")
NO_EXIT = "stages:\n  - {scales: 2, keep: 5}\n  - {scales: 3, keep: 2}\n  - {scales: all}\n"


def _run(monkeypatch, capsys, tmp_path: Path, name: str, profile: str) -> tuple[list[dict], Path]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(profile)
    out = tmp_path / f"{name}.jsonl"
    code, stdout, err = run_cli(monkeypatch, capsys, "classify", DIGITS, "--device", "cpu", "--dtype", "fp32",
                              "--profile", path, "--out", out)
    assert code == 0, err
    assert "GFLOPs/image executed (mean)" in stdout
    return [json.loads(line) for line in out.read_text().splitlines()], path


def _bench(monkeypatch, capsys, profile: Path, *extra) -> dict:
    code, stdout, err = run_cli(monkeypatch, capsys, "bench", "-m", "digits", "-p", profile, "--json", *extra)
    assert code == 0, err
    return json.loads(stdout)["results"][0]


def test_records_sum_to_what_bench_measures_exits_included(tmp_path, monkeypatch, capsys):
    recs, profile = _run(monkeypatch, capsys, tmp_path, "exits", EXITS)
    assert len(recs) == 20 and 0 < sum(r["exited_after"] is not None for r in recs)
    mean = sum(r["gflops"]["executed"] for r in recs) / len(recs)
    bench = _bench(monkeypatch, capsys, profile, "--data", str(DIGITS), "--images", "20", "--warmup", "0",
                   "--repeat", "1", "--dtype", "fp32", "--device", "cpu")
    assert mean == pytest.approx(bench["gflops_executed"], rel=1e-3)
    assert all(r["gflops"]["executed"] <= r["gflops"]["paper"] for r in recs)
    assert len({r["gflops"]["executed"] for r in recs}) > 1           # exits make images cost different amounts


def test_without_exits_every_record_costs_the_flops_only_figure(tmp_path, monkeypatch, capsys):
    recs, profile = _run(monkeypatch, capsys, tmp_path, "noexit", NO_EXIT)
    counted = _bench(monkeypatch, capsys, profile, "--flops-only", "--num-classes", "10")
    for r in recs:
        assert r["gflops"]["executed"] == pytest.approx(counted["gflops_executed"], rel=1e-9)
        assert r["gflops"]["paper"] == pytest.approx(counted["gflops_per_image"], rel=1e-9)
    assert counted["gflops_executed"] < counted["gflops_per_image"]


def test_report_shows_the_per_image_compute_distribution(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    recs, _ = _run(monkeypatch, capsys, tmp_path, "exits", EXITS)
    page = tmp_path / "r.html"
    code, _, err = run_cli(monkeypatch, capsys, "report", tmp_path / "exits.jsonl", "--out", page)
    assert code == 0, err
    text = page.read_text()
    gf = sorted(r["gflops"]["executed"] for r in recs)
    assert "GFLOPs/image executed (min / median / p90 / max)" in text
    assert f"{gf[0]:.4g} / " in text and f" / {gf[-1]:.4g}" in text
