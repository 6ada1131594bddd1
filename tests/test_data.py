"""avarc.io.data: which files are inputs, in which order, with which labels and candidate classes."""
from __future__ import annotations

import pytest

from avarc import AvarcError, ModelSpec, VARSpec, VQVAESpec, build_model, official_spec
from avarc.io.data import ClassSpace, collect, dataset_presets, imagenet_classes, parse_classes, read_subset


@pytest.fixture(scope="module")
def imagenet_space() -> ClassSpace:
    return ClassSpace(build_model(official_spec("d16"), "meta"))      # a real 1000-class model, no weights


def small_space(names: tuple[str, ...] = ()) -> ClassSpace:
    var = VARSpec(depth=1, embed_dim=64, num_heads=1, num_classes=10, patch_nums=(1, 2, 4))
    return ClassSpace(build_model(ModelSpec(VQVAESpec(), var, 64, class_names=names), "meta"))


def touch(path, data: bytes = b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folders_are_walked_recursively_sorted_and_hidden_files_ignored(tmp_path):
    for rel in ("b/2.png", "a/10.jpg", "a/1.png", "a/sub/0.webp", ".hidden/x.png", "a/.DS_Store", "c.png"):
        touch(tmp_path / "in" / rel)
    single = touch(tmp_path / "one.jpg")
    found = collect([tmp_path / "in", single, tmp_path / "in" / "c.png"], small_space())
    assert [it.path for it in found.items] == [str(tmp_path / "in" / rel) for rel in ("a/1.png", "a/10.jpg",
                                                                                    "a/sub/0.webp", "b/2.png", "c.png")
                                               ] + [str(single)]
    assert not found.labelled and all(it.label is None for it in found.items)   # c.png is not in a class folder
    assert found.candidates == list(range(10))


def test_class_folders_named_by_index_or_model_class_name_label_the_images(tmp_path):
    for rel in ("3/a.png", "3/b.png", "7/deep/c.png"):
        touch(tmp_path / rel)
    found = collect([tmp_path], small_space())
    assert found.labelled and [(it.path, it.label) for it in found.items] == [(str(tmp_path / "3/a.png"), 3),
                                                                              (str(tmp_path / "3/b.png"), 3),
                                                                              (str(tmp_path / "7/deep/c.png"), 7)]
    named = tmp_path / "named"
    touch(named / "seven" / "x.png")
    names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    assert collect([named], small_space(names)).items[0].label == 7
    assert not collect([named], small_space()).labelled                      # not a class of this model: unlabelled
    with pytest.raises(AvarcError, match="'seven' is not a class of this model"):
        collect([named], small_space(), labels="folders")
    assert collect([tmp_path / "3"], small_space(), labels="none").items[0].label is None


def test_imagenet_synsets_v2_indices_and_names(tmp_path, imagenet_space):
    touch(tmp_path / "val" / "n01443537" / "goldfish.JPEG")
    touch(tmp_path / "val" / "n01440764" / "tench.JPEG")
    found = collect([tmp_path / "val"], imagenet_space, dataset="imagenet")
    assert [(it.path, it.label) for it in found.items] == [(str(tmp_path / "val/n01440764/tench.JPEG"), 0),
                                                           (str(tmp_path / "val/n01443537/goldfish.JPEG"), 1)]
    assert len(found.candidates) == 1000 and imagenet_space.names[1] == "goldfish"
    touch(tmp_path / "v2" / "999" / "a.jpeg")
    assert collect([tmp_path / "v2"], imagenet_space, dataset="imagenet-v2").items[0].label == 999
    with pytest.raises(AvarcError, match="class folders are class indices 0…999, found 'n01440764'"):
        collect([tmp_path / "val"], imagenet_space, dataset="imagenet-v2")
    assert parse_classes(imagenet_space, "tench, n01443537,2,Great White Shark") == [0, 1, 2]
    with pytest.raises(AvarcError, match="'crane' is ambiguous"):
        parse_classes(imagenet_space, "crane")


def test_imagenet_a_and_r_restrict_candidates_to_their_200_classes(tmp_path, imagenet_space):
    presets = dataset_presets()
    a, r = presets["imagenet-a"].candidates, presets["imagenet-r"].candidates
    assert len(a) == len(r) == 200 and a[:3] == (6, 11, 13) and r[:3] == (1, 2, 4)
    synsets = [s for s, _ in imagenet_classes()]
    touch(tmp_path / "a" / synsets[6] / "x.jpg")
    touch(tmp_path / "a" / synsets[0] / "y.jpg")      # not an ImageNet-A class: left out
    found = collect([tmp_path / "a"], imagenet_space, dataset="imagenet-a")
    assert found.candidates == list(a) and [it.label for it in found.items] == [6] and found.left_out == 1


def test_subset_restricts_candidates_and_labelled_images(tmp_path, imagenet_space):
    sub = read_subset("imagenet100")
    assert len(sub) == 100 and sub[0] == "n02869837"
    inside, outside = sub[0], "n01440764"
    assert outside not in sub
    touch(tmp_path / inside / "1.png")
    touch(tmp_path / outside / "2.png")
    found = collect([tmp_path], imagenet_space, dataset="imagenet", subset="imagenet100")
    assert len(found.candidates) == 100 and [it.path for it in found.items] == [str(tmp_path / inside / "1.png")]
    custom = touch(tmp_path.parent / "mine.txt", f"# two classes\n{inside}\n{outside}\n".encode())
    assert sorted(collect([tmp_path], imagenet_space, subset=str(custom)).candidates) == sorted(
        imagenet_space.parse(s, "") for s in (inside, outside))
    touch(tmp_path.parent / "bad.txt", b"tench\n")
    with pytest.raises(AvarcError, match="not a synset: 'tench'"):
        read_subset(tmp_path.parent / "bad.txt")


def test_classes_restrict_candidates_for_unlabelled_images(tmp_path):
    touch(tmp_path / "img.png")
    assert collect([tmp_path], small_space(), classes="7,2,7").candidates == [2, 7]
    with pytest.raises(AvarcError, match="class index 12 is out of range"):
        collect([tmp_path], small_space(), classes="12")


def test_empty_or_missing_inputs_and_wrong_presets_are_one_line_errors(tmp_path, imagenet_space):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AvarcError, match="empty: no files in this folder"):
        collect([tmp_path / "empty"], small_space())
    with pytest.raises(AvarcError, match="nope: no such file or folder"):
        collect([tmp_path / "nope"], small_space())
    touch(tmp_path / "x" / "a.png")
    with pytest.raises(AvarcError, match="needs an ImageNet-1k model"):
        collect([tmp_path / "x"], small_space(), dataset="imagenet-a")
    with pytest.raises(AvarcError, match="unknown dataset 'imagenet-b'"):
        collect([tmp_path / "x"], imagenet_space, dataset="imagenet-b")
    with pytest.raises(AvarcError, match="synset n01440764 names an ImageNet class but this model has 10 classes"):
        collect([tmp_path / "x"], small_space(), classes="n01440764")
