"""The ObjectNet release as an ImageNet-1k evaluation, read through the release's own mapping files.

Layout: ``objectnet-1.0/images/<folder>/<image>`` and ``objectnet-1.0/mappings/`` holding
``folder_to_objectnet_label.json`` (folder → ObjectNet class), ``objectnet_to_imagenet_1k.json`` (ObjectNet class →
``"; "``-separated ImageNet class names), ``imagenet_to_label_2012_v2`` (the ImageNet names, one a line in ILSVRC-2012
id order) and ``pytorch_to_imagenet_2012_id.json`` (class index → ILSVRC-2012 id). Only the ObjectNet classes with an
ImageNet counterpart are evaluated, against the ImageNet classes they map to; an image is right when the prediction
is any of its class's ImageNet classes. Public evaluations crop a 2-pixel border (the photos carry a frame).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import AvarcError

DEFAULT_BORDER = 2
MAPPINGS = ("folder_to_objectnet_label.json", "objectnet_to_imagenet_1k.json", "imagenet_to_label_2012_v2",
            "pytorch_to_imagenet_2012_id.json")


@dataclass(frozen=True)
class ObjectNetClass:
    folder: str
    name: str                        # the ObjectNet class name
    accepted: tuple[int, ...]        # ImageNet-1k class indices that count as right


@dataclass(frozen=True)
class ObjectNet:
    images: Path
    classes: dict[str, ObjectNetClass]      # folder → class, only those with ImageNet counterparts

    @property
    def candidates(self) -> list[int]:
        return sorted({c for cls in self.classes.values() for c in cls.accepted})


def _bad(path: Path, what: str) -> AvarcError:
    return AvarcError(f"{path}: {what}; restore it from the ObjectNet release (objectnet-1.0/mappings/)",
                      option="dataset")


def _json(path: Path, kind: type) -> dict:
    if not path.is_file():
        raise _bad(path, "missing mapping file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=lambda pairs: _unique(path, pairs))
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(path, f"not valid JSON ({e})") from None
    except RecursionError:
        raise _bad(path, "nested too deeply to be a mapping file") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, kind) for k, v in data.items()):
        raise _bad(path, f"not a JSON object of names to {kind.__name__} values")
    return data


def _unique(path: Path, pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose names are each given once (``json`` would keep the last of a repeated one silently)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _bad(path, f"names {key!r} twice")
        out[key] = value
    return out


def find_root(root: Path) -> Path:
    """The release folder: ``root`` itself, or its ``objectnet-1.0`` sub-folder."""
    for cand in (root, root / "objectnet-1.0"):
        if (cand / "images").is_dir() and (cand / "mappings").is_dir():
            return cand
    raise AvarcError(f"{root}: not an ObjectNet release; pass the unpacked objectnet-1.0/ folder (it holds images/ "
                     "and mappings/)", option="dataset")


def read_objectnet(root: str | os.PathLike[str]) -> ObjectNet:
    """The release's folders and their ImageNet classes; a missing or malformed mapping file is one error naming it."""
    base = find_root(Path(root))
    maps = base / "mappings"
    folders = _json(maps / MAPPINGS[0], str)
    to_imagenet = _json(maps / MAPPINGS[1], str)
    names_file = maps / MAPPINGS[2]
    if not names_file.is_file():
        raise _bad(names_file, "missing mapping file")
    names = [line.strip() for line in names_file.read_text(encoding="utf-8", errors="replace").splitlines()]
    pytorch = _json(maps / MAPPINGS[3], int)
    try:
        index_of_2012 = {v: int(k) for k, v in pytorch.items()}
    except ValueError:
        raise _bad(maps / MAPPINGS[3], "keys are not class indices 0…999") from None
    if len(index_of_2012) != 1000 or sorted(index_of_2012.values()) != list(range(1000)):
        raise _bad(maps / MAPPINGS[3], "does not map the 1000 class indices one to one")
    if len(names) < 1000:
        raise _bad(names_file, f"lists {len(names)} ImageNet names, not the 1000 of ILSVRC-2012")
    if not all(0 <= i < len(names) for i in index_of_2012):
        raise _bad(maps / MAPPINGS[3], f"maps to ILSVRC-2012 ids outside the {len(names)} lines of {MAPPINGS[2]}")
    by_name: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if i in index_of_2012:
            by_name.setdefault(name, []).append(index_of_2012[i])
    classes = {}
    for folder, label in folders.items():
        if label not in to_imagenet:
            continue
        accepted = []
        for name in to_imagenet[label].split("; "):
            if name not in by_name:
                raise _bad(maps / MAPPINGS[1], f"{label!r} maps to {name!r}, which {MAPPINGS[2]} does not name")
            accepted += by_name[name]
        classes[folder] = ObjectNetClass(folder, label, tuple(sorted(set(accepted))))
    if not classes:
        raise _bad(maps / MAPPINGS[1], "maps no folder's class to ImageNet")
    return ObjectNet(base / "images", classes)
