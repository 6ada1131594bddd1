"""``--dataset objectnet`` (core/io/objectnet.py, core/io/data.py): a release-shaped tree whose mapping files follow the
release's formats, read with a 1000-class tiny model (tests/data/conformance/official256's VAE, a random VAR)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avarc import VARSpec, build_model
from avarc.engine.stages import Prediction, StageScores
from avarc.errors import AvarcError
from avarc.io.data import ClassSpace, DataOptions, collect, imagenet_classes
from avarc.io.objectnet import MAPPINGS
from avarc.io.preprocess import preprocess_pil
from avarc.io.records import ok_record
from avarc.io.summary import Metrics
from tests.conftest import ConformanceSet, run_cli

CS = ConformanceSet("official256")
OVERLAP = json.loads((Path(__file__).resolve().parents[1] / "core/data/imagenet_variant_classes.json").read_text())
OVERLAP = sorted(OVERLAP["objectnet"]["indices"])          # the 125 ImageNet classes ObjectNet overlaps
RED = (255, 0, 0)


def _to_2012(index: int) -> int:
    """The release numbers ImageNet classes in ILSVRC-2012 order, not the class-index order: a permutation here."""
    return (7 * index + 3) % 1000


def _framed(path: Path, inner: Image.Image) -> None:
    img = Image.new("RGB", (inner.width + 4, inner.height + 4), RED)
    img.paste(inner, (2, 2))
    img.save(path)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """objectnet-1.0/ with 113 overlapping classes (the first 12 map to two ImageNet classes each: 125 in all) and
    one class without an ImageNet counterpart; images in three folders, each with a 2-pixel red frame."""
    root = tmp_path_factory.mktemp("on") / "objectnet-1.0"
    maps = root / "mappings"
    maps.mkdir(parents=True)
    names = [f"{name.replace('_', ' ')} ({synset})" for synset, name in imagenet_classes()]
    lines = [""] * 1000
    for i, name in enumerate(names):
        lines[_to_2012(i)] = name
    (maps / "imagenet_to_label_2012_v2").write_text("\n".join(lines) + "\n")
    (maps / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({str(i): _to_2012(i) for i in range(1000)}))
    groups = [OVERLAP[2 * k:2 * k + 2] for k in range(12)] + [[c] for c in OVERLAP[24:]]
    assert len(groups) == 113
    (maps / "objectnet_to_imagenet_1k.json").write_text(json.dumps(
        {f"Thing {k}": "; ".join(names[c] for c in g) for k, g in enumerate(groups)}))
    folders = {f"thing_{k}": f"Thing {k}" for k in range(113)} | {"chair_x": "Chair X"}
    (maps / "folder_to_objectnet_label.json").write_text(json.dumps(folders))
    src = CS.dir.parent / "images"
    for folder, stems in (("thing_0", ["tiny", "landscape"]), ("thing_20", ["portrait"]),
                          ("chair_x", ["gray", "rgba"])):
        (root / "images" / folder).mkdir(parents=True)
        for stem in stems:
            _framed(root / "images" / folder / f"{stem}.png", Image.open(next(src.glob(f"{stem}.*"))).convert("RGB"))
    return root


@pytest.fixture(scope="module")
def var1000(tmp_path_factory) -> Path:
    spec = dataclasses.replace(CS.load().spec, var=VARSpec(depth=1, embed_dim=64, num_heads=1, num_classes=1000))
    torch.manual_seed(0)
    var = build_model(spec, "cpu").var
    var.init_weights()
    path = tmp_path_factory.mktemp("m") / "var1000.pth"
    torch.save(var.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def space() -> ClassSpace:
    from avarc.models.specs import official_spec
    return ClassSpace(build_model(official_spec("d16"), "meta"))


def test_candidates_are_the_125_overlapping_classes_and_other_folders_are_counted(release, space):
    found = collect([release.parent], space, dataset="objectnet")       # the folder above objectnet-1.0 works too
    assert found.candidates == OVERLAP and found.labelled
    assert [Path(it.path).parent.name for it in found.items] == ["thing_0", "thing_0", "thing_20"]
    first = found.items[0]
    assert first.label_name == "Thing 0" and first.accepted == tuple(OVERLAP[:2]) and first.label == OVERLAP[0]
    assert found.items[2].accepted == (OVERLAP[24 + 8],)
    assert found.notes == ("note: skipped 1 ObjectNet folders (2 images) whose classes have no ImageNet counterpart",)


def test_border_is_cropped_before_preprocessing(release, space):
    item = collect([release], space, dataset="objectnet").items[0]            # landscape.png in a red frame
    inner = Image.open(next((CS.dir.parent / "images").glob("landscape.*"))).convert("RGB")
    assert np.array_equal(np.asarray(item.open()), np.asarray(inner))
    assert np.array_equal(item.pixels(32), preprocess_pil(inner, 32))
    wide = collect([release], space, dataset="objectnet", data=DataOptions(border=5)).items[0].open()
    assert wide.size == (inner.width - 6, inner.height - 6)
    none = collect([release], space, dataset="objectnet", data=DataOptions(border=0)).items[0].open()
    assert none.getpixel((0, 0)) == RED and none.size == (inner.width + 4, inner.height + 4)


def test_a_prediction_of_any_accepted_class_is_right(release, space):
    item = collect([release], space, dataset="objectnet").items[0]
    a, b = item.accepted
    names = [n for _, n in imagenet_classes()]
    metrics = Metrics(1)
    for pred, other in ((b, a), (a, b), (OVERLAP[50], a)):
        ranking = [(pred, -1.0), (other, -2.0), (OVERLAP[60], -3.0)]
        st = StageScores(4, 1, 1, [c for c, _ in ranking], [s for _, s in ranking])
        rec = ok_record(item, Prediction(pred, ranking, [st], [(pred, 1.0)]), names, {"fingerprint": "x"}, 5)
        metrics.add(rec)
        assert rec["label_name"] == "Thing 0" and rec["accepted"] == [a, b]
    assert metrics.correct1 == 2 and metrics.correct5 == 3 and metrics.labelled == 3


def test_end_to_end_accuracy_names_objectnet_classes(release, var1000, tmp_path, monkeypatch, capsys):
    a, b = OVERLAP[:2]
    out = tmp_path / "on.jsonl"
    profile = tmp_path / "p.yaml"
    profile.write_text("stages:\n  - {scales: 2, keep: 2}\n  - {scales: 3}\n")
    code, stdout, stderr = run_cli(monkeypatch, capsys, "classify", release, "--model", var1000, "--vae", CS.vae_path,
                                 "--device", "cpu", "--dataset", "objectnet", "--profile", profile, "--out", out,
                                 "--classes", f"{a},{b}")     # only Thing 0's two classes: every prediction is right
    assert code == 0, stderr
    assert "skipped 1 ObjectNet folders (2 images)" in stderr and "left out 1 labelled images" in stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 2 and all(r["label_name"] == "Thing 0" and r["pred"] in (a, b) for r in recs)
    assert all(r["label"] == r["pred"] and r["label_rank"] == 1 for r in recs)
    assert "100.00%" in stdout


@pytest.mark.parametrize("broken", [0, 1, 2, 3])
def test_a_missing_or_malformed_mapping_file_is_one_line_naming_it(release, space, tmp_path, broken):
    import shutil

    copy = tmp_path / "objectnet-1.0"
    shutil.copytree(release / "mappings", copy / "mappings")
    (copy / "images").mkdir()
    target = copy / "mappings" / MAPPINGS[broken]
    target.unlink()
    with pytest.raises(AvarcError, match=f"{MAPPINGS[broken]}: missing mapping file"):
        collect([copy], space, dataset="objectnet")
    if broken != 2:
        target.write_text("{not json")
        with pytest.raises(AvarcError, match=f"{MAPPINGS[broken]}: not valid JSON"):
            collect([copy], space, dataset="objectnet")


def test_cli_error_is_one_line(release, var1000, tmp_path, monkeypatch, capsys):
    code, stdout, stderr = run_cli(monkeypatch, capsys, "classify", tmp_path, "--model", var1000, "--vae", CS.vae_path,
                                 "--device", "cpu", "--dataset", "objectnet")
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "not an ObjectNet release" in stderr


def test_report_tables_name_objectnet_classes(release, var1000, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    a, b = OVERLAP[:2]
    out = tmp_path / "on.jsonl"
    code, _, err = run_cli(monkeypatch, capsys, "classify", release, "--model", var1000, "--vae", CS.vae_path,
                           "--device",
                         "cpu", "--dataset", "objectnet", "--out", out, "--classes", f"{a},{b},{OVERLAP[32]}",
                         "--profile", "varc")
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "report", out, "--out", tmp_path / "r.html")
    assert code == 0, err
    page = (tmp_path / "r.html").read_text()
    assert "<td>Thing 0</td><td>2</td>" in page and "<td>Thing 20</td><td>1</td>" in page   # not its two ImageNet ids
