"""``avarc add-class`` end to end: extension files through the CLI, one-line errors, classify --extension."""
from __future__ import annotations

import json
import shutil

import torch

from avarc.io import loading
from tests.conftest import ConformanceSet, run_cli

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
    code, out, err = run_cli(monkeypatch, capsys, "add-class", "newcls", folder, "--model", CS.var_path,
                           "--vae", CS.vae_path, "--steps", 2, "--holdout", 0, "--out", ext, *FAST)
    assert code == 0, err
    assert "skipped" in err and "broken.png" in err and "newcls" in out
    assert torch.load(ext, weights_only=True)["names"] == ["newcls"]

    code, _, err = run_cli(monkeypatch, capsys, "classify", CS.images[0], "--model", OTHER.var_path,
                         "--vae", OTHER.vae_path, "--extension", ext, *FAST)
    one_line_error(code, err, "was trained on sha256")

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(monkeypatch, capsys, "add-class", "x", empty, "--model", CS.var_path, "--vae", CS.vae_path,
                         *FAST)
    one_line_error(code, err, "no readable images for class 'x'")

    code, _, err = run_cli(monkeypatch, capsys, "add-class", "newcls", folder, "--model", CS.var_path,
                         "--vae", CS.vae_path, "--extension", ext, *FAST)
    one_line_error(code, err, "class 'newcls' already exists")


def test_digits_extension_keeps_old_scores_and_runs_everywhere(monkeypatch, capsys, tmp_path):
    """On the demo: base and null log-probs bit-identical with the extension; classify and bench take --extension."""
    from PIL import Image

    from avarc.tasks.incremental import apply_extensions
    from scripts import digits
    test = digits.load_digits("test")
    folder = tmp_path / "sevens"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(test.images[test.labels == 7][i]).save(folder / f"{i}.png")
    ext = tmp_path / "sevens.pt"
    code, out, err = run_cli(monkeypatch, capsys, "add-class", "sevens", folder, "--steps", 30, "--holdout", 0.34,
                           "--out", ext, *FAST)
    assert code == 0, err

    base = loading.resolve_model("digits", device="cpu")
    tokens = base.tokenize(digits.to_tensor(test.images[:64], base.spec.image_size))
    K = base.num_classes
    before = base.token_logp(tokens, [*range(K), base.null_class])
    extended = loading.resolve_model("digits", device="cpu")
    apply_extensions(extended, [ext])
    assert extended.num_classes == K + 1 and extended.class_name(K) == "sevens"
    assert torch.equal(extended.token_logp(tokens, [*range(K), extended.null_class]), before)

    results = tmp_path / "r.jsonl"
    code, out, err = run_cli(monkeypatch, capsys, "classify", folder, "--extension", ext, "--out", results,
                             "--topk", 11,
                           *FAST)
    assert code == 0, err
    recs = [json.loads(line) for line in results.read_text().splitlines()]
    names = {t["name"] for r in recs for t in r["topk"]}
    assert "sevens" in names and "7" in names and "0" in names

    code, out, err = run_cli(monkeypatch, capsys, "bench", "--extension", ext, "--num-classes", 11, "--warmup", 0,
                           "--repeat", 1, "--json", *FAST)
    assert code == 0, err
    assert json.loads(out)["results"][0]["s_per_image"]["median"] > 0
    code, _, err = run_cli(monkeypatch, capsys, "bench", "--random-weights", "--extension", ext, *FAST)
    one_line_error(code, err, "--extension needs the base model")
