"""``avarc add-class`` end to end: extension files through the CLI, one-line errors, classify --extension."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from core import registry
from tests.conftest import ConformanceSet, avarc

CS = ConformanceSet("official256")
OTHER = ConformanceSet("shared512")
FAST = ["--device", "cpu", "--dtype", "fp32"]


def one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def test_conformance_extension_and_errors(monkeypatch, capsys, tmp_path):
    folder = tmp_path / "newcls"
    folder.mkdir()
    shutil.copy(CS.images[0], folder)
    (folder / "broken.png").write_bytes(b"not an image")
    ext = tmp_path / "ext.pt"
    code, out, err = avarc(monkeypatch, capsys, "add-class", "newcls", folder, "--model", CS.var_path, "--vae", CS.vae_path,
                           "--steps", 2, "--holdout", 0, "--out", ext, *FAST)
    assert code == 0, err
    assert "skipped" in err and "broken.png" in err and "newcls" in out
    assert torch.load(ext, weights_only=True)["names"] == ["newcls"]

    code, _, err = avarc(monkeypatch, capsys, "classify", CS.images[0], "--model", OTHER.var_path, "--vae", OTHER.vae_path,
                         "--extension", ext, *FAST)
    one_line_error(code, err, "was trained on sha256")

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = avarc(monkeypatch, capsys, "add-class", "x", empty, "--model", CS.var_path, "--vae", CS.vae_path, *FAST)
    one_line_error(code, err, "no readable images for class 'x'")

    code, _, err = avarc(monkeypatch, capsys, "add-class", "newcls", folder, "--model", CS.var_path, "--vae", CS.vae_path,
                         "--extension", ext, *FAST)
    one_line_error(code, err, "class 'newcls' already exists")


def test_digits_classify_with_extension(monkeypatch, capsys, tmp_path):
    try:
        registry.local_path(registry.entry("digits"))
    except Exception:
        pytest.skip("the bundled digits model is not installed in this checkout yet")
    from PIL import Image

    from core import digits
    test = digits.load_digits("test")
    folder = tmp_path / "sevens"
    folder.mkdir()
    for i in range(6):
        im = test.images[test.labels == 7][i]
        Image.fromarray(im).save(folder / f"{i}.png")
    ext = tmp_path / "sevens.pt"
    code, out, err = avarc(monkeypatch, capsys, "add-class", "sevens", folder, "--steps", 30, "--holdout", 0.34,
                           "--out", ext, *FAST)
    assert code == 0, err
    results = tmp_path / "r.jsonl"
    code, out, err = avarc(monkeypatch, capsys, "classify", folder, "--extension", ext, "--out", results, "--topk", 11,
                           *FAST)
    assert code == 0, err
    recs = [json.loads(line) for line in results.read_text().splitlines()]
    names = {t["name"] for r in recs for t in r["topk"]}
    assert "sevens" in names and "7" in names and "0" in names
