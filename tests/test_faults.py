"""Fault suite: real ``avarc classify`` processes on 300 digit images, killed with -9 at random points, interrupted
with Ctrl-C / SIGTERM, raced by a second writer, and pointed at files that must not change."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
IMAGES = 300


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "avarc", *map(str, args)]


def run(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def wait_for(proc: subprocess.Popen, out: Path, n: int) -> None:
    """Until the run has written ``n`` records (or ended)."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and lines(out) < n and time.monotonic() < deadline:
        time.sleep(0.01)


def records(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "torn last line"
    return [json.loads(line) for line in data.splitlines()]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """300 sklearn digits as PNGs in class folders (labelled)."""
    from PIL import Image

    from scripts.digits import load_digits

    data = load_digits("all")
    root = tmp_path_factory.mktemp("faults") / "d300"
    for image, label, index in list(zip(data.images, data.labels, data.indices))[:IMAGES]:
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(root / str(label) / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def baseline(digits) -> Path:
    """An uninterrupted run; while it holds its file, a second writer is refused and the file does not change."""
    out = digits.parent / "baseline.jsonl"
    proc = subprocess.Popen(cli("classify", digits, "--out", out), cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(proc, out, 1)
    proc.send_signal(signal.SIGSTOP)                     # frozen with the lock held: nothing else writes the file
    stat = Path(f"/proc/{proc.pid}/stat")                # the stop is asynchronous: wait until it has landed
    while stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] != "T":
        time.sleep(0.01)
    try:
        before = sha(out)
        second = run("classify", digits, "--out", out, "--resume")
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"{out}: another avarc run is writing this file" in second.stderr.replace("\n", "")
        assert sha(out) == before
    finally:
        proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    recs = records(out)
    assert len(recs) == IMAGES and len({r["file"] for r in recs}) == IMAGES
    return out


def by_file(path: Path) -> dict[str, dict]:
    recs = records(path)
    keyed = {r["file"]: r for r in recs}
    assert len(keyed) == len(recs), "an image was classified twice"
    return keyed


def assert_same_results(path: Path, baseline: Path) -> None:
    got, want = by_file(path), by_file(baseline)
    assert got.keys() == want.keys() and len(got) == IMAGES
    for key, w in want.items():
        g = got[key]
        assert (g["status"], g["pred"], g["label"]) == (w["status"], w["pred"], w["label"]), key
        assert [t["class"] for t in g["topk"]] == [t["class"] for t in w["topk"]], key
        for a, b in zip(g["stages"], w["stages"]):
            assert a["candidates"] == b["candidates"]
            assert max(abs(x - y) for x, y in zip(a["scores"], b["scores"])) <= 2e-4, key   # 4-decimal rounding


def test_kill_9_ctrl_c_and_sigterm_at_random_points_then_resume_give_the_uninterrupted_results(digits, baseline):
    out = digits.parent / "killed.jsonl"
    rng = random.Random(12)
    codes, resume_line = [], None
    for sig in (signal.SIGKILL, signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        before = lines(out)
        args = ["classify", digits, "--out", out] + (["--resume"] if out.exists() else [])
        proc = subprocess.Popen(cli(*args), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        wait_for(proc, out, before + rng.randint(1, 40))
        time.sleep(rng.uniform(0, 0.15))                 # between writes or in the middle of one
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        codes.append(proc.returncode)
        if sig != signal.SIGKILL:                        # Ctrl-C / SIGTERM: one line, what is safe, how to go on
            assert "Traceback" not in err
            said = [x for x in err.splitlines() if "interrupted:" in x]
            safe = len(records(out))
            assert len(said) == 1 and (f"interrupted: {safe} records safe in {out}; "
                                       "continue with: avarc classify") in said[0]
            resume_line = said[0]
    assert codes == [-9, 130, 143, -9], codes           # every run was really interrupted
    assert lines(out) < IMAGES
    command = shlex.split(resume_line.split("continue with: ", 1)[1])
    assert command[:2] == ["avarc", "classify"] and command.count("--resume") == 1
    done = run(*command[1:])                            # the printed command, as a user would paste it
    assert done.returncode == 0, done.stderr
    assert "images already done" in done.stderr
    assert_same_results(out, baseline)


def test_ctrl_c_in_explain_says_what_was_written_and_exits_130(digits, tmp_path):
    why = tmp_path / "why"
    proc = subprocess.Popen(cli("explain", digits, "--out", why), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and len(list(why.glob("*.npz"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    said = [x for x in err.splitlines() if "interrupted" in x]
    assert proc.returncode == 130 and len(said) == 1 and "Traceback" not in err and "Aborted" not in err
    written = int(said[0].removeprefix("interrupted: ").split(" ", 1)[0])
    assert said[0] == f"interrupted: {written} explanations written to {why}" and 1 <= written < IMAGES
    assert len(list(why.glob("*.npz"))) in (written, written + 1)       # + 1: Ctrl-C right after a file was saved


def test_data_loss_cases_leave_every_file_byte_identical(digits, baseline, tmp_path, monkeypatch, capsys):
    """The refusals run the real CLI entry point in this process (same code path, no 3 s start-up per case)."""
    def cli_here(*args) -> tuple[int, str]:
        code, _, err = run_cli(monkeypatch, capsys, *args)
        return code, err.replace("\n", "")

    few = tmp_path / "few"
    for cls in ("0", "3", "8"):
        (few / cls).mkdir(parents=True)
        for f in sorted((digits / cls).iterdir())[:2]:
            (few / cls / f.name).write_bytes(f.read_bytes())
    original = sha(baseline)

    # 1. --resume on a file of another run (another seed): refused, naming the file, what differs and the fix
    code, err = cli_here("classify", digits, "--out", baseline, "--resume", "--seed", "1")
    assert code == 2 and sha(baseline) == original
    assert f"{baseline}: holds records of another run (seed 0 vs 1 now)" in err and "error: --out: " in err

    # 2. --resume on a file that is not a results file
    readme = tmp_path / "README.jsonl"
    readme.write_bytes((REPO / "README.md").read_bytes()[:2000])
    code, err = cli_here("classify", few, "--out", readme, "--resume")
    assert code == 2 and "not a results file" in err and readme.read_bytes() == (REPO / "README.md").read_bytes()[:2000]

    # 4. the same images by relative and by absolute path: classified once; 5. nothing to do → no CSV row
    out, table = tmp_path / "rel.jsonl", tmp_path / "runs.csv"
    monkeypatch.chdir(tmp_path)
    assert cli_here("classify", "few", "--out", "rel.jsonl", "--csv", "runs.csv")[0] == 0
    monkeypatch.chdir(REPO)
    snapshot = (sha(out), sha(table))
    code, err = cli_here("classify", few.resolve(), "--out", out, "--csv", table, "--resume")
    assert code == 0 and "6 images already done, 0 to go" in err and "no row added" in err
    assert (sha(out), sha(table)) == snapshot

    # 5. a profile with another number of stages on the same CSV: one more row under the same header, none lost
    one_stage = tmp_path / "one.yaml"
    one_stage.write_text("stages:\n  - {scales: all, samples: 1, keep: 1}\n")
    logged = table.read_bytes()
    code, err = cli_here("classify", few, "--profile", one_stage, "--csv", table)
    assert code == 0 and table.read_bytes().startswith(logged) and table.read_text().count("\n") == 3, err

    # 6. add-class never writes over the base model, refuses an existing --out without --force
    model = tmp_path / "model"
    model.mkdir()
    for name in ("var.pth", "vae.pth", "meta.json"):
        (model / name).write_bytes((REPO / "core" / "weights" / "digits" / name).read_bytes())
    base = {p.name: sha(p) for p in model.iterdir()}
    for target in (model / "var.pth", model / "vae.pth", model / "meta.json"):
        code, err = cli_here("add-class", "eight", few / "8", "--model", model, "--out", target, "--force",
                             "--steps", 1)
        assert code == 2 and "is an input of this run" in err
    ext = tmp_path / "eight.ext.pt"
    ext.write_bytes(b"an extension I want to keep")
    code, err = cli_here("add-class", "eight", few / "8", "--model", model, "--out", ext, "--steps", 1)
    assert code == 2 and "already exists; pass --force" in err
    assert {p.name: sha(p) for p in model.iterdir()} == base and ext.read_bytes() == b"an extension I want to keep"

    # 6. explain refuses to overwrite its outputs without --force
    why = tmp_path / "why"
    assert cli_here("explain", few / "3", "--out", why)[0] == 0
    made = {p.name: sha(p) for p in why.iterdir()}
    assert len(made) == 4
    code, err = cli_here("explain", few / "3", "--out", why)
    assert code == 2 and "4 outputs already exist" in err and "--force" in err
    assert {p.name: sha(p) for p in why.iterdir()} == made
    assert cli_here("explain", few / "3", "--out", why, "--force")[0] == 0
    assert sorted(p.name for p in why.iterdir()) == sorted(made)          # replaced in place, no temporary left
