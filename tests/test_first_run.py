"""A new user's first commands (issue 33 items 4, 5): which model ran is said, every "(README, …)" reference names a
real heading, mistyped names get a "did you mean", a missing input fails before any model loads, offline the error
names the model asked for and the download to run, ``-o -`` is JSON lines on stdout, ``classify -o`` says where it
wrote and shows small runs' predictions, and no lock file is left behind."""
from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import pytest
from filelock import Timeout

from avarc.io.files import file_lock
from tests.conftest import cli_run, run_cli, save_digits

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "digits"
IMAGE = EXAMPLES / "3" / "1438.png"
COMMANDS = ("classify", "explain", "calibrate-ood", "add-class", "download", "bench", "tune", "report")
REFERENCE = re.compile(r"\(README, ([^)]*)\)")


def headings() -> set[str]:
    return {line.lstrip("#").strip() for line in (REPO / "README.md").read_text().splitlines()
            if line.startswith("#")}


def test_every_readme_reference_names_a_real_heading(monkeypatch, capsys):
    found = []
    for command in COMMANDS:
        code, out, _ = run_cli(monkeypatch, capsys, command, "--help")
        assert code == 0
        found += REFERENCE.findall(" ".join(out.split()))
    for source in [*(REPO / "avarc_cli").rglob("*.py"), *(REPO / "core").rglob("*.py")]:
        found += REFERENCE.findall(" ".join(source.read_text().split()))
    assert len(found) >= 8
    assert not set(found) - headings(), sorted(set(found) - headings())


def test_the_demo_model_is_named_when_no_model_is_given(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "classify", IMAGE, "--device", "cpu")
    assert code == 0, err
    assert err.count("bundled demo model digits") == 1 and "-m NAME" in err
    assert "avarc classify · model digits · profile digits" in out
    code, out, err = run_cli(monkeypatch, capsys, "classify", IMAGE, "-m", "digits", "--device", "cpu")
    assert code == 0 and "bundled demo model" not in err


@pytest.mark.parametrize("args, says", [
    (["-m", "digit"], "(did you mean 'digits'?)"),
    (["-p", "digit"], "(did you mean 'digits'?)"),
    (["-p", "tuned"], "(did you mean the file 'tuned.yaml'?)"),
    (["--dataset", "imagenet-v3"], "(did you mean 'imagenet-v2'?)"),
])
def test_mistyped_names_get_a_did_you_mean(args, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tuned.yaml").write_text("stages:\n  - {scales: all, samples: 1, keep: 1}\n")
    code, _, err = run_cli(monkeypatch, capsys, "classify", IMAGE, *args)
    assert code == 2 and says in err and err.count("\n") == 1, err


@pytest.mark.parametrize("command", ["classify", "explain", "calibrate-ood", "tune"])
def test_a_missing_input_fails_before_any_model_loads(command, tmp_path, monkeypatch, capsys):
    import avarc.classifier

    def no_model(*a, **kw):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(avarc.classifier, "resolve_model", no_model)
    code, _, err = run_cli(monkeypatch, capsys, command, tmp_path / "nope", "-o", tmp_path / "out")
    assert code == 2 and f"{tmp_path / 'nope'}: no such file or folder" in err, err


def test_offline_the_error_names_the_model_and_its_download(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, _, err = run_cli(monkeypatch, capsys, "classify", IMAGE, "-m", "d16", "--model-dir", tmp_path)
    assert code == 2 and err.count("\n") == 1, err
    assert "model 'd16' is not on this machine" in err and f"run `avarc download d16 --dir {tmp_path}`" in err


def test_out_dash_writes_json_lines_to_stdout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, "classify", EXAMPLES / "3", "--device", "cpu", "-o", "-")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [Path(r["path"]).name for r in records] == ["1438.png", "1460.png"]
    assert [r["pred_name"] for r in records] == ["3", "3"]
    assert "wrote 2 records to stdout" in err and "avarc classify · model digits" in err
    assert list(tmp_path.iterdir()) == []                                       # no file named "-", no lock
    code, _, err = run_cli(monkeypatch, capsys, "classify", IMAGE, "-o", "-", "--resume")
    assert code == 2 and "--resume" in err


def test_classify_out_says_where_it_wrote_and_shows_small_runs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "one.jsonl"
    # a path as the user typed it (relative), so the table's image cell does not fold however deep the checkout is
    ran = cli_run("classify", IMAGE.relative_to(REPO), "--device", "cpu", "-o", out, cwd=REPO)
    code, stdout, err = ran.returncode, ran.stdout, ran.stderr
    assert code == 0, err
    assert f"wrote 1 records to {out}" in " ".join(stdout.split()) and "3/1438.png" in stdout and "prediction" in stdout
    many = save_digits(tmp_path / "many", 0, 25)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(sorted(many.rglob("*.png"))):
        shutil.copy(f, flat / f"{i:02d}.png")
    code, stdout, err = run_cli(monkeypatch, capsys, "classify", flat, "--device", "cpu", "-o", tmp_path / "m.jsonl")
    assert code == 0, err
    assert "19.png" in stdout and "20.png" not in stdout
    assert f"… 5 more (all in {tmp_path / 'm.jsonl'})" in " ".join(stdout.split())


def test_no_lock_file_is_left_behind(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "classify", EXAMPLES / "3", "--device", "cpu",
                           "-o", tmp_path / "r.jsonl", "--csv", tmp_path / "s.csv")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl", "s.csv"]


def test_a_removed_lock_file_still_excludes(tmp_path):
    """The holder removes the lock file while it holds it; a waiter then takes a fresh one, and a third process is
    refused while that waiter holds it."""
    target = tmp_path / "r.jsonl"
    first = file_lock(target).acquire(timeout=0)
    with pytest.raises(Timeout):
        file_lock(target).acquire(timeout=0)
    got = []
    waiter = threading.Thread(target=lambda: got.append(file_lock(target).acquire(timeout=10)))
    waiter.start()
    first.release()
    waiter.join()
    assert got and got[0].lock_file.exists()
    with pytest.raises(Timeout):
        file_lock(target).acquire(timeout=0)
    got[0].release()
    assert list(tmp_path.iterdir()) == []


def test_bench_tables_fit_80_columns(monkeypatch, capsys):
    from rich.console import Console

    from avarc.cli import output

    monkeypatch.setattr(output, "console", Console(width=80))
    code, out, err = run_cli(monkeypatch, capsys, "bench", "-m", "digits", "-p", "digits-plus", "-p", "digits",
                             "--images", "2", "--dtype", "fp32", "--dtype", "bf16")
    assert code == 0, err
    assert "Work per image" in out and "digits-p" in out
    assert max(map(len, out.splitlines())) <= 80, out
