"""avarc_cli/output.py and --help on an 80-column terminal: what a person reads must fit and not break mid-word."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from avarc import AvarcError
from avarc.cli import output

REPO = Path(__file__).resolve().parents[1]
BENCH_COLUMNS = ["profile", "dtype", "s/image (min–max)", "images/s", "time % enc | stages", "GFLOPs paper",
                 "GFLOPs executed", "TFLOP/s", "% of peak", "peak MB", "agree fp32"]


@pytest.fixture
def narrow(monkeypatch):
    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    monkeypatch.setattr(output, "console", console)
    return console


def test_wide_table_is_turned_and_keeps_words_and_numbers_whole(narrow):
    rows = [("a-varc-plus", "fp32", "63.2 (62.9–64.0)", 0.0158, "3% | 40 / 57", 4645.8, 2523.1, 0.0799, 41.2, 812.5,
             None),
            ("a-varc-plus", "bf16", "21.0 (20.8–21.3)", 0.0476, "9% | 38 / 53", 4645.8, 2523.1, 0.2403, 30.1, 640.0,
             1.0)]
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


COMMANDS = ["classify", "explain", "add-class", "download", "bench", "tune", "calibrate-ood", "report", "generate"]


def _help(*args: str) -> str:
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    r = subprocess.run([sys.executable, "-m", "avarc", *args, "--help"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_reads_at_80_columns(command):
    """At most 60 lines of at most 80 characters; every word of every help text and of the description appears
    whole (a word broken across lines would not); no type column (``<bool>``, ``<str>``)."""
    import typer.main

    from avarc.cli.app import app

    group = typer.main.get_command(app)
    cmd = group if command is None else group.commands[command]
    text = _help(*([command] if command else []))
    lines = text.splitlines()
    assert len(lines) <= 60 and max(len(line) for line in lines) <= 80, (len(lines), text)
    assert "<bool>" not in text and "<str>" not in text and "<int>" not in text
    words = set(text.split())
    sources = [cmd.help or "", *(p.help or "" for p in cmd.params if getattr(p, "help", None))]
    if command is None:
        sources += [c.short_help for c in group.commands.values()]
    missing = [w for src in sources for w in src.replace("\b", " ").split() if w not in words]
    assert not missing, missing
    if command in ("classify", "explain", "add-class", "tune"):
        assert "auto|fp32|bf16|fp16" in text


def test_help_and_version_answer_before_torch_loads():
    """Arguments are parsed before any model code imports torch (so --help and --version answer at once)."""
    probe = ("import sys\nfrom avarc_cli.app import app\n"
             "for args in (['--version'], ['classify', '--help'], ['bench', '--help']):\n"
             "    try:\n        app(args, standalone_mode=False)\n    except SystemExit:\n        pass\n"
             "print('torch loaded' if 'torch' in sys.modules else 'no torch')")
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "no torch", r.stdout
