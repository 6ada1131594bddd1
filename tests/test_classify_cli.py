"""``avarc classify`` end to end: conformance scores through the CLI, labelled folders, bad input, resume after
kill -9, and one-line errors (tests/data/conformance/official256: tiny official-format checkpoints)."""
from __future__ import annotations

import csv
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import MODEL, ConformanceSet, read_jsonl, run_cli

CS = ConformanceSet("official256")
FAST = "stages:\n  - {scales: 3, keep: 2}\n  - {scales: 4, samples: 2}\n"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fast_profile(tmp_path) -> Path:
    f = tmp_path / "fast.yaml"
    f.write_text(FAST)
    return f


def test_varc_scores_through_the_cli_equal_the_golden_loglikelihood_sums(tmp_path, monkeypatch, capsys):
    out = tmp_path / "varc.jsonl"
    code, stdout, _ = run_cli(monkeypatch, capsys, "classify", CS.dir.parent / "images", *MODEL, "--profile", "varc",
                            "--out", out, "--topk", 10)
    assert code == 0 and "profile varc" in stdout
    records = read_jsonl(out)
    assert [Path(r["path"]).stem for r in records] == CS.meta["images"]
    gold = CS.golden["logp"][:, :10].sum(-1)                               # B, K (K = 10 real classes)
    for rec, g in zip(records, gold):
        (stage,) = rec["stages"]
        assert stage["candidates"] == list(range(10)) and rec["status"] == "ok" and rec["label"] is None
        assert max(abs(s - g[c].item()) for c, s in zip(stage["candidates"], stage["scores"])) < 0.01
        final = {t["class"]: t["score"] for t in rec["topk"]}
        for a in range(10):
            for b in range(10):
                if g[a] - g[b] > 0.1:
                    assert final[a] > final[b]
        assert rec["pred"] == g.argmax().item() == rec["topk"][0]["class"]


def test_labelled_class_folders_give_accuracy_recall_and_a_csv_row(tmp_path, monkeypatch, capsys, fast_profile):
    data = tmp_path / "data"
    for label, stem in (("6", "gray"), ("6", "rgba"), ("0", "palette"), ("2", "tiny")):
        src = next((CS.dir.parent / "images").glob(f"{stem}.*"))
        (data / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, data / label / src.name)
    out, table = tmp_path / "r.jsonl", tmp_path / "summary.csv"
    code, stdout, _ = run_cli(monkeypatch, capsys, "classify", data, *MODEL, "--profile", fast_profile, "--out", out,
                            "--csv", table)
    assert code == 0
    records = read_jsonl(out)
    assert [(r["label"], Path(r["path"]).name) for r in records] == [(0, "palette.png"), (2, "tiny.png"),
                                                                     (6, "gray.png"), (6, "rgba.png")]
    top1 = sum(r["pred"] == r["label"] for r in records) / 4
    recall1 = sum(r["label"] in [c for c, _ in sorted(zip(r["stages"][0]["candidates"], r["stages"][0]["scores"]),
                                                         key=lambda cs: -cs[1])[:2]] for r in records) / 4
    assert f"{100 * top1:.2f}%" in stdout and "stage 1 recall" in stdout and f"{100 * recall1:.2f}%" in stdout
    rows = list(csv.DictReader(table.read_text().splitlines()))
    assert len(rows) == 1 and float(rows[0]["top1"]) == top1 and rows[0]["recall_per_stage"].split(";")[0] == \
        f"{recall1:.6g}"
    assert rows[0]["threads"] == "1" and records[0]["run"]["threads"] == 1


def test_bad_images_are_skipped_with_their_reason_and_the_run_goes_on(tmp_path, monkeypatch, capsys, fast_profile):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = CS.dir.parent / "images" / "tiny.png"
    shutil.copy(good, folder / "a_good.png")
    (folder / "b_empty.png").write_bytes(b"")
    (folder / "c_truncated.png").write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    (folder / "d_notes.txt").write_text("not an image\n")
    shutil.copy(good, folder / "e_good.png")
    out = tmp_path / "r.jsonl"
    code, stdout, _ = run_cli(monkeypatch, capsys, "classify", folder, *MODEL, "--profile", fast_profile, "--out", out)
    assert code == 0
    recs = {Path(r["path"]).name: r for r in read_jsonl(out)}
    assert [recs[n]["status"] for n in sorted(recs)] == ["ok", "skipped", "skipped", "skipped", "ok"]
    assert "empty file" in recs["b_empty.png"]["error"]
    assert "truncated" in recs["c_truncated.png"]["error"] or "broken" in recs["c_truncated.png"]["error"]
    assert "d_notes.txt: not a readable image" in recs["d_notes.txt"]["error"]
    assert all(recs[n]["pred"] in range(10) and recs[n]["error"] is None for n in ("a_good.png", "e_good.png"))
    assert re.search(r"skipped\s*│\s*3\s*│", stdout) and re.search(r"classified\s*│\s*2\s*│", stdout)


@pytest.mark.parametrize("case", ["empty-folder", "unknown-profile", "unknown-model", "invalid-yaml", "resume-no-out"])
def test_user_errors_exit_2_with_one_line_that_says_what_to_do(tmp_path, monkeypatch, capsys, case):
    images = CS.dir.parent / "images"
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("stages:\n  - {scales: 3\n")
    (tmp_path / "empty").mkdir()
    args, expected = {
        "empty-folder": ([tmp_path / "empty", *MODEL], "no files in this folder; point at a folder of images"),
        "unknown-profile": ([images, *MODEL, "--profile", "fastest"], "unknown profile 'fastest'; use one of"),
        "unknown-model": ([images, "--model", "d99"], "d99: no such model file or directory; known names:"),
        "invalid-yaml": ([images, *MODEL, "--profile", bad_yaml], f"{bad_yaml}: invalid YAML at line"),
        "resume-no-out": ([images, *MODEL, "--resume"], "--resume continues an --out file; pass --out"),
    }[case]
    code, stdout, stderr = run_cli(monkeypatch, capsys, "classify", *args)
    assert code == 2 and stdout == ""
    assert stderr.startswith("error: ") and expected in stderr and stderr.count("\n") == 1


def test_unlabelled_images_print_their_predictions_and_profiles_are_listed(tmp_path, monkeypatch, capsys, fast_profile):
    code, stdout, _ = run_cli(monkeypatch, capsys, "classify", CS.dir.parent / "images" / "tiny.png", *MODEL,
                            "--profile", fast_profile, "--classes", "2,5")
    assert code == 0 and "predictions" in stdout and "tiny.png" in stdout
    code, stdout, _ = run_cli(monkeypatch, capsys, "classify", "--list-profiles")
    assert code == 0 and all(name in stdout for name in ("a-varc-plus", "smooth-top10", "adaptive", "digits", "varc"))


def test_resume_after_kill_9_gives_exactly_one_record_per_image(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    images = sorted((CS.dir.parent / "images").iterdir())
    for i in range(16):
        shutil.copy(images[i % len(images)], folder / f"{i:02d}{images[i % len(images)].suffix}")
    out = tmp_path / "r.jsonl"
    cmd = [sys.executable, "-m", "avarc", "classify", str(folder), *map(str, MODEL), "--profile", "varc",
           "--classes", "0,1,2", "--batch-size", "3", "--out", str(out)]         # 3 pairs a forward: 1 image a step
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL                                   # really killed mid-way
    before = out.read_text().splitlines()
    assert 3 <= len(before) < 16
    with open(out, "a") as f:
        f.write(before[-1][: len(before[-1]) // 2])                            # and a torn last line on top
    done = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"resume: {len(before)} images already done, {16 - len(before)} to go" in done.stderr.replace("\n", " ")
    records = read_jsonl(out)
    assert sorted(Path(r["path"]).name.split(".")[0] for r in records) == [f"{i:02d}" for i in range(16)]
    assert out.read_text().splitlines()[:len(before)] == before and all(r["status"] == "ok" for r in records)


def test_imagenet_a_preset_end_to_end_with_a_1000_class_model(tmp_path, monkeypatch, capsys):
    import dataclasses

    import torch

    from avarc import VARSpec, build_model
    from avarc.io.data import dataset_presets, imagenet_classes

    spec = dataclasses.replace(CS.load().spec, var=VARSpec(depth=1, embed_dim=64, num_heads=1, num_classes=1000))
    var = build_model(spec, "cpu").var                                     # random weights, ImageNet-1k classes
    var.init_weights()
    torch.save(var.state_dict(), tmp_path / "var1000.pth")
    synsets = [s for s, _ in imagenet_classes()]
    a_classes = dataset_presets()["imagenet-a"].candidates
    data = tmp_path / "imagenet-a"
    for cls, stem in ((a_classes[0], "tiny"), (a_classes[5], "gray")):
        (data / synsets[cls]).mkdir(parents=True)
        shutil.copy(next((CS.dir.parent / "images").glob(f"{stem}.*")), data / synsets[cls])
    profile = tmp_path / "p.yaml"
    profile.write_text("stages:\n  - {scales: 2, keep: 3}\n  - {scales: 3}\n")
    out = tmp_path / "a.jsonl"
    code, stdout, _ = run_cli(monkeypatch, capsys, "classify", data, "--model", tmp_path / "var1000.pth", "--vae",
                            CS.vae_path, "--device", "cpu", "--dataset", "imagenet-a", "--profile", profile,
                            "--out", out)
    assert code == 0 and "top-1" in stdout
    recs = read_jsonl(out)
    assert [r["label"] for r in recs] == sorted([a_classes[0], a_classes[5]])
    names = [n for _, n in imagenet_classes()]
    for r in recs:
        assert r["stages"][0]["candidates"] == list(a_classes) and r["pred"] in a_classes
        assert r["pred_name"] == names[r["pred"]] and r["label_name"] == names[r["label"]]


def test_demo_model_classifies_the_359_test_digits_from_labelled_folders(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from scripts.digits import load_digits

    test = load_digits("test")
    root = tmp_path / "digits"
    for image, label, index in zip(test.images, test.labels, test.indices):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(root / str(label) / f"{index}.png")
    out = tmp_path / "digits.jsonl"
    code, stdout, _ = run_cli(monkeypatch, capsys, "classify", root, "--out", out, "--device", "cpu")  # defaults
    assert code == 0 and re.search(r"profile\s+digits", stdout)          # the demo model's own profile
    records = read_jsonl(out)
    assert len(records) == 359 and all(r["status"] == "ok" for r in records)
    assert sorted(int(Path(r["path"]).stem) for r in records) == list(test.indices)
    top1 = sum(r["pred"] == r["label"] for r in records) / 359
    assert top1 >= 0.90, top1
    assert re.search(rf"top-1\s*│\s*{100 * top1:.2f}%", stdout)


def test_readme_first_command_prints_the_accuracy_table(monkeypatch, capsys):
    code, stdout, _ = run_cli(monkeypatch, capsys, "classify", REPO / "examples" / "digits", "--device", "cpu")
    assert code == 0
    for row in ("images", "top-1", "top-5", "stage 1 recall", "stage 2 recall", "images/s"):
        assert row in stdout
    assert re.search(r"images\s*│\s*20\s*│", stdout)
