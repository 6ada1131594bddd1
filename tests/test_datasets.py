"""Hugging Face ``datasets`` inputs (core/io/hf_data.py): a third of the digits test split as a folder of PNGs, a
parquet file, a folder of parquet files (the hub's layout) and a ``save_to_disk`` folder give the same predictions and
scores; resume after kill -9; one-line errors for a missing column, a non-image column and a bad split."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pytest
from PIL import Image

from tests.conftest import HUB_COMMIT, FakeHub, _Handler, run_cli

datasets = pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[1]
N = 120                        # every third image of the digits test split (359), in the folder walk's order
PLAIN = "stages:\n  - {scales: 3, samples: 1, keep: 4}\n  - {scales: all, samples: 1, keep: 1}\n"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    """The digits test split as class folders, and the same PNG bytes in the folder's order as a dataset (Image and
    ClassLabel features, and a string column) in three formats; a profile without smoothing noise (whose seed is
    the image's path, which differs between a file and a row)."""
    from scripts.digits import load_digits

    root = tmp_path_factory.mktemp("digits")
    os.environ.setdefault("HF_DATASETS_CACHE", str(root / "hf-cache"))
    test = load_digits("test")
    folder = root / "folder"
    rows = sorted(zip(test.images, test.labels, test.indices), key=lambda r: (str(r[1]), f"{r[2]}.png"))[::3]
    assert len(rows) == N
    for image, label, index in rows:
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        (folder / str(label) / f"{index}.png").write_bytes(_png(image))
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)]),
                                  "index": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": _png(im), "path": None} for im, _, _ in rows],
                                     "label": [int(y) for _, y, _ in rows], "index": [int(i) for _, _, i in rows]},
                                    features=features)
    ds.to_parquet(str(root / "digits.parquet"))
    (root / "hub" / "data").mkdir(parents=True)
    ds.to_parquet(str(root / "hub" / "data" / "test-00000-of-00001.parquet"))
    (root / "hub" / "README.md").write_text("digits test split\n")
    datasets.DatasetDict({"test": ds}).save_to_disk(str(root / "saved"))
    bad = datasets.concatenate_datasets([ds, datasets.Dataset.from_dict(
        {"image": [{"bytes": b"not an image", "path": None}], "label": [3], "index": [-1]}, features=features)])
    bad.to_parquet(str(root / "with-bad-row.parquet"))
    ds.select(range(3)).to_parquet(str(root / "three.parquet"))
    (root / "plain.yaml").write_text(PLAIN)
    return {"root": root, "folder": folder, "parquet": root / "digits.parquet", "hub": root / "hub",
            "saved": root / "saved", "bad": root / "with-bad-row.parquet", "three": root / "three.parquet",
            "profile": root / "plain.yaml"}


def _classify(monkeypatch, capsys, digits, source, out: Path, *extra) -> tuple[int, str, str]:
    return run_cli(monkeypatch, capsys, "classify", source, "--device", "cpu", "--profile", digits["profile"],
                 "--out", out, *extra)


def test_every_format_gives_the_folder_runs_predictions_and_scores(digits, tmp_path, monkeypatch, capsys):
    code, _, err = _classify(monkeypatch, capsys, digits, digits["folder"], tmp_path / "folder.jsonl")
    assert code == 0, err
    want = read_jsonl(tmp_path / "folder.jsonl")
    assert len(want) == N
    for name, extra, split in (("parquet", ["--split", "test"], "test"), ("hub", [], "test"), ("saved", [], "test")):
        out = tmp_path / f"{name}.jsonl"
        code, stdout, err = _classify(monkeypatch, capsys, digits, digits[name], out, *extra)
        assert code == 0, err
        got = read_jsonl(out)
        assert [r["path"] for r in got] == [f"{digits[name]}[{split}]#{i}" for i in range(N)]
        assert ([(r["label"], r["pred"], r["label_rank"]) for r in got]
                == [(r["label"], r["pred"], r["label_rank"]) for r in want])
        assert [r["stages"] for r in got] == [r["stages"] for r in want]
        assert [r["gflops"] for r in got] == [r["gflops"] for r in want]
        assert "top-1" in stdout


def test_resume_after_kill_9_leaves_one_record_per_row_and_a_bad_row_is_skipped(digits, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bad.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "avarc", "classify", str(digits["bad"]), "--device", "cpu", "--profile",
           str(digits["profile"]), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.stat().st_size == 0) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(out.read_text().splitlines())
    assert 0 < before < N + 1, "the run was not cut off mid-way"
    code, _, err = _classify(monkeypatch, capsys, digits, digits["bad"], out, "--resume")
    assert code == 0, err and f"resume: {before} images already done" in err.replace("\n", " ")
    records = read_jsonl(out)
    assert sorted(r["path"] for r in records) == sorted(f"{digits['bad']}[train]#{i}" for i in range(N + 1))
    skipped = [r for r in records if r["status"] != "ok"]
    assert [r["path"] for r in skipped] == [f"{digits['bad']}[train]#{N}"]
    assert "not a readable image" in skipped[0]["error"] and skipped[0]["label"] == 3


@pytest.mark.parametrize("args, says", [
    (["--image-column", "picture"], "no column 'picture'; its columns: image, label, index"),
    (["--image-column", "index"], "column 'index' holds"),
    (["--label-column", "image"], "column 'image' holds"),
    (["--split", "validation"], "no split 'validation'; its splits: test"),
])
def test_dataset_mistakes_are_one_line(digits, monkeypatch, capsys, args, says):
    code, _, err = run_cli(monkeypatch, capsys, "classify", digits["saved"], "--device", "cpu", *args)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_from_list_reads_paths_relative_to_the_list(digits, tmp_path, monkeypatch, capsys):
    files = sorted((digits["folder"] / "3").iterdir())[:3]
    listing = tmp_path / "mine.txt"               # relative paths from the list's folder (not the shared folder)
    listing.write_text("# three threes\n" + "".join(f"{os.path.relpath(f, tmp_path)}\n" for f in files) + "\n")
    out = tmp_path / "list.jsonl"
    code, _, err = run_cli(monkeypatch, capsys, "classify", "--from-list", listing, "--device", "cpu", "--out", out)
    assert code == 0, err
    assert [os.path.realpath(r["path"]) for r in read_jsonl(out)] == [os.path.realpath(f) for f in files]
    code, _, err = run_cli(monkeypatch, capsys, "classify", "--from-list", tmp_path / "none.txt")
    assert code == 2 and "none.txt: no such list file" in err


DATASET = "avarc-tests/digits"


class _DatasetHandler(_Handler):
    """The download tests' hub stand-in, also answering for one dataset repo as the hub's API does: its info, its
    tree, paths-info, and its files under /datasets/OWNER/NAME/resolve/REV/PATH (other paths as before)."""

    def do_POST(self) -> None:
        self._serve(body=True)

    def _json(self, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _serve(self, body: bool) -> None:
        hub: FakeHub = self.server
        url = urlparse(self.path)
        path, api, files = unquote(url.path), f"/api/datasets/{DATASET}", hub.dataset_files
        if not path.startswith((api, f"/datasets/{DATASET}/")):
            return super()._serve(body)
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode()) if length else {}
        hub.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        entries = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                   for f, b in files.items()]
        entries += [{"type": "directory", "path": "data", "oid": "0" * 40, "size": 0}]
        if path in (api, f"{api}/revision/main", f"{api}/revision/{HUB_COMMIT}"):
            return self._json({"id": DATASET, "sha": HUB_COMMIT, "private": False, "gated": False, "disabled": False,
                               "siblings": [{"rfilename": f} for f in files], "tags": [], "cardData": {},
                               "lastModified": "2026-01-01T00:00:00.000Z"})
        if path.startswith(f"{api}/tree/"):
            folder = path[len(f"{api}/tree/"):].partition("/")[2]
            return self._json([e for e in entries if e["path"].rpartition("/")[0] == folder])
        if path.startswith(f"{api}/paths-info/"):
            return self._json([e for e in entries if e["path"] in form.get("paths", [])])
        rev, _, name = path[len(f"/datasets/{DATASET}/resolve/"):].partition("/")
        if rev not in ("main", HUB_COMMIT) or name not in files:
            return self._error(404, "EntryNotFound")
        data = files[name]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", HUB_COMMIT)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


@pytest.fixture
def dataset_hub(digits):
    server = FakeHub()
    server.RequestHandlerClass = _DatasetHandler
    server.dataset_files = {"README.md": b"digits test split\n",
                            "data/test-00000-of-00001.parquet":
                                (digits["hub"] / "data/test-00000-of-00001.parquet").read_bytes()}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_hub_dataset_through_the_hf_cache_then_offline(digits, dataset_hub, tmp_path, monkeypatch, capsys):
    code, _, err = _classify(monkeypatch, capsys, digits, digits["folder"], tmp_path / "folder.jsonl")
    assert code == 0, err
    want = read_jsonl(tmp_path / "folder.jsonl")
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env = {**keep, "HF_ENDPOINT": dataset_hub.url, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "COLUMNS": "400"}
    for offline in ("0", "1"):
        out = tmp_path / f"hub{offline}.jsonl"
        seen = len(dataset_hub.requests)
        done = subprocess.run([sys.executable, "-m", "avarc", "classify", f"hf://datasets/{DATASET}", "--device",
                               "cpu", "--profile", str(digits["profile"]), "--out", str(out)],
                              env={**env, "HF_HUB_OFFLINE": offline}, cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        got = read_jsonl(out)
        assert [r["path"] for r in got] == [f"hf://datasets/{DATASET}[test]#{i}" for i in range(N)]
        assert [(r["pred"], r["stages"]) for r in got] == [(r["pred"], r["stages"]) for r in want]
        assert (len(dataset_hub.requests) > seen) == (offline == "0")      # offline: the cache, not one request
    done = subprocess.run([sys.executable, "-m", "avarc", "classify", "hf://datasets/avarc-tests/nothing-cached"],
                          env={**env, "HF_HUB_OFFLINE": "1"}, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "hf://datasets/avarc-tests/nothing-cached: not in the HF cache and HF_HUB_OFFLINE is set" in done.stderr


def test_explain_and_tune_read_datasets(digits, tmp_path, monkeypatch, capsys):
    import numpy as np

    files = sorted((digits["folder"] / "0").iterdir())[:3]          # the dataset's first three rows, as files
    listing = tmp_path / "three.txt"
    listing.write_text("".join(f"{f}\n" for f in files))
    for name, source in (("files", ["--from-list", listing]), ("rows", [digits["three"]])):
        code, _, err = run_cli(monkeypatch, capsys, "explain", *source, "--device", "cpu", "--profile",
                               digits["profile"],
                             "--labels", "none", "--out", tmp_path / name)
        assert code == 0, err
    rows = [tmp_path / "rows" / f"three{n}.npz" for n in ("", "-2", "-3")]       # row 0, 1, 2 of three.parquet
    for f, r in zip(files, rows):
        a, b = np.load(tmp_path / "files" / f"{f.stem}.npz"), np.load(r)
        assert np.array_equal(a["classes"], b["classes"]) and np.allclose(a["maps"], b["maps"])
    code, stdout, err = run_cli(monkeypatch, capsys, "tune", digits["saved"], "--device", "cpu", "--split", "test",
                              "--out", tmp_path / "tuned.yaml", "--stages", "1..2")
    assert code == 0, err
    assert (tmp_path / "tuned.yaml").is_file() and "120" in stdout + err


def test_add_class_learns_the_classes_a_dataset_names(digits, tmp_path, monkeypatch, capsys):
    import torch

    from scripts.digits import load_digits

    test = load_digits("test")
    sevens = [_png(im) for im in test.images[test.labels == 7][:6]]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["sevens"])})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in sevens + [b"junk"]],
                                     "label": [0] * 7}, features=features)
    ds.save_to_disk(str(tmp_path / "new"))
    ext = tmp_path / "sevens.pt"
    code, out, err = run_cli(monkeypatch, capsys, "add-class", tmp_path / "new", "--steps", "2", "--holdout", "0",
                           "--device", "cpu", "--out", ext)
    assert code == 0, err
    assert "new[train]#6: not a readable image" in err.replace("\n", "") and "sevens" in out
    saved = torch.load(ext, weights_only=True)
    assert saved["names"] == ["sevens"] and saved["training"]["images"]["sevens"]["train"] == 6
