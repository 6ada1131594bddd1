"""Hostile round four, the rest (issue 36): report and add-class on the one output guard (an output is never an input,
with or without --force; outputs locked while written, --force included), a weight file replaced under a resumed run,
and the probes of the issue re-run against the landed code. Each case ends in one line (or a skipped record), never a
traceback or an "unexpected" error, and nothing is lost or mixed."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from avarc.errors import AvarcError
from avarc.io import files
from avarc.io.files import file_lock, hold_folder
from avarc.io.records import weights_identity
from tests.conftest import cli_run, read_jsonl, run_cli, save_classes
from tests.test_hostile4 import ENV, REPO, clean, cli, refused

DIGITS = REPO / "core" / "weights" / "digits"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A labelled classify run (its records), an explain folder of one of its images, and the images."""
    root = tmp_path_factory.mktemp("hostile5")
    digits = save_classes(root / "d", (0, 1), 3)
    assert cli_run("classify", digits, "--out", root / "r.jsonl").returncode == 0
    assert cli_run("explain", digits / "0" / "0.png", "--out", root / "why").returncode == 0
    return root / "r.jsonl", root / "why", digits


def _perturbed_vae(path: Path) -> None:
    """The digits VQ-VAE with one weight scaled: loads like the real one, encodes differently."""
    sd = torch.load(DIGITS / "vae.pth", weights_only=True)
    sd["encoder.conv_in.weight"] = sd["encoder.conv_in.weight"] * 1.01
    torch.save(sd, path)


# (1) report on the output guard


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("target", ["panel-png", "panel-npz", "image", "image-hardlink", "records-symlink"])
def test_report_never_writes_over_an_input(run, tmp_path, monkeypatch, capsys, target, force):
    results, why, digits = run
    out = {"panel-png": why / "0.png", "panel-npz": why / "0.npz", "image": digits / "1" / "2.png",
           "image-hardlink": tmp_path / "thumb.html", "records-symlink": tmp_path / "r.html"}[target]
    if target == "image-hardlink":
        os.link(digits / "1" / "2.png", out)               # the report's name is a hard link to an input image
    elif target == "records-symlink":
        out.symlink_to(results)
    before = out.read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, "report", results, "--explain", why, "--out", out,
                           *["--force"] * force)
    line = refused(code, err, "is an input of this run")
    assert "never written over, even with --force" in line and out.read_bytes() == before


def test_report_to_a_file_another_run_is_writing_is_refused_in_one_line(run, tmp_path, monkeypatch, capsys):
    results, _, _ = run
    out = tmp_path / "r.html"
    out.write_text("the page another report is replacing")
    with file_lock(out):                                   # what a second `avarc report -o r.html` holds meanwhile
        for extra in ([], ["--force"]):
            code, _, err = run_cli(monkeypatch, capsys, "report", results, "--out", out, *extra)
            if extra:
                refused(code, err, f"{out}: another avarc run is writing this file")
            else:
                refused(code, err, "already exists")
    assert out.read_text() == "the page another report is replacing"
    code, _, err = run_cli(monkeypatch, capsys, "report", results, "--out", out, "--force")
    assert code == 0 and out.read_text().startswith("<!DOCTYPE html>"), clean(err)
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]           # no lock file left behind


# (2) add-class under --force: outputs locked, samples never over an input


def test_two_add_class_runs_with_force_one_refused_no_mixed_files(tmp_path):
    digits = save_classes(tmp_path / "d", (1,), 3)
    out = tmp_path / "ext.pt"
    lock = file_lock(out).lock_file

    def start(name: str) -> subprocess.Popen:
        return subprocess.Popen(cli("add-class", name, digits / "1", "--steps", 200, "--holdout", 0, "--samples", 1,
                                    "--out", out, "--force"), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    first = start("alpha")
    deadline = time.monotonic() + 240
    while first.poll() is None and time.monotonic() < deadline:
        if lock.exists():
            first.send_signal(signal.SIGSTOP)             # frozen while it holds the output: the second comes now
            if _held(lock):
                break
            first.send_signal(signal.SIGCONT)             # stopped between making the lock file and locking it
        time.sleep(0.01)
    try:
        assert _held(lock), first.communicate()
        second = start("beta")
        code, err = second.wait(timeout=300), second.stderr.read()
    finally:
        first.send_signal(signal.SIGCONT)
    refused(code, err, f"{out}: another avarc run is writing this file")
    assert first.wait(timeout=300) == 0, clean(first.stderr.read())
    assert torch.load(out, weights_only=True)["names"] == ["alpha"]
    drawn = tmp_path / "ext.samples"
    assert sorted(str(p.relative_to(drawn)) for p in drawn.rglob("*.png")) == ["alpha/0.png", "grid.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "ext.pt", "ext.samples"]


def _held(lock: Path) -> bool:
    """Another process holds this lock file's flock (probed without taking it for longer than the probe)."""
    import fcntl

    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)                                      # closing lets go of a lock the probe took
    return False


def test_add_class_samples_never_write_over_an_input_image(tmp_path, monkeypatch, capsys):
    images = save_classes(tmp_path / "e.samples", (7,), 2)
    (images / "7").rename(images / "seven")               # the samples of `seven` would be e.samples/seven/0.png
    before = (images / "seven" / "0.png").read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, "add-class", "seven", images / "seven", "--steps", 1, "--samples", 1,
                           "--out", tmp_path / "e.pt", "--force")
    refused(code, err, "--samples: " + str(images / "seven" / "0.png") + ": is an input of this run")
    assert (images / "seven" / "0.png").read_bytes() == before and not (tmp_path / "e.pt").exists()


def test_a_folder_lock_without_flock_is_filelock_beside_the_folder(tmp_path, monkeypatch):
    """Where there is no fcntl (Windows) the folder lock is filelock's file beside the folder: a second holder is
    refused in one line, and nothing is added inside the folder."""
    monkeypatch.setattr(files, "fcntl", None)
    folder = tmp_path / "why"
    folder.mkdir()
    with hold_folder(folder, "out"):
        with pytest.raises(AvarcError, match="another avarc run is writing into this folder"):
            with hold_folder(folder, "out"):
                pass
    with hold_folder(folder, "out"):                       # released: taken again
        pass
    assert list(folder.iterdir()) == []


# (3) the run identity: a weight file replaced under a resumed run


def test_a_model_folders_vae_replaced_under_a_resumed_run_is_refused(run, tmp_path, monkeypatch, capsys):
    _, _, digits = run
    model = tmp_path / "model"
    shutil.copytree(DIGITS, model)
    out = tmp_path / "r.jsonl"
    code, _, err = run_cli(monkeypatch, capsys, "classify", digits / "0", "-m", model, "--out", out)
    assert code == 0, clean(err)
    before = out.read_bytes()
    _perturbed_vae(model / "vae.pth")
    code, _, err = run_cli(monkeypatch, capsys, "classify", digits, "-m", model, "--out", out, "--resume")
    line = refused(code, err, f"{out}: holds records of another run (vae_weights")
    assert "the VQ-VAE weights of the model (its own vae.pth) are not the run's" in line
    assert "resume with the same settings, or choose another file" in line and out.read_bytes() == before


def test_a_vae_given_is_in_the_identity_and_changing_it_on_resume_is_refused(run, tmp_path, monkeypatch, capsys):
    _, _, digits = run
    vae, out = tmp_path / "vae.pth", tmp_path / "r.jsonl"
    shutil.copy(DIGITS / "vae.pth", vae)
    args = ["classify", digits, "-m", DIGITS / "var.pth", "--vae", vae, "--out", out]
    code, _, err = run_cli(monkeypatch, capsys, *args[:1], digits / "0", *args[2:])
    assert code == 0, clean(err)
    run_key = read_jsonl(out)[0]["run"]
    assert run_key["vae_file"] == str(vae) and run_key["vae_weights"] == weights_identity(vae)
    before = out.read_bytes()
    _perturbed_vae(vae)
    code, _, err = run_cli(monkeypatch, capsys, *args, "--resume")
    refused(code, err, f"the VQ-VAE weights of {vae} are not the run's")
    assert out.read_bytes() == before
    shutil.copy(DIGITS / "vae.pth", vae)                   # put back: the run goes on where it stopped
    code, _, err = run_cli(monkeypatch, capsys, *args, "--resume")
    assert code == 0, clean(err)
    recs = read_jsonl(out)
    assert out.read_bytes().startswith(before) and len(recs) == 6 and len({r["file"] for r in recs}) == 6


def test_resume_over_more_inputs_says_which_done_images_it_would_label_otherwise(run, tmp_path, monkeypatch, capsys):
    """``d/0`` alone is unlabelled; resumed over ``d`` its images would be class 0. Their records are kept (never
    removed), with the same scores, and the run says so."""
    _, _, digits = run
    out = tmp_path / "r.jsonl"
    code, _, err = run_cli(monkeypatch, capsys, "classify", digits / "0", "--out", out)
    assert code == 0 and [r["label"] for r in read_jsonl(out)] == [None] * 3, clean(err)
    before = out.read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, "classify", digits, "--out", out, "--resume")
    assert code == 0 and "note: 3 images already done were labelled otherwise" in clean(err).replace("\n", " "), err
    recs = read_jsonl(out)
    assert out.read_bytes().startswith(before) and [r["label"] for r in recs] == [None] * 3 + [1] * 3
    code, _, err = run_cli(monkeypatch, capsys, "classify", digits / "0", "--out", out, "--resume")
    assert code == 0 and "labelled otherwise" not in err, clean(err)


def test_a_dataset_rewritten_since_the_run_is_named_by_explain_from_and_report(tmp_path, monkeypatch, capsys):
    """Rows are found by their number: a dataset rewritten under the run's name (rows reversed) holds other images
    there. explain --from refuses in one line; report keeps its numbers and says so where a thumbnail would be. A
    dataset only touched is the same dataset (its identity is its content)."""
    from tests.test_hostile4 import _parquet

    files = sorted(save_classes(tmp_path / "d", (0, 1), 2).glob("*/*.png"))
    wrong = [1 - int(f.parent.name) for f in files]           # every label wrong: every row a mistake
    _parquet(files, tmp_path / "ds.parquet", labels=wrong)
    out = tmp_path / "r.jsonl"
    code, _, err = run_cli(monkeypatch, capsys, "classify", tmp_path / "ds.parquet", "--out", out)
    assert code == 0 and len(read_jsonl(out)) == 4, clean(err)
    os.utime(tmp_path / "ds.parquet", (1, 1))               # touched, or copied: the same content, the same dataset
    code, _, err = run_cli(monkeypatch, capsys, "classify", tmp_path / "ds.parquet", "--out", out, "--resume")
    assert code == 0 and len(read_jsonl(out)) == 4, clean(err)
    code, _, err = run_cli(monkeypatch, capsys, "explain", "--from", out, "--out", tmp_path / "touched")
    assert code == 0 and len(list((tmp_path / "touched").glob("*.png"))) == 4, clean(err)
    _parquet(files[::-1], tmp_path / "ds.parquet", labels=wrong[::-1])
    code, _, err = run_cli(monkeypatch, capsys, "explain", "--from", out, "--out", tmp_path / "why")
    refused(code, err, f"{tmp_path / 'ds.parquet'} is not the dataset the run read")
    assert not (tmp_path / "why").exists()
    code, _, err = run_cli(monkeypatch, capsys, "report", out, "--out", tmp_path / "r.html")
    assert code == 0, clean(err)
    assert (tmp_path / "r.html").read_text().count("changed since the run") == 4


# (4) the probes re-run: the library's door, report, datasets, --from-list, generate


def test_the_library_refuses_no_model_and_a_seed_that_is_not_a_number_at_the_door(run):
    from avarc import Classifier

    with pytest.raises(AvarcError) as err:
        Classifier.from_pretrained(None)                           # type: ignore[arg-type]
    assert err.value.option == "model" and "got None" in str(err.value)
    clf = Classifier.from_pretrained("digits", device="cpu")
    image = run[2] / "0" / "0.png"
    for method in (clf.classify, clf.explain):
        for seed in ("x", 1.5, True):
            with pytest.raises(AvarcError) as err:
                method(image, seed=seed)
            assert err.value.option == "seed" and f"got {seed!r}" in str(err.value)
    assert clf.classify(image, seed=3).pred == clf.classify(image, seed=np.int64(3)).pred == 0


def test_report_explain_that_is_a_file_says_so(run, tmp_path, monkeypatch, capsys):
    results, _, _ = run
    code, _, err = run_cli(monkeypatch, capsys, "report", results, "--explain", results, "--out", tmp_path / "r.html")
    refused(code, err, f"--explain: {results}: not a folder; pass the --out folder of `avarc explain`")
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("command", ["calibrate-ood", "tune", "add-class", "add-class-model", "report",
                                     "report-model"])
def test_an_input_named_as_the_output_is_refused_as_an_input_before_force_is_asked_for(run, tmp_path, monkeypatch,
                                                                                      capsys, command):
    """Without --force an input named as the output is refused as what it is, never with "pass --force" (which
    would then be refused too)."""
    results, _, digits = run
    image = digits / "0" / "1.png"
    model = tmp_path / "model"
    shutil.copytree(DIGITS, model)
    args, target = {"calibrate-ood": (["calibrate-ood", digits, "-o", image], image),
                    "tune": (["tune", digits, "-o", image], image),
                    "add-class": (["add-class", "seven", digits / "0", "--steps", 1, "--out", image], image),
                    "add-class-model": (["add-class", "seven", digits / "0", "-m", model, "--steps", 1, "--out",
                                         model / "vae.pth"], model / "vae.pth"),
                    "report": (["report", results, "--out", image], image),
                    "report-model": (["report", results, "-m", model, "--out", model / "var.pth"],
                                     model / "var.pth")}[command]
    before = target.read_bytes()
    line = refused(*run_cli(monkeypatch, capsys, *args)[::2], "is an input of this run")
    assert "pass --force" not in line and target.read_bytes() == before


def test_reading_a_dataset_prints_no_progress_bar_of_datasets_own(tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    from tests.test_hostile4 import _parquet

    _parquet(sorted(save_classes(tmp_path / "d", (0,), 2).glob("*/*.png")), tmp_path / "ds.parquet", labels=[0, 0])
    capsys.readouterr()
    code, _, err = run_cli(monkeypatch, capsys, "classify", tmp_path / "ds.parquet", "--out", tmp_path / "r.jsonl")
    assert code == 0 and "Generating" not in err and "examples/s" not in err, clean(err)
    assert datasets.utils.logging.is_progress_bar_enabled()            # put back as found


def test_report_passes_over_a_fifo_among_the_panels(run, tmp_path, monkeypatch, capsys):
    """A FIFO named like a panel's .npz (or .png) in the --explain folder would block a read for ever."""
    results, why, _ = run
    panels = tmp_path / "why"
    shutil.copytree(why, panels)
    os.mkfifo(panels / "zz.npz")
    os.mkfifo(panels / "zz.png")
    code, _, err = run_cli(monkeypatch, capsys, "report", results, "--explain", panels, "--out", tmp_path / "r.html")
    assert code == 0 and (tmp_path / "r.html").exists(), clean(err)


def test_a_report_that_fails_leaves_no_folder_it_made_for_its_output(run, tmp_path, monkeypatch, capsys):
    _, _, digits = run
    unlabelled = tmp_path / "u.jsonl"
    assert run_cli(monkeypatch, capsys, "classify", digits, "--labels", "none", "--out", unlabelled)[0] == 0
    code, _, err = run_cli(monkeypatch, capsys, "report", unlabelled, "--out", tmp_path / "new" / "deeper" / "r.html")
    refused(code, err, "no labelled, classified images")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.jsonl"]
    code, _, err = run_cli(monkeypatch, capsys, "report", run[0], "--out", tmp_path / "new" / "deeper" / "r.html")
    assert code == 0 and (tmp_path / "new" / "deeper" / "r.html").is_file(), clean(err)


@pytest.mark.parametrize("command", ["calibrate-ood", "classify"])
def test_the_from_list_file_is_an_input_never_written_over(run, tmp_path, monkeypatch, capsys, command):
    _, _, digits = run
    listing = tmp_path / "list.txt"
    listing.write_text(f"{digits / '0' / '0.png'}\n{digits / '0' / '1.png'}\n")
    before = listing.read_bytes()
    extra = ["-o", listing, "--force"] if command == "calibrate-ood" else ["--out", listing, "--resume"]
    code, _, err = run_cli(monkeypatch, capsys, command, "--from-list", listing, *extra)
    refused(code, err, f"{listing}: is an input of this run")
    assert listing.read_bytes() == before


def test_generate_into_a_folder_another_run_is_writing_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "samples"
    out.mkdir()
    with hold_folder(out):                                 # what a second `avarc generate --out samples` holds
        code, _, err = run_cli(monkeypatch, capsys, "generate", "3", "--out", out, "--force")
    refused(code, err, f"{out}: another avarc run is writing into this folder")
    assert list(out.iterdir()) == []
    code, _, err = run_cli(monkeypatch, capsys, "generate", "3", "--out", out, "--force")
    assert code == 0 and (out / "grid.png").is_file(), clean(err)
