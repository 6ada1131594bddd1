"""What to classify: image files and folders, their labels, and the candidate classes.

Folders are read recursively in a sorted, stable order; every non-hidden file is an input (PIL decides what it
can open; what it cannot becomes a skipped record). In labelled mode the first sub-folder below an input folder
names the class: an ImageNet synset (``n01440764``), a class index (ImageNet-V2's ``0`` … ``999``) or one of the
model's class names. Dataset presets and synset subsets restrict the candidate classes as the paper's
evaluation does; labelled images whose class is not a candidate are left out.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
from PIL import Image

from ..choices import LABELS
from ..errors import AvarcError, did_you_mean
from . import hf_data
from .files import absolute
from .objectnet import DEFAULT_BORDER, read_objectnet
from .preprocess import load_pixels, open_image, preprocess_pil

IMAGENET_CLASSES = 1000
LABEL_MODES = LABELS
_SYNSET = re.compile(r"n\d{8}")


def _data_file(name: str) -> str:
    return resources.files("avarc").joinpath("data").joinpath(name).read_text()   # one name a call: Python 3.10


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """(synset, name) of the 1000 ImageNet-1k classes in class-index order."""
    index = json.loads(_data_file("imagenet_class_index.json"))
    return tuple((index[str(i)][0], index[str(i)][1]) for i in range(IMAGENET_CLASSES))


@lru_cache(maxsize=1)
def _variant_classes() -> dict:
    return json.loads(_data_file("imagenet_variant_classes.json"))


@dataclass(frozen=True)
class DatasetPreset:
    """How a standard evaluation set is laid out: its class folders are ``synset`` or ``index`` names, and it may
    cover only some of the 1000 classes (``candidates``)."""

    name: str
    folders: str
    candidates: tuple[int, ...] | None
    description: str


def _preset_candidates(key: str) -> tuple[int, ...]:
    return tuple(sorted(_variant_classes()[key]["indices"]))


def dataset_presets() -> dict[str, DatasetPreset]:
    return {
        "imagenet": DatasetPreset("imagenet", "synset", None, "ImageNet-1k val: synset folders, 1000 classes"),
        "imagenet-v2": DatasetPreset("imagenet-v2", "index", None, "ImageNet-V2: class-index folders 0…999"),
        "imagenet-a": DatasetPreset("imagenet-a", "synset", _preset_candidates("imagenet-a"),
                                    "ImageNet-A: synset folders, candidates restricted to its 200 classes"),
        "imagenet-r": DatasetPreset("imagenet-r", "synset", _preset_candidates("imagenet-r"),
                                    "ImageNet-R: synset folders, candidates restricted to its 200 classes"),
        "imagenet-sketch": DatasetPreset("imagenet-sketch", "synset", None,
                                         "ImageNet-Sketch: synset folders, 1000 classes"),
        "objectnet": DatasetPreset("objectnet", "objectnet", None, "ObjectNet: the objectnet-1.0 release, read "
                                   "through its mappings; the 125 ImageNet classes of its 113 overlapping classes"),
    }


SUBSETS = ("imagenet100", "imageneta100", "imagenetr100")


def read_subset(name_or_path: str | os.PathLike) -> list[str]:
    """A shipped synset list (``imagenet100``, ``imageneta100``, ``imagenetr100``) or a file of synsets, one a line."""
    key = str(name_or_path)
    if key in SUBSETS:
        text, where = _data_file(f"{key}.txt"), key
    else:
        path = Path(key)
        if not path.is_file():
            raise AvarcError(f"{key}: no such subset file; use one of {', '.join(SUBSETS)} "
                             "or a file of synsets, one a line")
        text, where = path.read_text(errors="replace"), str(path)
    synsets = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    bad = next((s for s in synsets if not _SYNSET.fullmatch(s)), None)
    if bad is not None or not synsets:
        raise AvarcError(f"{where}: {'not a synset: ' + repr(bad) if bad else 'no synsets'}; "
                         "a subset file lists ImageNet synsets like n01440764, one a line")
    return synsets


class ClassSpace:
    """A model's classes: names for records, and every way a user may name one (index, name, synset)."""

    def __init__(self, model):
        self.num_classes = model.num_classes
        self.imagenet = model.spec.var.num_classes == IMAGENET_CLASSES
        own_names = bool(model.spec.class_names) or self.num_classes > model.spec.var.num_classes
        inet = imagenet_classes() if self.imagenet else ()
        self.names = [inet[i][1] if self.imagenet and not model.spec.class_names else model.class_name(i)
                      for i in range(self.num_classes)]
        self._by_name: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            self._by_name.setdefault(name.lower(), []).append(i)
        self._own = {model.class_name(i): i for i in range(self.num_classes)} if own_names else {}
        self._by_synset = {s: i for i, (s, _) in enumerate(inet)}

    def synset_index(self, synset: str, where: str) -> int:
        if not self.imagenet:
            raise AvarcError(f"{where}: synset {synset} names an ImageNet class but this model has "
                             f"{self.num_classes} classes; use the model's class names or indices")
        if synset not in self._by_synset:
            raise AvarcError(f"{where}: {synset} is not one of the 1000 ImageNet-1k synsets; fix the name")
        return self._by_synset[synset]

    def parse(self, token: str, where: str) -> int:
        """A class named by the model's own name, a synset, an index or an ImageNet name (``tench``)."""
        token = token.strip()
        if token in self._own:
            return self._own[token]
        if _SYNSET.fullmatch(token):
            return self.synset_index(token, where)
        if token.isdigit():
            idx = int(token)
            if idx < self.num_classes:
                return idx
            raise AvarcError(f"{where}: class index {idx} is out of range; "
                             f"this model has classes 0…{self.num_classes - 1}")
        hits = self._by_name.get(token.lower().replace(" ", "_"), [])
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise AvarcError(f"{where}: class name {token!r} is ambiguous (indices {', '.join(map(str, hits))}); "
                             "name the class by index or synset")
        raise AvarcError(f"{where}: {token!r} is not a class of this model; use a class index 0…{self.num_classes - 1}"
                         + (", a synset or an ImageNet class name" if self.imagenet else " or a class name"))


class RowSource(Protocol):
    """A table of images (a Hugging Face dataset split): row → decoded image, or AvarcError naming the row; ``key``
    names the split with its path resolved, ``fingerprint`` is its content's."""

    key: str
    fingerprint: str

    def image(self, row: int) -> Image.Image: ...


@dataclass(frozen=True)
class Item:
    """One input image: ``path`` as the user can open it (a dataset row: ``DATASET[split]#ROW``) and its ``label`` (a
    class index) in labelled mode.
    ObjectNet's items name their own class (``label_name``), accept any of several ImageNet classes
    (``accepted``, ``label`` the first) and lose a ``border`` of pixels on each side before preprocessing."""

    path: str
    label: int | None = None
    label_name: str | None = None
    accepted: tuple[int, ...] = ()
    border: int = 0
    source: RowSource | None = field(default=None, compare=False, repr=False)
    row: int | None = None

    @property
    def file(self) -> str:
        """What ``--resume`` matches on: a file's absolute path (symlinks resolved), a row's split (its path resolved
        the same way) and row number."""
        return f"{self.source.key}#{self.row}" if self.source is not None else str(absolute(self.path))

    def open(self) -> Image.Image:
        """The decoded RGB image, its border cropped; AvarcError (one line naming it) when it cannot be read."""
        img = self.source.image(self.row) if self.source is not None and self.row is not None else open_image(self.path)
        b = self.border
        if b:
            if min(img.size) <= 2 * b:
                raise AvarcError(f"{self.path}: {img.size[0]}×{img.size[1]} pixels leave nothing after cropping "
                                 f"a {b}-pixel border")
            img = img.crop((b, b, img.size[0] - b, img.size[1] - b))
        return img

    def pixels(self, size: int, mode: str = "official") -> np.ndarray | str:
        """The model's input pixels, or the one-line reason the image cannot be used (a skipped record)."""
        if self.source is None and not self.border:
            return load_pixels(self.path, size, mode)
        try:
            return preprocess_pil(self.open(), size, mode)
        except AvarcError as e:
            return str(e)
        except Exception as e:  # decoders raise many types; record, go on
            return f"{self.path}: not a readable image ({type(e).__name__}: {e})"

    def record_label(self, rank_of: Callable[[int], int | None]) -> int | None:
        """The label a result keeps: with several accepted classes, the one the prediction ranked best (so its rank
        is the label's rank, and it survived every stage any accepted class survived)."""
        if len(self.accepted) < 2:
            return self.label
        return min(self.accepted, key=lambda c: (rank_of(c) is None, rank_of(c) or 0))


@dataclass(frozen=True)
class Inputs:
    items: list[Item]
    candidates: list[int]
    labelled: bool
    left_out: int = 0      # labelled images whose class is not a candidate
    # what the reader skipped, one line each (ObjectNet's folders without ImageNet classes)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataOptions:
    """How to read inputs that are not plain image folders (a dataset's split and columns, ObjectNet's border), and
    how many images of each class to take."""

    split: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    border: int = DEFAULT_BORDER
    per_class: int | None = None      # only the first N images of each class


def read_list(path: str | os.PathLike) -> list[str]:
    """``--from-list``: image paths, one a line, in the README's format. The file is UTF-8 (a leading BOM is
    dropped; bytes that are not UTF-8, as ``find > list.txt`` writes them, are kept surrogate-escaped, so such names
    open); each line is a name taken verbatim (spaces kept; only the line ending, ``\n`` or ``\r\n``, is cut);
    a line that is empty or only spaces is skipped, and a line whose first character is ``#`` is a comment (list
    a file whose name starts with ``#`` as ``./#name``). Relative names are taken from the list file's folder, or
    from the current folder when the list is a stream (a pipe, a FIFO, ``<(find …)``), which has no folder."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            stream = not os.path.isfile(path)
            data = f.read()
    except FileNotFoundError:
        raise AvarcError(f"{path}: no such list file; pass a text file of image paths, one a line",
                         option="from_list") from None
    except OSError as e:
        raise AvarcError(f"{path}: cannot read the list ({e.strerror}); pass a readable text file of image paths, "
                         "one a line", option="from_list") from None
    if b"\0" in data:
        raise AvarcError(f"{path}: not a text file (it holds NUL bytes); pass a text file of image paths, one a line",
                         option="from_list")
    text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")
    names = [line.removesuffix("\r") for line in text.split("\n")]
    base = Path() if stream else path.parent
    out = [str(base / name) for name in names if name.strip() and not name.startswith("#")]
    if not out:
        raise AvarcError(f"{path}: lists no image paths; write one path a line", option="from_list")
    return out


def _walk(folder: Path) -> list[Path]:
    """Every non-hidden file below ``folder``, sorted by path components (stable across machines). Folder symlinks
    are followed once (a link back up the tree is not walked again); a file symlink loop stays an input and becomes
    a skipped record."""
    found: list[Path] = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / f for f in files if not f.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def _class_folder(path: Path, root: Path) -> str | None:
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) >= 2 else None


def _folder_label(space: ClassSpace, name: str, folder_kind: str | None, where: str) -> int:
    if folder_kind == "synset" and not _SYNSET.fullmatch(name):
        raise AvarcError(f"{where}: this dataset's class folders are synsets like n01440764, found {name!r}; "
                         "check the dataset root you passed")
    if folder_kind == "index" and not name.isdigit():
        raise AvarcError(f"{where}: this dataset's class folders are class indices 0…999, found {name!r}; "
                         "check the dataset root you passed")
    return space.parse(name, where)


def parse_classes(space: ClassSpace, text: str) -> list[int]:
    """Comma-separated indices, synsets or names → class indices."""
    try:
        out = [space.parse(tok, text) for tok in text.split(",") if tok.strip()]
    except AvarcError as e:
        raise AvarcError(str(e), option="classes") from None
    if not out:
        raise AvarcError("no classes given; list indices, synsets or names separated by commas", option="classes")
    return list(dict.fromkeys(out))


def collect(inputs: Sequence[str | os.PathLike], space: ClassSpace, labels: str = "auto", dataset: str | None = None,
            subset: str | None = None, classes: str | None = None, exclude: Iterable[str | os.PathLike] = (),
            data: DataOptions = DataOptions()) -> Inputs:
    """Inputs (files, folders, Hugging Face datasets) → the ordered image list, their labels and the candidate
    classes."""
    if labels not in LABEL_MODES:
        raise AvarcError(f"unknown label mode {labels!r}; use {', '.join(LABEL_MODES)}")
    preset = None
    if dataset is not None:
        presets = dataset_presets()
        if dataset not in presets:
            raise AvarcError(f"unknown dataset {dataset!r}{did_you_mean(dataset, presets)}; use one of "
                             f"{', '.join(presets)}", option="dataset")
        preset = presets[dataset]
        if not space.imagenet:
            raise AvarcError(f"{dataset} needs an ImageNet-1k model (1000 classes); this one has {space.num_classes}",
                             option="dataset")
        if labels == "none":
            raise AvarcError(f"{dataset} is a labelled evaluation; its labels cannot be turned off", option="labels")
        labels = "folders"
    if not inputs:
        raise AvarcError("no inputs; pass image files or folders")
    notes: tuple[str, ...] = ()
    candidates = list(range(space.num_classes))
    if preset is not None and preset.folders == "objectnet":
        items, notes, candidates = _objectnet(inputs, data.border)
        labelled = True
    elif any(hf_data.is_dataset(raw) for raw in inputs):
        found, labelled = hf_data.read_rows(inputs, space.parse, labels, data.split, data.image_column,
                                            data.label_column)
        items = [Item(path=f"{rows.where}#{i}", label=y, source=rows.images, row=i)
                 for rows in found for i, y in enumerate(rows.labels)]
    else:
        items, labelled = _files(inputs, space, labels, preset.folders if preset else None, exclude)
    if preset is not None and preset.candidates is not None:
        candidates = list(preset.candidates)
    if subset is not None:
        try:
            wanted = {space.synset_index(s, str(subset)) for s in read_subset(subset)}
        except AvarcError as e:
            raise AvarcError(str(e), option="subset") from None
        candidates = [c for c in candidates if c in wanted]
    if classes is not None:
        wanted = set(parse_classes(space, classes))
        candidates = [c for c in candidates if c in wanted]
    if not candidates:
        raise AvarcError("no candidate classes left after the dataset, subset and class restrictions; they have no "
                         "class in common")
    left_out = 0
    if labelled:
        allowed = set(candidates)
        kept = [it for it in items if it.label in allowed or allowed.intersection(it.accepted)
                or (it.label is None and it.source is not None)]       # a row without its label: a skipped record
        left_out = len(items) - len(kept)
        items = kept
        if not items:
            raise AvarcError("no labelled images belong to the candidate classes; "
                             "check the subset and class restrictions")
    if data.per_class is not None:
        items = _per_class(items, labelled, data.per_class)
    return Inputs(items=items, candidates=candidates, labelled=labelled, left_out=left_out, notes=notes)


def _per_class(items: list[Item], labelled: bool, n: int) -> list[Item]:
    """The first ``n`` images of each class in the inputs' fixed order (folders sorted, rows by number), so a
    resumed or sharded run takes the same ones: a balanced subset, as A-VARC's eval.py takes for quick checks."""
    if n < 1:
        raise AvarcError(f"must be at least 1, got {n}", option="per_class")
    if not labelled:
        raise AvarcError("takes the first images of each class, so it needs labelled inputs (class folders or a "
                         "dataset's label column)", option="per_class")
    seen: dict[int | None, int] = {}
    out = []
    for it in items:
        seen[it.label] = seen.get(it.label, 0) + 1
        if seen[it.label] <= n:
            out.append(it)
    return out


def check_inputs(inputs: Iterable[str | os.PathLike]) -> None:
    """Every input exists (a file, folder or link) or is a hub address: checked before a model loads, so a mistyped
    path fails at once, not after seconds of loading."""
    for raw in inputs:
        path = Path(raw)
        if not (path.exists() or path.is_symlink() or hf_data.is_hub(raw)):
            raise AvarcError(f"{raw}: no such file or folder")


def _files(inputs: Sequence[str | os.PathLike], space: ClassSpace, labels: str, folder_kind: str | None,
           exclude: Iterable[str | os.PathLike]) -> tuple[list[Item], bool]:
    skip = {absolute(p) for p in exclude}
    groups: list[tuple[Path | None, list[Path]]] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            files = [f for f in _walk(path) if absolute(f) not in skip]
            if not files:
                raise AvarcError(f"{path}: no files in this folder; point at a folder of images")
            groups.append((path, files))
        else:          # a FIFO, a broken link or a link loop becomes a skipped record
            check_inputs([path])
            groups.append((None, [path]))

    labelled = labels == "folders" or (labels == "auto" and _looks_labelled(groups, space))
    cache: dict[str, int] = {}
    items, seen = [], set()
    for root, files in groups:
        for f in files:
            resolved = absolute(f)
            if resolved in seen:
                continue
            seen.add(resolved)
            label = None
            if labelled:
                base = root if root is not None else f.parent.parent
                name = _class_folder(f, base)
                if name is None:
                    raise AvarcError(f"{f}: not inside a class folder; labelled mode reads the class from the first "
                                     "sub-folder (root/<class>/image), or classify without labels", option="labels")
                if name not in cache:
                    cache[name] = _folder_label(space, name, folder_kind, str(base / name))
                label = cache[name]
            items.append(Item(path=str(f), label=label))
    return items, labelled


def _objectnet(inputs: Sequence[str | os.PathLike], border: int) -> tuple[list[Item], tuple[str, ...], list[int]]:
    """The release's images of the classes with ImageNet counterparts; the other folders are counted, not read."""
    if len(inputs) != 1:
        raise AvarcError("objectnet reads one folder: the unpacked objectnet-1.0 release", option="dataset")
    if border < 0:
        raise AvarcError(f"the border to crop must be 0 or more pixels, got {border}", option="border")
    release = read_objectnet(inputs[0])
    items, skipped, skipped_images = [], 0, 0
    for folder in sorted(p for p in release.images.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _walk(folder)
        cls = release.classes.get(folder.name)
        if cls is None:
            skipped, skipped_images = skipped + 1, skipped_images + len(files)
            continue
        items += [Item(path=str(f), label=cls.accepted[0],
                       label_name=cls.name, accepted=cls.accepted, border=border) for f in files]
    if not items:
        raise AvarcError(f"{release.images}: no images in the folders of classes that overlap ImageNet; check the "
                         "release", option="dataset")
    notes = (f"note: skipped {skipped} ObjectNet folders ({skipped_images} images) whose classes have no ImageNet "
             "counterpart",) if skipped else ()
    return items, notes, release.candidates


def _looks_labelled(groups: list[tuple[Path | None, list[Path]]], space: ClassSpace) -> bool:
    """Every input is a folder whose files all sit in sub-folders named after classes."""
    if not groups or any(root is None for root, _ in groups):
        return False
    for root, files in groups:
        assert root is not None   # checked above
        for name in {_class_folder(f, root) for f in files}:
            if name is None:
                return False
            try:
                space.parse(name, str(root))
            except AvarcError:
                return False
    return True
