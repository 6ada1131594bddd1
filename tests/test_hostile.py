"""Hostile round three: hand-edited and damaged files, hostile names, full disks, races and signals. Every case ends
in one line (or a skipped record), never a traceback, and every results file stays strict JSON."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from avarc import AvarcError
from avarc.io.records import record_line, weights_identity
from avarc.io.results import lock_results
from avarc.tasks.incremental import load_extension
from tests.conftest import cli_run

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONPATH": str(REPO)}
LATIN1 = os.fsdecode(b"caf\xe9")          # a file name that is not UTF-8: its byte surrogate-escaped


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "avarc", *map(str, args)]


def run(*args) -> subprocess.CompletedProcess:
    """The command in this process (tests.conftest.cli_run), printing 200 columns wide as the subprocesses did
    (COLUMNS=200): a table cell never wraps a name a test looks for."""
    from avarc.cli import output

    with pytest.MonkeyPatch.context() as wide:
        for console in (output.console, output.err_console):
            wide.setattr(console, "width", 200)
        proc = cli_run(*args)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def spawn(*args, timeout=300) -> subprocess.CompletedProcess:
    """The command as its own process: where another process holds the lock, or a hang must end at a timeout."""
    proc = subprocess.run(cli(*args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout,
                          errors="surrogateescape")
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def one_line(proc_or_err, needle: str, code: int = 2) -> str:
    err = proc_or_err if isinstance(proc_or_err, str) else proc_or_err.stderr
    if not isinstance(proc_or_err, str):
        assert proc_or_err.returncode == code, err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    return lines[0]


def strict_records(path: Path) -> list[dict]:
    """Every line strict JSON (no NaN/Infinity), the file ending in a newline."""
    data = path.read_bytes()
    assert data.endswith(b"\n")
    data.decode("utf-8")
    return [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in {path}")) for line in data.splitlines()]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """16 digits (8 zeros, 8 ones) in class folders, one of them under a name that is not UTF-8."""
    from PIL import Image

    from scripts.digits import load_digits

    data = load_digits("all")
    root = tmp_path_factory.mktemp("hostile") / "d"
    counts = {0: 0, 1: 0}
    for image, label in zip(data.images, data.labels):
        if label in counts and counts[label] < 8:
            (root / str(label)).mkdir(parents=True, exist_ok=True)
            name = f"{LATIN1}.png" if counts[label] == 0 and label == 1 else f"{counts[label]}.png"
            Image.fromarray(image, mode="L").save(root / str(label) / name)
            counts[label] += 1
    return root


@pytest.fixture(scope="module")
def results(digits) -> Path:
    out = digits.parent / "r.jsonl"
    proc = run("classify", digits, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


def test_non_utf8_name_is_a_lossless_record_and_resume_and_report_read_it(digits, results, tmp_path):
    recs = strict_records(results)
    assert len(recs) == 16 and all(r["status"] == "ok" for r in recs)
    odd = [r for r in recs if LATIN1 in r["path"]]
    assert len(odd) == 1 and os.fsencode(odd[0]["path"]).endswith(b"/caf\xe9.png") and Path(odd[0]["path"]).is_file()
    again = run("classify", digits, "--out", results, "--resume")
    assert again.returncode == 0 and "16 images already done, 0 to go" in again.stderr, again.stderr
    wrong = tmp_path / "w.jsonl"                            # the odd image made a mistake, so the report shows it
    wrong.write_bytes(b"".join(record_line({**r, "label": 0, "label_name": "0", "label_rank": 2} if r in odd else r)
                               for r in recs))
    page = run("report", wrong)
    assert page.returncode == 0, page.stderr
    assert "caf\ufffd.png" in wrong.with_suffix(".html").read_text(encoding="utf-8")
    why = run("explain", digits / "1", "--out", tmp_path / "why")
    assert why.returncode == 0 and (tmp_path / "why" / "caf.png").is_file(), why.stderr


def test_whole_last_record_without_newline_is_kept_on_resume(digits, results, tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_bytes(results.read_bytes()[:-1])              # the newline of a complete last record missing
    proc = run("classify", digits, "--out", out, "--resume")
    assert proc.returncode == 0 and "16 images already done, 0 to go" in proc.stderr and "torn" not in proc.stderr
    assert len(strict_records(out)) == 16


def test_a_symlink_to_the_results_file_takes_the_same_lock(digits, results, tmp_path):
    out = tmp_path / "r.jsonl"
    shutil.copy(results, out)
    (tmp_path / "link.jsonl").symlink_to(out)
    lock = lock_results(out)                                # this process is the first writer
    try:
        one_line(spawn("classify", digits, "--out", tmp_path / "link.jsonl", "--resume"), "another avarc run")
    finally:
        lock.release()


@pytest.mark.parametrize("change, named", [(["--temperature", "2"], "temperature 1.0 vs 2.0"),
                                           (["--topk", "3"], "topk 5 vs 3"),
                                           (["--labels", "none"], "labels 'auto' vs 'none'")])
def test_resume_refuses_another_run_naming_the_difference(digits, results, tmp_path, change, named):
    out = tmp_path / "r.jsonl"
    shutil.copy(results, out)
    before = out.read_bytes()
    one_line(run("classify", digits, "--out", out, "--resume", *change), named)
    assert out.read_bytes() == before


def test_weights_identity_is_the_content_not_the_size(tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    a.write_bytes(b"\0" * 64)
    b.write_bytes(b"\0" * 63 + b"\1")
    ids = {weights_identity(p) for p in (a, b)}
    assert len(ids) == 2 and all(i.startswith("sha256:") for i in ids)


def test_records_name_the_model_and_report_shows_gflops_without_m(results, tmp_path):
    run_key = strict_records(results)[0]["run"]
    assert run_key["model"] == "digits" and run_key["weights"].startswith("sha256:")
    assert {"dtype", "temperature", "topk", "labels"} <= run_key.keys() and run_key["threads"] == 1
    proc = run("report", results, "--out", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert proc.returncode == 0 and "GFLOPs/image" in page and '<tr class=""><td>threads</td><td>1</td></tr>' in page


def test_report_refuses_to_write_over_its_input_even_with_force(results, tmp_path):
    html = tmp_path / "run.html"
    shutil.copy(results, html)
    before = html.read_bytes()
    one_line(run("report", html, "--force"), "is an input of this run")
    one_line(run("report", html, "--out", html, "--force"), "is an input of this run")
    assert html.read_bytes() == before


def test_two_add_class_runs_to_one_out_one_is_refused(digits, tmp_path):
    out = tmp_path / "ext.pt"
    procs = [subprocess.Popen(cli("add-class", name, digits / "1", "--steps", 2, "--holdout", 0, "--out", out),
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("alpha", "beta")]
    done = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in done) == [0, 2], done
    refused = [err for code, err in done if code == 2]
    assert len(refused) == 1 and "Traceback" not in refused[0]     # the loser came after the winner, or during it
    assert "already exists" in refused[0] or "another avarc run is writing this file" in refused[0], refused[0]
    assert torch.load(out, weights_only=True)["names"] in (["alpha"], ["beta"])


def test_two_explain_runs_to_one_out_never_overwrite_each_other(digits, tmp_path):
    out = tmp_path / "why"
    procs = [subprocess.Popen(cli("explain", digits / "0" / "0.png", "--out", out), cwd=REPO, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in done) == [0, 2], done
    err = next(err for code, err in done if code == 2)       # refused when it finds the files, or the folder locked
    assert "already exist" in err or "another avarc run is writing into this folder" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["0.npz", "0.png"]


@pytest.fixture
def tiny_disk(small_disk):
    """A 64 KiB tmpfs."""
    return small_disk("64k")


def fill(disk: Path) -> Path:
    """Fill the disk to the last byte; the filler is returned (unlink it to free the space)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass
    return filler


def test_full_disk_mid_run_is_one_line_and_resume_finishes(digits, tiny_disk):
    out = tiny_disk / "r.jsonl"
    assert run("classify", digits / "0", "--out", out).returncode == 0
    filler = fill(tiny_disk)
    proc = run("classify", digits, "--out", out, "--resume")
    line = one_line(proc, f"disk full: 8 records safe in {out}; free space and --resume")
    assert len(strict_records(out)) == 8                    # no torn last line
    filler.unlink()
    again = run("classify", digits, "--out", out, "--resume")
    assert again.returncode == 0 and len(strict_records(out)) == 16, line


def test_full_disk_in_explain_leaves_no_half_output(digits, tiny_disk):
    why = tiny_disk / "why"
    why.mkdir()
    fill(tiny_disk)
    one_line(run("explain", digits / "0", "--out", why), "disk full")
    assert not list(why.iterdir())


def test_250_byte_output_names_work(digits, tmp_path):
    out, csv = tmp_path / ("o" * 244 + ".jsonl"), tmp_path / ("c" * 246 + ".csv")
    proc = run("classify", digits / "0", "--out", out, "--csv", csv)
    assert proc.returncode == 0, proc.stderr
    assert len(strict_records(out)) == 8 and csv.read_text().count("\n") == 2


def test_csv_with_a_latin1_byte_late_is_refused_before_the_run(digits, tmp_path):
    csv = tmp_path / "s.csv"
    csv.write_bytes(b"a,b\n" + b"1,2\n" * 2500 + b"caf\xe9,3\n")
    before = csv.read_bytes()
    one_line(run("classify", digits / "0", "--csv", csv, "--out", tmp_path / "r.jsonl"), "s.csv")
    assert csv.read_bytes() == before and not (tmp_path / "r.jsonl").exists()


def test_hostile_text_is_text_in_the_terminal_and_the_plots(digits, results, tmp_path):
    folder = tmp_path / "[draft]"
    shutil.copytree(digits / "1", folder)
    ext = tmp_path / "x.pt"
    proc = run("add-class", "[/x]", folder, "--steps", 2, "--holdout", 0, "--out", ext)
    assert proc.returncode == 0 and "[/x]" in proc.stdout and f"wrote {ext}" in proc.stdout.replace("\n", "")
    proc = run("classify", folder / "0.png" if (folder / "0.png").exists() else next(folder.iterdir()))
    assert proc.returncode == 0 and "[draft]" in proc.stdout.replace("\n", ""), proc.stdout
    recs = strict_records(results)
    for r in recs:                                          # class 0 renamed: in the tick labels and the tables
        r["label_name"] = "US$ 5 % or $ 6" if r["label"] == 0 else r["label_name"]
        r["pred_name"] = "US$ 5 % or $ 6" if r["pred"] == 0 else r["pred_name"]
    edited = tmp_path / "money.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in recs))
    proc = run("report", edited)
    assert proc.returncode == 0 and "US$ 5 % or $ 6" in edited.with_suffix(".html").read_text()


def test_null_is_a_reserved_class_name(digits):
    one_line(run("add-class", "NULL", digits / "1", "--steps", 1), "reserved")


def test_yaml_alias_bomb_is_one_line_at_once(digits, tmp_path):
    bomb = tmp_path / "bomb.yaml"
    rows = ["a: &a [x,x,x,x,x,x,x,x,x]"] + [f"{c}: &{c} [{','.join([f'*{p}'] * 9)}]"
                                          for p, c in zip("abcdefgh", "bcdefghi")] + ["stages: *i"]
    bomb.write_text("\n".join(rows) + "\n")
    start = time.monotonic()
    one_line(run("classify", digits / "0", "-p", bomb), "aliases")
    assert time.monotonic() - start < 60


def test_damaged_extension_files_are_one_line(digits, tmp_path):
    ext = tmp_path / "ok.pt"
    assert run("add-class", "seven", digits / "1", "--steps", 2, "--holdout", 0, "--out", ext).returncode == 0
    good = torch.load(ext, weights_only=True)
    damages = {"no names": {k: v for k, v in good.items() if k != "names"},
               "offset text": {**good, "offset": "3"}, "parents int": {**good, "parents": 5},
               "base_sha256 list": {**good, "base_sha256": [1]},
               "nan rows": {**good, "rows": good["rows"] * float("nan")},
               "names int": {**good, "names": [7]}, "training list": {**good, "training": [1]}}
    for what, doc in damages.items():
        bad = tmp_path / f"{what.replace(' ', '_')}.pt"
        torch.save(doc, bad)
        with pytest.raises(AvarcError, match=f"{bad}: damaged extension file"):
            load_extension(bad)
    one_line(run("classify", digits / "0" / "0.png", "-e", bad), "damaged extension file")


@pytest.mark.parametrize("damage", ["missing key", "wrong type", "brackets", "latin1", "nan"])
def test_damaged_records_are_one_line_in_resume_and_report(digits, results, tmp_path, damage):
    recs = [json.loads(line) for line in results.read_bytes().splitlines()]
    lines = [json.dumps(r).encode() for r in recs]
    if damage == "missing key":
        lines[3] = json.dumps({k: v for k, v in recs[3].items() if k != "stages"}).encode()
    elif damage == "wrong type":
        lines[3] = json.dumps({**recs[3], "posterior": "high"}).encode()
    elif damage == "brackets":
        lines[3] = b"[" * 400_000 + b"]" * 400_000
    elif damage == "latin1":
        lines[3] = lines[3].replace(b'"ok"', b'"\xe9"')
    else:
        lines[3] = lines[3].replace(b'"label": 0', b'"label": NaN')
    out = tmp_path / "r.jsonl"
    out.write_bytes(b"\n".join(lines) + b"\n")
    before = out.read_bytes()
    one_line(run("report", out, "--out", tmp_path / "r.html"), "line 4")
    one_line(run("classify", digits, "--out", out, "--resume"), "line 4")
    assert out.read_bytes() == before


def test_non_finite_training_is_refused_and_records_are_strict_json():
    from avarc.io.records import parse_line

    stage = {"scales": 1, "samples": 1, "keep": 1, "candidates": [1], "scores": [float("nan")]}
    line = record_line({"path": "x.png", "label": None, "label_name": None, "status": "ok", "pred": 1,
                        "pred_name": "1", "label_rank": None, "topk": [], "stages": [stage], "exited_after": None,
                        "posterior": [], "error": None,
                        "run": {"model": "m", "profile": "p", "seed": 0, "fingerprint": "f"}})
    rec = json.loads(line, parse_constant=lambda c: pytest.fail(c))
    assert rec["status"] == "skipped" and "non-finite" in rec["error"] and parse_line(line) is not None


def test_lr_inf_is_refused(digits):
    one_line(run("add-class", "seven", digits / "1", "--steps", 2, "--lr", "inf"), "finite lr")


def test_a_fifo_where_a_mistake_was_does_not_block_report(results, tmp_path):
    recs = [json.loads(line) for line in results.read_bytes().splitlines()]
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    recs[0] = {**recs[0], "path": str(fifo), "file": str(fifo), "label": 1, "label_name": "1", "label_rank": 2}
    out = tmp_path / "r.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in recs))
    proc = spawn("report", out, timeout=120)
    assert proc.returncode == 0 and "image not found" in out.with_suffix(".html").read_text()


def test_tune_says_what_is_safe_on_sigterm(digits, tmp_path):
    out = tmp_path / "t.yaml"
    proc = subprocess.Popen(cli("tune", digits, "--out", out), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not any("scoring" in line for line in err) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)                                    # the scoring pass is done: the search is running
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    reader.join(timeout=10)
    text = "".join(err)
    assert code == 143 and "Traceback" not in text, text
    assert f"interrupted: nothing written ({out} was not written)" in text.replace("\n", "") and not out.exists()


def test_two_processes_appending_summary_rows_lose_none(tmp_path):
    csv, start = tmp_path / "s.csv", time.time() + 8           # both start appending at once, after their imports
    code = ("import sys, time\nfrom avarc.io.summary import append_csv_summary\n"
            f"time.sleep(max(0, {start} - time.time()))\n"
            f"for i in range(100): append_csv_summary({str(csv)!r}, {{'run': sys.argv[1], 'i': i}})")
    procs = [subprocess.Popen([sys.executable, "-c", code, name], cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    rows = csv.read_text().splitlines()
    assert rows[0] == "run,i" and sorted(rows[1:]) == sorted(f"{n},{i}" for n in "ab" for i in range(100))


def test_report_links_each_mistake_to_its_own_explain_panel(digits, tmp_path):
    import base64

    for side, src in (("a", "0.png"), ("b", "1.png")):           # two images named x.png: explain writes x, x-2
        (tmp_path / side / "0").mkdir(parents=True)
        shutil.copy(digits / "0" / src, tmp_path / side / "0" / "x.png")
    out, why = tmp_path / "r.jsonl", tmp_path / "why"
    assert run("classify", tmp_path / "a", tmp_path / "b", "--out", out).returncode == 0
    assert run("explain", tmp_path / "a", tmp_path / "b", "--out", why).returncode == 0
    assert sorted(p.name for p in why.glob("*.png")) == ["x-2.png", "x.png"]
    recs = [{**r, "label": 1, "label_name": "1", "label_rank": 2} for r in strict_records(out)]   # both mistakes
    out.write_bytes(b"".join(map(record_line, recs)))
    assert run("report", out, "--explain", why).returncode == 0
    page = out.with_suffix(".html").read_text()
    assert all(base64.b64encode(p.read_bytes()).decode() in page for p in why.glob("*.png"))
