"""Sampling against upstream VAR (tests/data/conformance/official256/generate.npz: ``autoregressive_infer_cfg`` on
CPU in fp32), ``avarc generate`` end to end, and the digits model's own samples classified as their class."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avarc import Classifier
from avarc.engine.sampling import Sampling, generate_tokens
from avarc.errors import AvarcError
from tests.conftest import CONFORMANCE, MODEL, ConformanceSet, run_cli

GOLDEN = CONFORMANCE / "official256" / "generate.npz"
UPSTREAM = dict(np.load(GOLDEN))
SETTINGS = [Sampling(int(UPSTREAM["seed"][i]), float(UPSTREAM["cfg"][i]), int(UPSTREAM["top_k"][i]),
                     float(UPSTREAM["top_p"][i])) for i in range(len(UPSTREAM["seed"]))]


@pytest.fixture(scope="module")
def official():
    cs = ConformanceSet("official256")
    return Classifier.from_pretrained(cs.var_path, vae=cs.vae_path, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def digits():
    return Classifier.from_pretrained("digits", device="cpu")


def test_tokens_equal_upstream(official):
    """Every (seed, cfg, top-k, top-p) setting draws upstream's token ids; so does a batch split into forwards of
    one sample (two rows) each."""
    labels = torch.from_numpy(UPSTREAM["labels"])
    for i, s in enumerate(SETTINGS):
        tokens = official.generate_tokens(labels, s)
        assert torch.equal(tokens, torch.from_numpy(UPSTREAM["tokens"][i])), s
    m = official.model
    split = generate_tokens(m.var, m.vae.quantize, labels, SETTINGS[-1], rows_per_forward=2)
    assert torch.equal(split, torch.from_numpy(UPSTREAM["tokens"][-1]))


@pytest.mark.parametrize("i", [0, 1])
def test_cli_pngs_match_upstream_images(monkeypatch, capsys, tmp_path, i):
    s = SETTINGS[i]
    labels = UPSTREAM["labels"].tolist()
    model = MODEL if i == 0 else MODEL[:MODEL.index("--dtype")]     # generate's auto dtype is fp32: upstream's
    code, out, err = run_cli(monkeypatch, capsys, "generate", *labels, "--seed", s.seed, "--cfg", s.cfg,
                             "--top-k", s.top_k, "--top-p", s.top_p, "--out", tmp_path, *model)
    assert code == 0, err
    saved = np.load(tmp_path / "tokens.npz")
    assert saved["tokens"].dtype == np.int64 and np.array_equal(saved["tokens"], UPSTREAM["tokens"][i])
    assert saved["labels"].tolist() == labels
    for b, y in enumerate(labels):
        png = np.asarray(Image.open(tmp_path / str(y) / "0.png"), dtype=np.float32) / 255
        assert png.shape == (256, 256, 3)
        assert np.abs(png - UPSTREAM["images"][i, b].transpose(1, 2, 0)).max() <= 2 / 255
    grid = Image.open(tmp_path / "grid.png")
    assert grid.height >= 2 * 256 and grid.width > 256      # two labelled rows of one sample


def test_digits_samples_are_classified_as_their_class(digits):
    """The acceptance check: 10 samples per digit (seed 0, default settings) classified as their class ≥ 90%."""
    samples = digits.generate(range(10), 10, seed=0)
    preds = [p.pred for p in digits.classify_samples(samples)]
    assert np.mean(np.array(preds) == samples.labels.numpy()) >= 0.9


def test_generate_cli_files_guard_and_check(monkeypatch, capsys, tmp_path):
    out = tmp_path / "s"
    code, stdout, err = run_cli(monkeypatch, capsys, "generate", "3", "7", "-n", 3, "--out", out, "--check",
                                "--device", "cpu")
    assert code == 0, err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == \
        ["3/0.png", "3/1.png", "3/2.png", "7/0.png", "7/1.png", "7/2.png", "grid.png"]
    saved = np.load(out / "tokens.npz")
    assert saved["tokens"].shape == (6, 30) and saved["labels"].tolist() == [3, 3, 3, 7, 7, 7]
    assert "share %" in stdout and "all" in stdout
    grid = Image.open(out / "grid.png")
    assert grid.width >= 3 * 64 and grid.height >= 2 * 64        # 8×8 digits drawn at least 8× larger
    # the same request again: refused, nothing touched; --force rewrites the same samples
    before = (out / "3" / "0.png").read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, "generate", "3", "7", "-n", 3, "--out", out, "--device", "cpu")
    assert code == 2 and "already exist" in err and "--force" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(monkeypatch, capsys, "generate", "3", "7", "-n", 3, "--out", out, "--device", "cpu",
                           "--force")
    assert code == 0, err
    assert (out / "3" / "0.png").read_bytes() == before


@pytest.mark.parametrize("args,needle", [
    (["eleven"], "'eleven' is not a class of this model"),
    (["12"], "out of range"),
    (["3", "-n", "0"], "-n"),
    (["3", "--cfg", "-1"], "--cfg"),
    (["3", "--top-p", "1"], "--top-p"),
    (["3", "--top-k", "65"], "top-k 65 is out of range"),
])
def test_generate_refuses_bad_requests_in_one_line(monkeypatch, capsys, tmp_path, args, needle):
    code, _, err = run_cli(monkeypatch, capsys, "generate", *args, "--out", tmp_path / "x", "--device", "cpu")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (tmp_path / "x" / "grid.png").exists()


def test_added_class_generates_and_add_class_samples(monkeypatch, capsys, tmp_path):
    """add-class --samples writes the new class's samples beside the extension with the share classified as it;
    generate -e draws the added class by name."""
    from scripts import digits as demo
    test = demo.load_digits("test")
    folder = tmp_path / "sevens"
    folder.mkdir()
    for i in range(8):
        Image.fromarray(test.images[test.labels == 7][i]).save(folder / f"{i}.png")
    ext = tmp_path / "sevens.pt"
    code, out, err = run_cli(monkeypatch, capsys, "add-class", "sevens", folder, "--steps", 30, "--holdout", 0,
                             "--out", ext, "--samples", 4, "--device", "cpu")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "sevens.samples" / "sevens").iterdir()) == [f"{k}.png" for k in range(4)]
    assert "classified as it" in out and "sevens" in out
    moved = tmp_path / "kept.pt"
    ext.rename(moved)                            # the extension gone, its samples still there: refused before training
    code, _, err = run_cli(monkeypatch, capsys, "add-class", "sevens", folder, "--steps", 1, "--out", ext,
                           "--samples", 1, "--device", "cpu")
    assert code == 2 and "sevens.samples: already exists" in err and len(err.strip().splitlines()) == 1, err
    assert not ext.exists()
    moved.rename(ext)
    gen = tmp_path / "gen"
    code, _, err = run_cli(monkeypatch, capsys, "generate", "sevens", "7", "-n", 2, "-e", ext, "--out", gen,
                           "--device", "cpu")
    assert code == 0, err
    assert np.load(gen / "tokens.npz")["labels"].tolist() == [10, 10, 7, 7]
    assert (gen / "sevens" / "1.png").exists()


def test_counterfactuals_of_threes_are_eights(digits):
    """The acceptance check: twenty test 3s drawn as 8 from their own first scale are classified as 8 in ≥ 70%;
    keeping every scale draws nothing (both drawings are the reconstruction)."""
    from scripts.digits import load_digits
    test = load_digits("test")
    threes = [Image.fromarray(a) for a in test.images[test.labels == 3][:20]]
    cfs = digits.counterfactual(threes, "8", keep_scales=1, seed=0)
    assert np.mean([c.as_target_pred == 8 for c in cfs]) >= 0.7
    assert all(c.pred == 3 and c.target == 8 and c.as_target_name == digits.class_names[c.as_target_pred] for c in cfs)
    assert np.mean([c.log_ratio for c in cfs]) > 0              # the drawn tokens favour 8 over 3
    alone = digits.counterfactual(threes[5], "8", keep_scales=1, seed=0)
    assert np.array_equal(alone.as_target, cfs[5].as_target)      # the same draw alone as in the batch of twenty
    full = digits.counterfactual(threes[0], 8, keep_scales=len(digits.spec.var.patch_nums))
    assert np.array_equal(full.as_target, full.reconstruction) and np.array_equal(full.as_pred, full.reconstruction)
    with pytest.raises(AvarcError, match="keep 5 scales asked for, but this model has 4"):
        digits.counterfactual(threes[0], 8, keep_scales=5)


def test_explain_counterfactual_cli(monkeypatch, capsys, tmp_path):
    threes = Path(__file__).parents[1] / "examples" / "digits" / "3"
    out = tmp_path / "cf"
    code, stdout, err = run_cli(monkeypatch, capsys, "explain", threes, "--counterfactual", "8", "--out", out,
                                "--device", "cpu")
    assert code == 0, err
    stems = sorted(p.stem for p in threes.iterdir())
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s}.as_8.png" for s in stems] + [f"{s}.counterfactual.png" for s in stems])
    assert Image.open(out / f"{stems[0]}.as_8.png").size == (8, 8)
    panel = Image.open(out / f"{stems[0]}.counterfactual.png")
    assert panel.width >= 5 * 256 and panel.height > 256           # five panels of at least 256 px, captioned
    assert "classified as the class asked" in stdout
    code, _, err = run_cli(monkeypatch, capsys, "explain", threes, "--counterfactual", "8", "--out", out,
                           "--device", "cpu")
    assert code == 2 and "already exist" in err and len(err.strip().splitlines()) == 1
    for args, needle in [(["--counterfactual", "true"], "needs --from RUN"),
                         (["--counterfactual", "eleven"], "'eleven' is not a class"),
                         (["--counterfactual", "8", "--keep-scales", "9"], "this model has 4"),
                         (["--counterfactual", "8", "--vs", "3"], "--vs is for heatmaps")]:
        code, _, err = run_cli(monkeypatch, capsys, "explain", threes, *args, "--out", tmp_path / "x", "--device",
                               "cpu")
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], err

    run = tmp_path / "run.jsonl"
    code, _, err = run_cli(monkeypatch, capsys, "classify", threes.parent, "--out", run, "--device", "cpu")
    assert code == 0, err
    code, stdout, err = run_cli(monkeypatch, capsys, "explain", "--from", run, "--counterfactual", "true",
                                "--out", tmp_path / "true", "--device", "cpu")
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "true").glob("*.as_*.png"))
    assert len(names) == 20 and sum(n.endswith(".as_3.png") for n in names) == 2
    code, _, err = run_cli(monkeypatch, capsys, "explain", "--from", run, "--mistakes", "--counterfactual", "true",
                           "--out", tmp_path / "m", "--device", "cpu")
    assert code == 2 and "no mistakes" in err


def test_sample_folders_stay_apart():
    """Two classes whose names make one folder name (ImageNet's two "crane" classes) do not share a folder."""
    from avarc.tasks.samples import sample_files
    assert sample_files([134, 517, 134, 3], ["crane", "crane", "crane", "tiger shark"]) == \
        ["crane/0.png", "crane-517/0.png", "crane/1.png", "tiger_shark/0.png"]
