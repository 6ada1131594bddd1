"""``avarc explain --from RUN``: each image of a classify run explained on the stage that decided it — with the
run's scales, samples, seed, noise key, model build and dtype — so in every mistake the pair's log-ratio is the
run's own lead and favours the predicted class; every explain option applies or is refused in one line; records
are found by their identity (absolute file, dataset row) from any working folder; report shows each mistake's own
panel. One early-exit run on the bundled digits model (test digits 1618–1699), made with relative paths."""
from __future__ import annotations

import base64
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from avarc.cli.app import main
from tests.conftest import read_jsonl, run_cli, save_digits

# Stage 1 decides on 2 of the 4 scales (an image leading by 2 nats exits there), stage 2 on all 4, 3 samples each.
EARLY_EXIT = """sigma: 0.1
stages:
  - {scales: 2, samples: 1, keep: 5, exit_margin: 2}
  - {scales: all, samples: 3, keep: 1}
"""
CPU = ["--device", "cpu"]      # the dtype is the run's (fp32), read from its records


@dataclass
class Run:
    root: Path                  # the run's working folder
    results: Path
    records: list[dict]
    profile: Path

    @property
    def mistakes(self) -> list[dict]:
        return [r for r in self.records if r["pred"] != r["label"]]


def _cli(*args) -> int:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["avarc", *map(str, args)])
        try:
            main()
        except SystemExit as e:
            return e.code or 0
    return 0


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("run")
    save_digits(root / "test", 1618, 1700)
    (root / "early-exit.yaml").write_text(EARLY_EXIT)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)             # relative inputs: records keep `path` as typed and the absolute `file`
        assert _cli("classify", "test", "-p", "early-exit.yaml", "--out", "run.jsonl", "--device", "cpu", "--dtype",
                    "fp32") == 0
    return Run(root, root / "run.jsonl", read_jsonl(root / "run.jsonl"), root / "early-exit.yaml")


def stage_lead(record: dict, a: int, b: int, stage: dict) -> float:
    score = dict(zip(stage["candidates"], stage["scores"]))
    return score[a] - score[b]


def deciding(record: dict, a: int, b: int) -> dict:
    return [st for st in record["stages"] if a in st["candidates"] and b in st["candidates"]][-1]


def test_every_mistake_shows_the_prediction_winning_on_the_stage_that_decided(run, tmp_path, monkeypatch, capsys):
    mistakes = run.mistakes
    exits = [r for r in mistakes if r["exited_after"] == 1]
    assert len(mistakes) >= 8 and exits and len(exits) < len(mistakes)    # decided on 2 scales and on 4 (smoothed)
    monkeypatch.chdir(tmp_path)        # another working folder: `path` (relative) no longer opens, `file` does
    code, out, err = run_cli(monkeypatch, capsys, "explain", "--from", run.results, "--mistakes", "--out", "why", *CPU)
    assert code == 0, err
    assert "skipped" not in err, err
    assert "2×1" in out and "4×3" in out, out
    for r in mistakes:
        saved = np.load(tmp_path / "why" / f"{Path(r['path']).stem}.npz")
        a, b = saved["classes"].tolist()
        assert (a, b) == (r["label"], r["pred"])
        stage = deciding(r, a, b)
        log_a, log_b, _ = saved["scores"]
        assert log_a - log_b < 0                                              # the predicted class wins
        assert abs((log_a - log_b) - stage_lead(r, a, b, stage)) < 1e-3      # by the run's own lead (4 decimals)
        assert len(saved["patch_nums"]) == stage["scales"] and int(saved["samples"]) == stage["samples"]
        assert abs(saved["per_scale"][2].sum() - (log_a - log_b)) < 1e-3     # its tokens' terms sum to the ratio
        assert str(saved["image"]) == r["file"] and (tmp_path / "why" / f"{Path(r['path']).stem}.png").is_file()

    # on every scale and the clean tokens only (what --from did before), some mistakes showed the true class winning
    code, _, err = run_cli(monkeypatch, capsys, "explain", "--from", run.results, "--mistakes", "--scales", 4,
                           "--out", "all-scales", *CPU)
    assert code == 0, err
    full = [np.load(tmp_path / "all-scales" / f"{Path(r['path']).stem}.npz") for r in exits]
    assert all(len(s["patch_nums"]) == 4 for s in full)
    assert sum(s["scores"][0] > s["scores"][1] for s in full) >= 1


def test_each_option_applies_to_a_runs_images(run, tmp_path, monkeypatch, capsys):
    r = next(r for r in run.records if r["pred"] == r["label"] and len(r["stages"]) == 2)   # right, on 4×3
    image = run.root / r["path"]
    stem = image.stem

    def explain(out: str, *args) -> dict:
        code, _, err = run_cli(monkeypatch, capsys, "explain", "--from", run.results, image, "--out", tmp_path / out,
                               *args, *CPU)
        assert code == 0, err
        assert [p.stem for p in (tmp_path / out).glob("*.png")] == [stem]       # the input picks the run's image
        return dict(np.load(tmp_path / out / f"{stem}.npz"))

    runner_up = next(c for c, _ in sorted(zip(r["stages"][-1]["candidates"], r["stages"][-1]["scores"]),
                                          key=lambda cs: -cs[1]) if c != r["label"])
    plain = explain("plain")
    assert plain["classes"].tolist() == [r["label"], runner_up] and int(plain["samples"]) == 3
    log_a, log_b, _ = plain["scores"]
    assert abs((log_a - log_b) - stage_lead(r, r["label"], runner_up, r["stages"][-1])) < 1e-3

    other = next(c for c in r["stages"][0]["candidates"] if c not in r["stages"][1]["candidates"])
    vs = explain("vs", "--vs", other)            # pruned at stage 1: explained on the stage that pruned it
    assert vs["classes"].tolist() == [r["label"], other] and len(vs["patch_nums"]) == 2 and int(vs["samples"]) == 1
    assert abs((vs["scores"][0] - vs["scores"][1]) - stage_lead(r, r["label"], other, r["stages"][0])) < 1e-3
    null = explain("null", "--vs", "null")
    assert null["classes"].tolist() == [r["label"], 10] and len(null["patch_nums"]) == 4
    cls = explain("cls", "--class", other)
    assert cls["classes"].tolist() == [other, r["pred"]]
    label = explain("label", "--label", other)
    assert label["classes"].tolist() == [other, r["pred"]]
    unlabelled = explain("none", "--labels", "none")
    assert unlabelled["classes"].tolist() == [r["pred"], runner_up]
    assert explain("seed", "--seed", 0)["classes"].tolist() == plain["classes"].tolist()      # the run's seed
    assert explain("same-profile", "-p", run.profile)["scores"].tolist() == plain["scores"].tolist()
    scales = explain("scales", "--scales", 3)
    assert len(scales["patch_nums"]) == 3 and int(scales["samples"]) == 3
    styled = explain("styled", "--colormap", "jet", "--alpha", 1, "--shared-scale", "--labels", "folders")
    assert styled["scores"].tolist() == plain["scores"].tolist()
    bf16 = explain("bf16", "--dtype", "bf16")          # a dtype given overrides the run's: other scores
    assert bf16["classes"].tolist() == plain["classes"].tolist() and bf16["scores"].tolist() != plain["scores"].tolist()
    (tmp_path / "list.txt").write_text(f"{image}\n")
    code, _, err = run_cli(monkeypatch, capsys, "explain", "--from", run.results, "--from-list", tmp_path / "list.txt",
                           "--out", tmp_path / "listed", *CPU)
    assert code == 0 and [p.stem for p in (tmp_path / "listed").glob("*.png")] == [stem], err

    code, out, err = run_cli(monkeypatch, capsys, "explain", "--from", run.results, image, "--metrics", "--out",
                             tmp_path / "metrics", *CPU)
    assert code == 0, err
    measured = json.loads((tmp_path / "metrics" / "metrics.json").read_text())
    assert measured["images"] == 1 and measured["per_image"][0]["cls"] == r["label"]

    stray = tmp_path / "stray.png"
    shutil.copy(image, stray)
    for args, says in [(["--seed", 1], "--seed: "), (["-p", "varc"], "--profile: "), ([stray], "not explainable "
                       "images of"), (["--class", "3", "--vs", "3"], "same class"),
                       (["--split", "test"], "--split: picks rows of a dataset input")]:
        code, _, err = run_cli(monkeypatch, capsys, "explain", "--from", run.results, *args, "--out",
                               tmp_path / "refused", *CPU)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, (args, err)
    code, _, err = run_cli(monkeypatch, capsys, "explain", image, "--mistakes", "--out", tmp_path / "refused", *CPU)
    assert code == 2 and "--mistakes: " in err and "--from" in err


def test_missing_images_are_named_and_counted(run, tmp_path, monkeypatch, capsys):
    lines = run.results.read_text().splitlines()[:3]
    gone = [tmp_path / f"{i}.png" for i in range(3)]
    records = []
    for line, copy in zip(lines, gone):
        rec = json.loads(line)
        shutil.copy(rec["file"], copy)
        records.append(json.dumps({**rec, "file": str(copy), "path": copy.name}))
    results = tmp_path / "moved.jsonl"
    results.write_text("\n".join(records) + "\n")
    gone[0].unlink()
    code, _, err = run_cli(monkeypatch, capsys, "explain", "--from", results, "--out", tmp_path / "some", *CPU)
    assert code == 0 and f"skipped: {gone[0]}" in err and "1 of 3 images could not be explained" in err
    assert len(list((tmp_path / "some").glob("*.png"))) == 2
    for f in gone[1:]:
        f.unlink()
    code, _, err = run_cli(monkeypatch, capsys, "explain", "--from", results, "--out", tmp_path / "none", *CPU)
    assert code == 1 and "error: 3 of 3 images could not be explained" in err and "Traceback" not in err


@pytest.mark.parametrize("field, value, says", [
    ("schedule", "x", "line 1 is not an avarc result record (run.schedule: input should be a valid dictionary"),
    ("schedule", {"sigma": 0.1, "stages": [[9, 1, 1, None]]}, "9 does not fit a model with 4 scales"),
    ("extension_files", "abc", "line 1 is not an avarc result record (run.extension_files: input should be a valid"),
    ("vae_file", 5, "line 1 is not an avarc result record (run.vae_file: input should be a valid string"),
    ("model", "/nowhere/var.pth", "is not a registry name or a path here; pass it with -m")])
def test_damaged_run_fields_are_one_line(run, tmp_path, monkeypatch, capsys, field, value, says):
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text("".join(json.dumps({**r, "run": {**r["run"], field: value}}) + "\n" for r in run.records[:2]))
    code, _, err = run_cli(monkeypatch, capsys, "explain", "--from", damaged, "--out", tmp_path / "why", *CPU)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_report_shows_each_mistakes_own_panel_when_names_repeat(run, tmp_path, monkeypatch, capsys):
    """Two mistakes of different true classes copied to the same file name (stage 1 decides them on clean tokens,
    so the copies are the same mistakes): each report card embeds the panel of its own image."""
    picked = {}
    for r in run.mistakes:
        if r["exited_after"] == 1 and r["label"] not in picked and len(picked) < 2:
            picked[r["label"]] = r
    for label, r in picked.items():
        (tmp_path / "same" / str(label)).mkdir(parents=True)
        shutil.copy(r["file"], tmp_path / "same" / str(label) / "x.png")
    results = tmp_path / "same.jsonl"
    code, _, err = run_cli(monkeypatch, capsys, "classify", tmp_path / "same", "-p", run.profile, "--out", results,
                           *CPU, "--dtype", "fp32")
    assert code == 0, err
    records = read_jsonl(results)
    assert all(r["pred"] != r["label"] for r in records) and len(records) == 2
    code, _, err = run_cli(monkeypatch, capsys, "explain", "--from", results, "--mistakes", "--out", tmp_path / "why",
                           *CPU)
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "report", results, "--explain", tmp_path / "why")
    assert code == 0, err
    page = (tmp_path / "same.html").read_text()
    cards = re.findall(r'<div class="card"><img src="data:image/png;base64,([^"]+)"[^>]*><br>x.png<br>true <b>(\d)</b>',
                       page)
    assert len(cards) == 2
    panels = {base64.b64encode(p.read_bytes()).decode(): int(np.load(p.with_suffix(".npz"))["classes"][0])
              for p in (tmp_path / "why").glob("*.png")}
    assert sorted(panels.values()) == sorted(picked)
    assert all(panels[png] == int(label) for png, label in cards)

    monkeypatch.chdir(tmp_path / "why")      # the run's relative paths do not open here; its `file`s do
    code, _, err = run_cli(monkeypatch, capsys, "report", run.results, "--out", tmp_path / "elsewhere.html")
    assert code == 0, err
    page = (tmp_path / "elsewhere.html").read_text()
    assert page.count('<div class="card"><img src="data:image/png') == min(len(run.mistakes), 12)
    assert "image not found" not in page


def test_a_run_with_an_added_class_is_rebuilt_with_its_extension(run, tmp_path, monkeypatch, capsys):
    from scripts.digits import load_digits

    train = load_digits("train")
    sevens = tmp_path / "sevens"
    sevens.mkdir()
    for i, im in enumerate(train.images[train.labels == 7][:8]):
        save = sevens / f"{i}.png"
        from PIL import Image
        Image.fromarray(im).save(save)
    ext = tmp_path / "sevens.ext.pt"
    code, _, err = run_cli(monkeypatch, capsys, "add-class", "sevens", sevens, "--steps", 20, "--holdout", 0,
                           "--out", ext, *CPU, "--dtype", "fp32")
    assert code == 0, err
    results = tmp_path / "ext.jsonl"
    code, _, err = run_cli(monkeypatch, capsys, "classify", sevens, "-e", ext, "-p", run.profile, "--out", results,
                           *CPU, "--dtype", "fp32")
    assert code == 0, err
    records = read_jsonl(results)
    assert records[0]["run"]["extension_files"] == [str(ext.resolve())]
    added = [r for r in records if r["pred"] == 10]
    assert added, "the added class won no image"
    code, _, err = run_cli(monkeypatch, capsys, "explain", "--from", results, "--out", tmp_path / "why", *CPU)
    assert code == 0, err
    for r in added:
        saved = np.load(tmp_path / "why" / f"{Path(r['path']).stem}.npz")
        assert saved["classes"][0] == 10 and str(saved["names"][0]) == "sevens"
    ext.rename(tmp_path / "moved.pt")
    code, _, err = run_cli(monkeypatch, capsys, "explain", "--from", results, "--out", tmp_path / "gone", *CPU)
    assert code == 2 and f"extension {ext.resolve()} is not here" in err and "-e" in err
    code, _, err = run_cli(monkeypatch, capsys, "explain", "--from", results, "-e", tmp_path / "moved.pt", "--out",
                           tmp_path / "given", *CPU)
    assert code == 0, err


def test_a_dataset_runs_rows_are_read_as_rows(run, tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    picked = run.mistakes[:3]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": Path(r["file"]).read_bytes(), "path": None} for r in picked],
                                     "label": [r["label"] for r in picked]}, features=features)
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "classify", "rows.parquet", "-p", run.profile, "--out", "rows.jsonl",
                           *CPU, "--dtype", "fp32")
    assert code == 0, err
    records = read_jsonl(tmp_path / "rows.jsonl")
    assert [r["pred"] for r in records] == [r["pred"] for r in picked]
    code, _, err = run_cli(monkeypatch, capsys, "explain", "--from", "rows.jsonl", "--mistakes", "--out", "why", *CPU)
    assert code == 0 and "skipped" not in err, err
    saved = sorted((np.load(p) for p in (tmp_path / "why").glob("*.npz")), key=lambda s: str(s["image"]))
    assert [str(s["image"]) for s in saved] == [r["file"] for r in records] == [
        f"{tmp_path.resolve() / 'rows.parquet'}[train]#{i}" for i in range(3)]
    for s, r in zip(saved, records):
        assert s["classes"].tolist() == [r["label"], r["pred"]] and s["scores"][0] < s["scores"][1]
    code, _, err = run_cli(monkeypatch, capsys, "report", "rows.jsonl")       # its mistakes' rows as thumbnails
    assert code == 0, err
    page = (tmp_path / "rows.html").read_text()
    assert page.count('<div class="card"><img src="data:image/png') == 3 and "image not" not in page
