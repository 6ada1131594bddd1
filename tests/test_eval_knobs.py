"""A-VARC eval.py's knobs (issue 33 item 8): ``--per-class N`` takes the first N images of each class in a fixed
order (classify, tune, calibrate-ood, explain; a resumed run takes the same ones), and top-k accuracy for the k of
eval.py that fit the candidates, in the summary, the CSV and the report, counted from the records' label ranks."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "digits"
CPU = ["--device", "cpu", "--dtype", "fp32"]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_per_class_takes_the_first_images_of_each_class(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.jsonl"
    code, _, err = run_cli(monkeypatch, capsys, "classify", EXAMPLES, "--per-class", "1", "-o", out, *CPU)
    assert code == 0, err
    first = [min((EXAMPLES / str(d)).iterdir()) for d in range(10)]
    assert [Path(r["path"]) for r in records(out)] == first
    code, _, err = run_cli(monkeypatch, capsys, "classify", EXAMPLES, "--per-class", "2", "-o", out, "--resume", *CPU)
    assert code == 0, err
    assert sorted(Path(r["path"]) for r in records(out)) == sorted(EXAMPLES.glob("*/*.png"))     # the other 10 added
    code, _, err = run_cli(monkeypatch, capsys, "classify", EXAMPLES / "3", "--per-class", "1")
    assert code == 2 and "--per-class" in err and "labelled inputs" in err and err.count("\n") == 1


def test_per_class_in_explain_and_calibrate_ood(tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "explain", EXAMPLES, "--per-class", "1", "--out", tmp_path / "why",
                             *CPU)
    assert code == 0, err
    assert len(list((tmp_path / "why").glob("*.png"))) == 10
    code, out, err = run_cli(monkeypatch, capsys, "calibrate-ood", EXAMPLES, "--per-class", "1",
                             "-o", tmp_path / "ood.yaml", *CPU)
    assert code == 0, err
    assert "10 images" in out


def test_per_class_in_tune(tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "tune", EXAMPLES, "--per-class", "2", "--budget", "0.9",
                             "--out", tmp_path / "t.yaml", "--max-samples", "1", "--stages", "1", *CPU)
    assert code == 0, err
    assert "10 / 10" in " ".join(out.split())                # 20 images: half chosen on, half held out


def test_top_k_accuracy_in_summary_csv_and_report(tmp_path, monkeypatch, capsys):
    out, table = tmp_path / "r.jsonl", tmp_path / "runs.csv"
    code, stdout, err = run_cli(monkeypatch, capsys, "classify", EXAMPLES, "-p", "digits-plus", "-o", out,
                                "--csv", table, *CPU)
    assert code == 0, err
    ranks = [r["label_rank"] for r in records(out)]
    want = {k: sum(r is not None and r <= k for r in ranks) / len(ranks) for k in (1, 3, 5)}
    for k, acc in want.items():
        assert f"top-{k}" in stdout and f"{100 * acc:.2f}%" in stdout
    assert "top-10" not in stdout                                   # 10 candidates: top-10 is always 100%
    row = next(csv.DictReader(table.open()))
    assert [float(row[f"top{k}"]) for k in (1, 3, 5)] == [want[1], want[3], want[5]]
    assert row["top10"] == row["top100"] == ""
    pytest.importorskip("matplotlib")
    code, _, err = run_cli(monkeypatch, capsys, "report", out, "-o", tmp_path / "r.html")
    assert code == 0, err
    page = (tmp_path / "r.html").read_text()
    assert f"<td>top-3</td><td>{want[3]:.2%}</td>" in page and "<td>top-10</td>" not in page
