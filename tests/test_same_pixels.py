"""Same pixels, same answer: one digit (examples/digits/3/1438.png) scores the same, to 1e-4, through every way it
can be passed — library (path, PIL image, tensor, numpy arrays, list item, 4-D row, folder file, dataset row) and
CLI (path, folder, ``--from-list``, dataset row, another batch size, another order) — with the ``digits`` profile,
whose last stage averages latent-noise neighbours: the noise is keyed by the image's content, not its name."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avarc import Classifier, Prediction
from tests.conftest import run_cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "digits"
IMAGE = EXAMPLES / "3" / "1438.png"
OTHERS = sorted((EXAMPLES / "0").iterdir()) + sorted((EXAMPLES / "9").iterdir())
TOL = 1.0001e-4          # records round scores to 4 decimals


@pytest.fixture(scope="module")
def clf() -> Classifier:
    return Classifier.from_pretrained("digits", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The image last in a folder of five (other images before it in the walk's order)."""
    root = tmp_path_factory.mktemp("same") / "digits"
    root.mkdir()
    for i, f in enumerate(OTHERS):
        shutil.copy(f, root / f"a{i}.png")
    shutil.copy(IMAGE, root / "z.png")
    return root


def stage_scores(p: Prediction | dict) -> list[list[float]]:
    stages = p["stages"] if isinstance(p, dict) else [vars(s) for s in p.stages]
    return [list(s["scores"]) for s in stages]


def assert_same(got: list[list[float]], want: list[list[float]], form: str) -> None:
    assert [len(s) for s in got] == [len(s) for s in want], form
    diff = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w))
    assert diff <= TOL, f"{form}: scores differ by {diff}"


def test_the_profile_smooths():
    """The check is only meaningful if the last stage averages noisy neighbours."""
    profile = Classifier.from_pretrained("digits", device="cpu", dtype="fp32").profile
    assert profile.sigma > 0 and profile.stages[-1].samples > 1


def test_every_library_form_gives_the_same_scores(clf, folder, tmp_path):
    want = stage_scores(clf.classify(str(IMAGE)))
    pil = Image.open(IMAGE)
    x = clf.preprocess(IMAGE)
    others = torch.stack([clf.preprocess(f) for f in OTHERS])
    forms = {
        "Path": clf.classify(IMAGE),
        "PIL image": clf.classify(pil),
        "tensor": clf.classify(x),
        "numpy H×W×3 uint8": clf.classify(np.asarray(pil.convert("RGB"))),
        "numpy 3×R×R float": clf.classify(x.numpy()),
        "list item 4": clf.classify([str(f) for f in OTHERS[:3]] + [str(IMAGE)])[3],
        "row 2 of a 4-D tensor": clf.classify(torch.cat([others[:2], x[None], others[2:]]))[2],
        "folder file": clf.classify(str(folder))[-1],
        "twice in one list": clf.classify([pil, str(IMAGE)])[1],
    }
    for form, p in forms.items():
        assert_same(stage_scores(p), want, form)
    assert forms["folder file"].path == str(folder / "z.png") and forms["PIL image"].path is None


def test_a_different_seed_gives_different_neighbours(clf):
    a, b = clf.classify(str(IMAGE)), clf.classify(str(IMAGE), seed=1)
    assert stage_scores(a)[0] == stage_scores(b)[0]           # the clean tokens' stage has no noise
    assert stage_scores(a)[-1] != stage_scores(b)[-1]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_cli_form_gives_the_librarys_scores(clf, folder, tmp_path, monkeypatch, capsys):
    want = stage_scores(clf.classify(str(IMAGE)))
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{f}\n" for f in [*OTHERS[::-1], IMAGE]))
    runs = {"path": ([IMAGE], -1), "folder, batch of 2": ([folder, "-b", "2"], -1),
            "--from-list, last of five, another order": (["--from-list", listing], -1)}
    datasets = pytest.importorskip("datasets")
    rows = [f.read_bytes() for f in [*OTHERS[:2], IMAGE, *OTHERS[2:]]]      # the files' own PNG bytes
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in rows]},
                               features=datasets.Features({"image": datasets.Image()})).to_parquet(str(parquet))
    runs["dataset row 2"] = ([parquet], 2)
    for form, (args, at) in runs.items():
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.jsonl"
        code, _, err = run_cli(monkeypatch, capsys, "classify", *args, "--device", "cpu", "--dtype", "fp32",
                               "-o", out)
        assert code == 0, err
        assert_same(stage_scores(_records(out)[at]), want, form)
