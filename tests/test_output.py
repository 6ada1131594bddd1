"""avarc_cli/output.py and --help on an 80-column terminal: what a person reads must fit and not break mid-word."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from avarc_cli import output
from core import AvarcError

REPO = Path(__file__).resolve().parents[1]
BENCH_COLUMNS = ["profile", "dtype", "s/image (min–max)", "images/s", "time % enc | stages", "GFLOPs paper",
                 "GFLOPs executed", "TFLOP/s", "% of peak", "peak MB", "agree fp32"]


@pytest.fixture
def narrow(monkeypatch):
    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    monkeypatch.setattr(output, "console", console)
    return console


def test_wide_table_is_turned_and_keeps_words_and_numbers_whole(narrow):
    rows = [("a-varc-plus", "fp32", "63.2 (62.9–64.0)", 0.0158, "3% | 40 / 57", 4645.8, 2523.1, 0.0799, 41.2, 812.5, None),
            ("a-varc-plus", "bf16", "21.0 (20.8–21.3)", 0.0476, "9% | 38 / 53", 4645.8, 2523.1, 0.2403, 30.1, 640.0, 1.0)]
    output.table("bench", BENCH_COLUMNS, rows)
    text = narrow.export_text()
    assert max(map(len, text.splitlines())) <= 80
    for word in ("GFLOPs executed", "agree fp32", "4,645.8", "63.2 (62.9–64.0)"):
        assert word in text, text


def test_numbers_right_names_left(narrow):
    output.table("t", ["image", "prediction", "posterior", "output"], [("a/1438.png", "3", "0.998", "1438"),
                                                                       ("b/7.png", "seven", "0.500", "7")])
    lines = narrow.export_text().splitlines()
    row = next(line for line in lines if "1438.png" in line)
    cells = [c for c in row.split("│")[1:-1]]
    assert cells[1].startswith(" 3 ") and cells[2].endswith("0.998 ") and cells[3].startswith(" 1438")


def test_errors_name_their_flag():
    assert output.message(AvarcError("11 scales asked for", option="scales")) == "--scales: 11 scales asked for"
    assert output.message(AvarcError("same class", option="b")).startswith("--vs: ")
    assert output.message(AvarcError("plain")) == "plain"


@pytest.mark.parametrize("command", ["classify", "explain", "add-class", "download", "bench"])
def test_help_wraps_at_the_terminal_width(command):
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    r = subprocess.run([sys.executable, "-m", "avarc_cli", command, "--help"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    prose = [line.strip() for line in lines if line.strip() and not line.strip().startswith(("avarc", "torchrun", "HF_", "--", "╭", "│", "╰"))]
    # paragraphs are re-flowed, not broken where the source broke them: no prose line ends far short of the width
    # unless it ends a sentence or a paragraph
    assert all(len(p) > 50 or p.endswith((".", ":")) or lines[lines.index(next(l for l in lines if l.strip() == p)) + 1].strip() == ""
               for p in prose), prose
    if command in ("classify", "explain", "add-class"):
        assert "<auto|fp32|bf16|fp16>" in r.stdout.replace(" ", "").replace("│", "") or "auto|fp32|bf16|fp16" in r.stdout
