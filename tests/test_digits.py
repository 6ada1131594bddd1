"""The bundled ``digits`` model: loads offline by name and classifies scikit-learn's held-out digits (≥ 90% top-1).

The test split is rebuilt here straight from scikit-learn, independently of ``scripts/digits.py``.
"""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import avarc
from avarc.io.loading import resolve_model
from avarc.io.registry import BUNDLED_DIR
from scripts import digits

EXAMPLES = Path(__file__).parent.parent / "examples" / "digits"
TEST_START = 1438


@pytest.fixture(scope="module")
def sk_test():
    """(images, labels, indices) of the test split: 8-bit greyscale, value·255/16 rounded."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    images = np.round(ds.images * 255.0 / 16.0).astype(np.uint8)
    idx = np.arange(TEST_START, len(images))
    return images[idx], ds.target[idx], idx


@pytest.fixture(scope="module")
def model():
    return resolve_model("digits")


@pytest.fixture(scope="module")
def test_scores(model, sk_test):
    """359 × 10 summed token log-likelihoods, images prepared by the model's own preprocessing."""
    images, _, _ = sk_test
    x = torch.stack([avarc.preprocess_image(Image.fromarray(im), model.spec.image_size, model.spec.preprocess)
                     for im in images])
    return model.token_logp(model.tokenize(x), range(10)).sum(-1)


def test_split_matches_scripts_digits(sk_test):
    images, labels, idx = sk_test
    assert len(labels) == 359
    ours = digits.load_digits("test")
    assert np.array_equal(ours.images, images) and np.array_equal(ours.labels, labels)
    assert np.array_equal(ours.indices, idx)
    assert len(digits.load_digits("train")) == TEST_START


def test_split_writes_the_readme_folders(tmp_path, monkeypatch):
    """`python scripts/digits.py --split DIR`, run as the README says: tune/ (40 training digits per class), test/
    (the test split) and its halves calibrate/ and check/, each a folder of class folders of the exact pixels; a
    second run overwrites nothing."""
    from PIL import Image

    monkeypatch.setattr(sys, "argv", ["digits.py", "--split", str(tmp_path / "d")])
    digits.main()
    tune, test = sorted((tmp_path / "d" / "tune").glob("*/*.png")), sorted((tmp_path / "d" / "test").glob("*/*.png"))
    assert len(tune) == 400 and len(test) == 359
    calibrate = sorted((tmp_path / "d" / "calibrate").glob("*/*.png"))
    check = sorted((tmp_path / "d" / "check").glob("*/*.png"))
    assert len(calibrate) == 180 and len(check) == 179                 # the test split's halves, never trained on
    assert max(int(p.stem) for p in calibrate) == 1617 and min(int(p.stem) for p in check) == 1618
    assert sorted(p.name for p in calibrate + check) == sorted(p.name for p in test)
    assert {p.parent.name for p in tune} == {str(d) for d in range(10)}
    train = digits.load_digits("train")
    for p in tune[:5] + test[:5]:
        i = int(p.stem)
        assert (i < TEST_START) == (p in tune) and int(p.parent.name) == digits.load_digits("all").labels[i]
    first = tune[0]
    assert np.array_equal(np.asarray(Image.open(first)), train.images[int(first.stem)])
    with pytest.raises(SystemExit) as again:                  # `python scripts/digits.py` exits 1 with this message
        digits.main()
    assert str(again.value.code).startswith("error: ") and "already exists" in str(again.value.code)


def test_loads_by_name_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the bundled model must load without network access")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    m = resolve_model("digits")
    assert m.spec.class_names == tuple(str(d) for d in range(10))
    assert m.num_classes == 10 and m.spec.preprocess == "resize"


def test_accuracy_at_least_90_percent(test_scores, sk_test):
    _, labels, _ = sk_test
    acc = (test_scores.argmax(1).numpy() == labels).mean()
    assert acc >= 0.90, f"top-1 {acc:.3f} on the 359 test digits"


def test_metadata_records_how_it_was_made(model, test_scores, sk_test):
    meta = json.loads((BUNDLED_DIR / "digits" / "meta.json").read_text())
    assert meta["spec"]["preprocess"] == "resize" and meta["image_size"] == model.spec.image_size
    assert tuple(meta["patch_nums"]) == model.spec.var.patch_nums
    assert meta["seed"] == 0 and meta["classes"] == list(range(10))
    assert meta["data"]["train_indices"] == [0, 1437] and meta["data"]["test_indices"] == [1438, 1796]
    assert "train_digits.py" in meta["training"]["command"]
    acc = meta["accuracy"]
    assert acc["test_images"] == 359 and len(acc["top1_first_scales"]) == len(model.spec.var.patch_nums)
    assert acc["top1_first_scales"][-1] == acc["top1"]
    measured = (test_scores.argmax(1).numpy() == sk_test[1]).mean()
    assert acc["top1"] == pytest.approx(measured, abs=1.5 / 359)   # what the file claims is what it does
    assert 0 <= acc["top1_smoothed"] <= 1


def test_bundle_is_small():
    files = {p.name: p.stat().st_size for p in (BUNDLED_DIR / "digits").iterdir()}
    assert set(files) == {"var.pth", "vae.pth", "meta.json"}
    assert sum(files.values()) <= 5_000_000


def test_examples_are_test_split_pixels(sk_test):
    images, labels, idx = sk_test
    pngs = sorted(EXAMPLES.glob("*/*.png"))
    assert len(pngs) == 20
    for png in pngs:
        i = int(png.stem) - TEST_START
        assert 0 <= i < len(idx), f"{png} is not a test-split index"
        assert int(png.parent.name) == labels[i], f"{png} is in the wrong label folder"
        with Image.open(png) as im:
            assert im.mode == "L" and im.size == (8, 8)
            assert np.array_equal(np.asarray(im), images[i])
    assert sorted({int(p.parent.name) for p in pngs}) == list(range(10))
