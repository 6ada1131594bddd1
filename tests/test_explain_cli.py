"""``avarc explain`` end to end: saved maps against the formula on the conformance golden ``logp``
(tests/data/conformance/<set>/golden.npz), the bundled demo on examples/digits, a one-class model, awkward class
and file names, bad images and one-line errors."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avarc import build_model
from avarc.io.loading import save_model_dir
from avarc.tasks.heatmap import GAP, caption_height, figure_size, panel_size
from tests.conftest import IMAGE, A, B, expected_maps, run_cli, tiny_spec

REPO = Path(__file__).resolve().parents[1]
CPU = ["--device", "cpu", "--dtype", "fp32"]


def write_images(folder: Path, names: list[str], size: int = 20, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def named_model(tmp_path_factory) -> Path:
    """A tiny random 3-class model whose class names need care in captions and on the command line."""
    torch.manual_seed(0)
    model = build_model(tiny_spec(3, class_names=("cat/dog", "big bird", "ünï")), "cpu")
    return save_model_dir(model, tmp_path_factory.mktemp("named") / "model", default_profile="varc")


def test_saved_maps_equal_the_formula_on_golden_logp(conf, tmp_path, monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "explain", conf.images[IMAGE], "--model", conf.var_path, "--vae",
                         conf.vae_path, "--class", A, "--vs", B, "--out", tmp_path, *CPU)
    assert code == 0 and "1 written" in " ".join(out.split())
    stem = conf.images[IMAGE].stem
    saved = np.load(tmp_path / f"{stem}.npz")
    lp = conf.golden["logp"][IMAGE].double().numpy()
    null, patch_nums = conf.meta["null_class"], tuple(conf.meta["patch_nums"])
    assert saved["maps"].dtype == np.float32 and saved["maps"].shape == (3, patch_nums[-1], patch_nums[-1])
    assert np.abs(saved["maps"] - expected_maps(lp[A], lp[B], lp[null], patch_nums)).max() < 1e-4
    assert saved["classes"].tolist() == [A, B] and saved["patch_nums"].tolist() == list(patch_nums)
    assert np.abs(saved["scores"] - lp[[A, B, null]].sum(-1)).max() < 0.05
    assert saved["per_scale"].shape == (3, sum(p * p for p in patch_nums))
    with Image.open(tmp_path / f"{stem}.png") as im:
        assert im.size == figure_size(conf.meta["image_size"])


def test_demo_explains_the_example_digits(tmp_path, monkeypatch, capsys):
    digits = REPO / "examples" / "digits"
    code, out, err = run_cli(monkeypatch, capsys, "explain", digits, "--out", tmp_path, *CPU)
    assert code == 0, err
    images = [p for p in digits.rglob("*.png")]
    pngs, npzs = sorted(tmp_path.glob("*.png")), sorted(tmp_path.glob("*.npz"))
    assert len(pngs) == len(npzs) == len(images) > 0
    size = json.loads((REPO / "core" / "weights" / "digits" / "meta.json").read_text())["spec"]["image_size"]
    P = panel_size(size)
    for png in pngs:
        with Image.open(png) as im:
            assert im.size == (4 * P + 3 * GAP, P + caption_height(P))
    explained = []
    for npz in npzs:
        saved = np.load(npz)
        a, b = saved["classes"].tolist()
        assert b != a and b < 10 and np.isfinite(saved["maps"]).all()        # true digit vs best wrong digit
        explained.append(a)
    assert Counter(explained) == Counter(int(p.parent.name) for p in images)


def test_from_a_run_explains_its_true_and_predicted_classes(tmp_path, monkeypatch, capsys):
    """`explain --from run.jsonl` uses the run's model and classes: A = the true digit, B = the run's prediction
    when wrong, else its runner-up; `--mistakes` only the wrong ones; report then shows those panels."""
    digits = REPO / "examples" / "digits"
    run = tmp_path / "run.jsonl"
    code, _, err = run_cli(monkeypatch, capsys, "classify", digits, "--profile", "varc", "--classes", "3,5,8,9",
                         "--labels", "folders", "--out", run, *CPU)      # four look-alike digits: some mistakes
    assert code == 0, err
    records = [json.loads(line) for line in run.read_text().splitlines()]
    code, _, err = run_cli(monkeypatch, capsys, "explain", "--from", run, "-m", "digits", "--out",
                           tmp_path / "all", *CPU)
    assert code == 0, err
    for r in records:
        saved = np.load(tmp_path / "all" / f"{Path(r['path']).stem}.npz")
        wrong = r["pred"] != r["label"]
        assert saved["classes"].tolist() == [r["label"], r["pred"] if wrong else r["topk"][1]["class"]]
    mistakes = {Path(r["path"]).stem for r in records if r["pred"] != r["label"]}
    code, _, err = run_cli(monkeypatch, capsys, "explain", "--from", run, "--mistakes", "-m", "digits", "--out",
                         tmp_path / "why", *CPU)
    if not mistakes:
        assert code == 2 and "no mistakes to explain" in err
        return
    assert code == 0, err
    assert {p.stem for p in (tmp_path / "why").glob("*.png")} == mistakes
    code, _, err = run_cli(monkeypatch, capsys, "report", run, "--explain", tmp_path / "why")
    assert code == 0, err
    page = (tmp_path / "run.html").read_text()
    panel = (tmp_path / "why" / f"{sorted(mistakes)[0]}.png").read_bytes()
    import base64
    assert base64.b64encode(panel).decode() in page


def test_one_class_model_explains_against_null(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    model_dir = save_model_dir(build_model(tiny_spec(1), "cpu"), tmp_path / "one")
    write_images(tmp_path / "in", ["a.png", "b.png"])
    code, out, err = run_cli(monkeypatch, capsys, "explain", tmp_path / "in", "--model", model_dir, "--out",
                           tmp_path / "out", *CPU)
    assert code == 0, err
    for stem in ("a", "b"):
        saved = np.load(tmp_path / "out" / f"{stem}.npz")
        assert saved["classes"].tolist() == [0, 1] and saved["names"].tolist() == ["0", "null"]
        assert not saved["maps"][1].any() and np.array_equal(saved["maps"][2], saved["maps"][0])
        assert saved["scores"][1] == saved["scores"][2]
        png = np.asarray(Image.open(tmp_path / "out" / f"{stem}.png"))
        assert png.shape[:2][::-1] == figure_size(16)


def test_awkward_class_and_file_names(named_model, tmp_path, monkeypatch, capsys):
    write_images(tmp_path / "in", ["x/my cat.png", "y/my cat.png", "y/猫.png"])
    (tmp_path / "in" / "y" / "broken.png").write_bytes(b"not an image")
    code, out, err = run_cli(monkeypatch, capsys, "explain", tmp_path / "in", "--model", named_model, "--class",
                           "big bird", "--vs", "cat/dog", "--out", tmp_path / "out", "--scales", 3, *CPU)
    assert code == 0, err
    assert "skipped:" in err and "broken.png" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "image.npz", "image.png", "my_cat-2.npz", "my_cat-2.png", "my_cat.npz", "my_cat.png"]
    saved = np.load(tmp_path / "out" / "my_cat.npz")
    assert saved["classes"].tolist() == [1, 0] and saved["names"].tolist() == ["big bird", "cat/dog"]
    assert saved["maps"].shape == (3, 3, 3)                                   # --scales 3: the 3×3 grid


def test_labelled_folder_explains_true_class_vs_best_wrong(named_model, tmp_path, monkeypatch, capsys):
    write_images(tmp_path / "in", ["ünï/1.png", "big bird/2.png"])
    code, _, err = run_cli(monkeypatch, capsys, "explain", tmp_path / "in", "--model", named_model, "--out",
                         tmp_path / "out", *CPU)
    assert code == 0, err
    for stem, label in (("1", 2), ("2", 1)):
        a, b = np.load(tmp_path / "out" / f"{stem}.npz")["classes"].tolist()
        assert a == label and b not in (label, 3)
    code, _, err = run_cli(monkeypatch, capsys, "explain", tmp_path / "in", "--model", named_model, "--out",
                         tmp_path / "out2", "--label", "0", "--vs", "null", *CPU)
    assert code == 0, err
    assert np.load(tmp_path / "out2" / "1.npz")["classes"].tolist() == [0, 3]


@pytest.mark.parametrize("args, message", [
    (["--class", "1", "--vs", "big bird"], "same class"),
    (["--scales", "9"], "--scales: 9 scales asked for, but this model has 5"),
    (["--class", "7"], "class index 7 is out of range"),
    (["--colormap", "viridis"], "'--colormap': Value error, 'viridis' is not one of 'turbo', 'jet'"),
])
def test_user_errors_are_one_line(named_model, tmp_path, monkeypatch, capsys, args, message):
    write_images(tmp_path, ["a.png"])
    code, _, err = run_cli(monkeypatch, capsys, "explain", tmp_path / "a.png", "--model", named_model, *args, *CPU)
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
