"""The library's door (issues 33 item 3, 36 mechanism 5): results of folders, lists and datasets carry their path and
class-folder label; an unreadable file is a ``Skipped`` result in its place, as in the CLI; numpy arrays are taken;
every argument that would fail deep inside (bytes, None, NaNs, wrong labels, a string of extensions, batch_size=0,
float64) is one ``AvarcError`` line at the door; ``Explanation.save`` to a place it cannot write names that place."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avarc import AvarcError, Classifier, Explanation, Prediction, Skipped

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "digits"
IMAGE = EXAMPLES / "3" / "1438.png"


@pytest.fixture(scope="module")
def clf() -> Classifier:
    return Classifier.from_pretrained("digits", profile="varc", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def threes(tmp_path_factory) -> Path:
    """A folder with one class folder, 3/, of two images."""
    root = tmp_path_factory.mktemp("threes")
    shutil.copytree(EXAMPLES / "3", root / "3")
    return root


def one_line_error(call, *says: str) -> str:
    with pytest.raises(AvarcError) as err:
        call()
    msg = str(err.value)
    assert "\n" not in msg and all(s in msg for s in says), msg
    return msg


def test_folder_results_carry_their_path_and_label(clf, threes):
    preds = clf.classify(str(EXAMPLES))
    files = sorted(EXAMPLES.glob("*/*.png"))
    assert [p.path for p in preds] == [str(f) for f in files]
    assert [p.label for p in preds] == [int(f.parent.name) for f in files]
    assert sum(p.pred == p.label for p in preds) >= 18                 # 20 real test digits
    assert preds[0].to_dict()["path"] == str(files[0]) and "path=" in repr(preds[0])
    listed = clf.classify([str(IMAGE), Image.open(IMAGE)])
    assert [p.path for p in listed] == [str(IMAGE), None]
    explained = clf.explain(str(threes))
    assert [e.path for e in explained] == [str(f) for f in sorted((threes / "3").iterdir())]
    assert all(e.label == 3 and e.classes[0] == 3 for e in explained)      # A: the folder's label


def test_an_unreadable_file_is_a_skipped_result_in_its_place(clf, tmp_path):
    folder = tmp_path / "d" / "3"
    folder.mkdir(parents=True)
    shutil.copy(IMAGE, folder / "a.png")
    (folder / "b.png").write_bytes(b"half a png")
    shutil.copy(IMAGE, folder / "c.png")
    out = clf.classify(str(tmp_path / "d"))
    assert [type(r) for r in out] == [Prediction, Skipped, Prediction]
    assert out[1].path == str(folder / "b.png") and "b.png" in out[1].reason and out[1].label == 3
    assert out[0].ranking == out[2].ranking and out[0].label == 3
    assert isinstance(clf.explain(str(tmp_path / "d"))[1], Skipped)
    one_line_error(lambda: clf.classify(str(folder / "b.png")), "b.png")            # alone: its error
    one_line_error(lambda: clf.classify(str(tmp_path / "nope.png")), "nope.png", "no such file")


def test_numpy_arrays_are_taken(clf):
    want = clf.classify(str(IMAGE)).ranking
    rgb = np.asarray(Image.open(IMAGE).convert("RGB"))
    assert clf.classify(rgb).ranking == want
    assert clf.classify(np.asarray(Image.open(IMAGE))).ranking == want                # H×W grey
    assert clf.classify(clf.preprocess(IMAGE).numpy()).ranking == want              # 3×R×R float
    assert [p.ranking for p in clf.classify(np.stack([rgb, rgb]))] == [want, want]
    one_line_error(lambda: clf.classify(rgb.astype(np.float32)), "numpy array", "uint8")


@pytest.mark.parametrize("images, says", [
    (IMAGE.read_bytes(), "encoded image bytes"),
    (None, "cannot classify None"),
    (torch.full((3, 8, 8), float("nan")), "NaN"),
    ([[str(IMAGE)]], "nested list"),
    ([], "no images"),
    (3.5, "cannot classify a float"),
    (Image.new("RGB", (0, 0)), "empty (0×0) PIL image"),
])
def test_what_is_not_an_image_is_refused_at_the_door(clf, images, says):
    one_line_error(lambda: clf.classify(images), says)


@pytest.mark.parametrize("images, labels, says", [
    ([str(IMAGE)] * 3, [3], "1 labels were given for 3 images"),
    ([str(IMAGE)] * 2, "35", "one label ('35') was given for 2 images"),
    (str(IMAGE), "35", "out of range"),
    (str(EXAMPLES / "3"), 3, "one label (3) was given for 2 images"),
])
def test_labels_of_the_wrong_shape_are_refused(clf, images, labels, says):
    one_line_error(lambda: clf.classify(images, labels=labels), says)
    one_line_error(lambda: clf.explain(images, labels=labels), says)


def test_labels_given_fill_the_results(clf, threes):
    preds = clf.classify([str(IMAGE), Image.open(IMAGE)], labels=[3, None])
    assert [p.label for p in preds] == [3, None]
    assert [p.label for p in clf.classify(str(threes), labels=["8", None])] == [8, 3]   # None: the folder's


@pytest.mark.parametrize("kwargs, says", [
    ({"extensions": "ten.ext.pt"}, ["extensions=['ten.ext.pt']"]),
    ({"batch_size": 0}, ["batch_size", "positive"]),
    ({"dtype": torch.float64}, ["float64", "fp32"]),
    ({"dtype": torch.int8}, ["int8"]),
    ({"dtype": "float64"}, ["unknown dtype"]),
])
def test_from_pretrained_refuses_what_would_fail_deep_inside(kwargs, says):
    with pytest.raises(AvarcError) as err:
        Classifier.from_pretrained("digits", device="cpu", **kwargs)
    assert all(s in f"{err.value.option} {err.value}" for s in says), str(err.value)


def test_saving_an_explanation_where_it_cannot_be_written_names_the_place(clf, tmp_path):
    ex = clf.explain(str(IMAGE))
    assert isinstance(ex, Explanation)
    (tmp_path / "file.txt").write_text("x")
    one_line_error(lambda: ex.save(tmp_path / "file.txt" / "why.png"), "why.png", "file.txt is a file")
    (tmp_path / "folder.png").mkdir()
    one_line_error(lambda: ex.save(tmp_path / "folder.png"), "folder.png", "is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "folder.png"]      # nothing half-written
    assert ex.save(tmp_path / "ok.png").exists() and (tmp_path / "ok.npz").exists()
