"""Hugging Face ``datasets`` as inputs (the optional ``avarc[datasets]`` extra): a ``save_to_disk`` folder, parquet
files or a folder of them, or ``hf://datasets/OWNER/NAME`` from the hub (fetched into the HF cache rather than
streamed: resuming and the batch loader take rows by number; ``HF_HUB_OFFLINE=1`` reads the cache and asks nothing).

A row becomes an :class:`~core.io.data.Item` whose ``path`` is ``DATASET[split]#ROW`` (what records show and
``--resume`` matches on). The image column is the split's ``Image`` feature and the label column its ``ClassLabel``
feature unless named; class names are the ``ClassLabel`` names, read as folder names are (a synset, an index or a
model class name). Images are decoded by avarc, row by row, so an unreadable row becomes a skipped record.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, ParamSpec, Sequence, TypeVar

import numpy as np
from PIL import Image

from ..errors import AvarcError
from ..models.checkpoints import file_sha256
from .files import absolute
from .hub import HubUnreachable, check_reachable
from .preprocess import open_image, preprocess_pil

_HUB = re.compile(r"hf:/+datasets/(?P<repo>.*)")     # a shell Path folds hf:// to hf:/


def _parquet_folder(path: Path) -> bool:
    """A folder of parquet files: it holds some and no image files (a README, a LICENSE or notes may sit beside)."""
    images = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    files = [f for f in path.rglob("*")
             if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)]
    return any(f.suffix == ".parquet" for f in files) and not any(f.suffix.lower() in images for f in files)


def is_hub(raw: str | os.PathLike) -> bool:
    """An ``hf://datasets/…`` address."""
    return bool(_HUB.fullmatch(str(raw)))


def is_dataset(raw: str | os.PathLike) -> bool:
    """A hub address, a parquet file, a ``save_to_disk`` folder or a folder of parquet files."""
    path = Path(raw)
    if is_hub(raw):
        return True
    if path.is_file():
        return path.suffix == ".parquet"
    if not path.is_dir():
        return False
    saved = (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    return saved or _parquet_folder(path)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise AvarcError("reading Hugging Face datasets needs the optional extra: "
                         "pip install 'avarc[datasets]'") from None
    return datasets


def _splits(name: str, found: dict, split: str | None):
    if split is None:
        if len(found) == 1:
            return next(iter(found.items()))
        raise AvarcError(f"{name}: has splits {', '.join(found)}; choose one with --split", option="split")
    if split not in found:
        raise AvarcError(f"{name}: no split {split!r}; its splits: {', '.join(found)}", option="split")
    return split, found[split]


def display(raw: str | os.PathLike) -> str:
    """How records and messages name an input (a shell path folds ``hf://`` to ``hf:/``; shown as written)."""
    hub = _HUB.fullmatch(str(raw))
    return f"hf://datasets/{hub['repo'].strip('/')}" if hub else str(raw)


def _quiet(read: Callable[_P, _R]) -> Callable[_P, _R]:
    """``read`` with datasets' progress bars off ("Generating train split" on stderr: the CLI shows its own progress,
    the library prints nothing), put back as they were after."""
    @functools.wraps(read)
    def quiet(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        bars = _datasets().utils.logging
        was = bars.is_progress_bar_enabled()
        bars.disable_progress_bar()
        try:
            return read(*args, **kwargs)
        finally:
            if was:
                bars.enable_progress_bar()
    return quiet


@_quiet
def load_split(raw: str, split: str | None):
    """(split name, ``datasets.Dataset``) of one input."""
    ds_lib = _datasets()
    raw = display(raw)
    path = Path(raw)
    try:
        hub = _HUB.fullmatch(raw)
        if hub:
            repo = hub["repo"].strip("/")
            if repo.count("/") != 1:
                raise AvarcError(f"{raw}: not a hub dataset address; write hf://datasets/OWNER/NAME")
            found = _from_hub(ds_lib, raw, repo)
        elif path.is_file():
            found = {split or "train": ds_lib.Dataset.from_parquet(str(path))}
        elif (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            found = ds_lib.load_from_disk(str(path))
            if isinstance(found, ds_lib.Dataset):
                found = {str(found.split) if found.split is not None else (split or "train"): found}
        else:
            found = ds_lib.load_dataset("parquet", data_files=_parquet_splits(path))
    except AvarcError:
        raise
    except ConnectionError as e:
        if "offline" in str(e).lower():
            raise AvarcError(f"{raw}: not in the HF cache and HF_HUB_OFFLINE is set; run once online to cache it")
        raise AvarcError(f"{raw}: cannot reach the hub ({str(e).splitlines()[0]}); check the network or HF_ENDPOINT")
    except (FileNotFoundError, ValueError, OSError) as e:
        if "split" in str(e).lower() and split:
            raise AvarcError(f"{raw}: no split {split!r} ({str(e).splitlines()[0]})", option="split") from None
        raise AvarcError(f"{raw}: cannot read this dataset ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    except Exception as e:    # the hub client and arrow raise many types; one line, never a traceback
        raise AvarcError(f"{raw}: cannot read this dataset ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return _splits(raw, dict(found), split)


def _from_hub(ds_lib, raw: str, repo: str):  # noqa: ANN001, ANN202 (the datasets module; a DatasetDict)
    """A hub dataset, as ``download`` fetches a model: the hub is probed first, and when it does not answer the HF
    cache is read as ``HF_HUB_OFFLINE=1`` would (one line if the dataset is not there) instead of waiting through
    the clients' retries."""
    from huggingface_hub import constants

    try:
        if not constants.HF_HUB_OFFLINE:
            check_reachable(raw, "the dataset is needed from it")
        return ds_lib.load_dataset(repo)
    except HubUnreachable as unreachable:
        before = constants.HF_HUB_OFFLINE, ds_lib.config.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = ds_lib.config.HF_HUB_OFFLINE = True
        try:
            return ds_lib.load_dataset(repo)
        except Exception:        # not cached: the hub's line says what to do
            raise AvarcError(str(unreachable).replace("the dataset is needed from it", "the dataset is not cached"))\
                from None
        finally:
            constants.HF_HUB_OFFLINE, ds_lib.config.HF_HUB_OFFLINE = before


def _column(name: str, ds, wanted: str | None, kind, what: str, option: str) -> str | None:
    features = ds.features
    if wanted is not None:
        if wanted not in features:
            raise AvarcError(f"{name}: no column {wanted!r}; its columns: {', '.join(features)}", option=option)
        if not isinstance(features[wanted], kind):
            raise AvarcError(f"{name}: column {wanted!r} holds {features[wanted]!r}, not {what}; pass a column of "
                             f"{what} (columns: {', '.join(features)})", option=option)
        return wanted
    hits = [c for c, f in features.items() if isinstance(f, kind)]
    if len(hits) > 1:
        raise AvarcError(f"{name}: several columns hold {what} ({', '.join(hits)}); "
                         f"choose one with --{option.replace('_', '-')}",
                         option=option)
    return hits[0] if hits else None


def _parquet_splits(path: Path) -> dict[str, list[str]]:
    """A parquet folder's splits as ``datasets`` names them from the file names, each only its parquet files (a
    LICENSE or notes beside them are not data)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    found = DataFilesDict.from_patterns(get_data_patterns(str(path)), str(path))
    splits = {name: [f for f in files if f.endswith(".parquet")] for name, files in found.items()}
    return {name: files for name, files in splits.items() if files}


def _plain_images(ds, ds_lib):  # noqa: ANN001, ANN202 (a datasets.Dataset)
    """Columns of ``struct<bytes, path>`` without the HF ``Image`` metadata (a parquet written by plain pyarrow or
    pandas) read as images, as the ``Image`` feature stores them."""
    plain = [c for c, f in ds.features.items() if isinstance(f, dict) and set(f) == {"bytes", "path"}]
    for column in plain:
        ds = ds.cast_column(column, ds_lib.Image(decode=False))
    return ds


class SplitImages:
    """One split's image column, decoded on demand (arrow reads are safe from the loader's threads). ``key`` names the
    split whatever the spelling of its path (``--resume`` matches rows on it); ``fingerprint`` is the dataset's own
    (its content, as ``datasets`` hashes it), part of the run's identity."""

    def __init__(self, where: str, ds, column: str, key: str | None = None, unlabelled: dict[int, str] | None = None,
                 fingerprint: str | None = None):
        self.where, self.column, self.key = where, column, key or where
        self.fingerprint = fingerprint or str(getattr(ds, "_fingerprint", "") or "")
        self.table = ds.select_columns([column]).cast_column(column, _datasets().Image(decode=False))
        self.unlabelled = unlabelled or {}      # row → why it has no class (a labelled split's missing label)

    def image(self, row: int) -> Image.Image:
        where = f"{self.where}#{row}"
        if row in self.unlabelled:
            raise AvarcError(f"{where}: {self.unlabelled[row]}")
        value = self.table[row][self.column]
        if not value or (value.get("bytes") is None and not value.get("path")):
            raise AvarcError(f"{where}: no image in this row")
        if value.get("bytes") is None:
            return open_image(value["path"])
        return open_image(where, value["bytes"])


def content_fingerprint(path: Path, split: str) -> str:
    """A local dataset's fingerprint by content: the SHA-256 of its files (a folder's by their relative names) and
    the split, so a dataset rewritten under its name is another, while ``touch`` or a copy keeps it (``datasets``'
    own fingerprint of a local file follows its modification time)."""
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    parts = [split, *(f"{f.relative_to(path) if f != path else ''}:{file_sha256(f)}" for f in files)]
    return hashlib.sha256("\n".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def datasets_fingerprint(fingerprints: Iterable[str]) -> str | None:
    """The run identity's ``inputs``: the datasets' own fingerprints together, so a dataset rewritten under the same
    name is another run; None without datasets (image files are each keyed by their path)."""
    prints = sorted(set(fingerprints))
    return hashlib.sha256("\n".join(prints).encode()).hexdigest()[:16] if prints else None


@dataclass
class Rows:
    """One split's rows: ``where`` (``DATASET[split]``), its images, and each row's class index (None: unlabelled)."""
    where: str
    images: SplitImages
    labels: list[int | None]


def read_rows(inputs: Sequence[str | os.PathLike], parse: Callable[[str, str], int], labels: str, split: str | None,
              image_column: str | None, label_column: str | None) -> tuple[list[Rows], bool]:
    """Every dataset input's rows, labelled from its ``ClassLabel`` column (names read by ``parse``, as folder
    names are) where every input has one and ``labels`` allows."""
    ds_lib = _datasets()
    splits, content = [], {}
    for raw in inputs:
        if not is_dataset(raw):
            raise AvarcError(f"{raw}: pass datasets alone, or files and folders alone, in one run")
        split_name, ds = load_split(str(raw), split)
        ds = _plain_images(ds, ds_lib)
        where = f"{display(raw)}[{split_name}]"
        local = display(raw) == str(raw) and Path(raw).exists()
        resolved = f"{absolute(raw) if local else display(raw)}[{split_name}]"
        content[where] = content_fingerprint(absolute(raw), split_name) if local else None
        image_col = _column(display(raw), ds, image_column, ds_lib.Image, "images", "image_column")
        if image_col is None:
            raise AvarcError(f"{display(raw)}: no column holds images (an Image feature); name it with --image-column "
                             f"(columns: {', '.join(ds.features)})", option="image_column")
        label_col = _column(display(raw), ds, label_column, ds_lib.ClassLabel, "class labels (a ClassLabel feature)",
                            "label_column")
        splits.append((where, ds, image_col, label_col, resolved))
    if labels == "folders" and any(lc is None for _, _, _, lc, _ in splits):
        where = next(w for w, _, _, lc, _ in splits if lc is None)
        raise AvarcError(f"{where}: no label column (a ClassLabel feature); name it with --label-column, or classify "
                         "without labels", option="labels")
    labelled = labels != "none" and all(lc is not None for _, _, _, lc, _ in splits)
    out = []
    for where, ds, image_col, label_col, resolved in splits:
        ids: list[int | None] = [None] * len(ds)
        if labelled:
            names = ds.features[label_col].names
            try:
                by_index = [parse(n, f"{where} class {n!r}") for n in names]
            except AvarcError:
                if labels == "auto":        # class names this model does not know: classify without labels
                    return read_rows(inputs, parse, "none", split, image_column, label_column)
                raise
            ids = [by_index[v] if v is not None and 0 <= v < len(names) else None for v in ds[label_col]]
        if not len(ds):
            raise AvarcError(f"{where}: no rows; pass a split with images", option="split")
        unlabelled = {i: f"no class in its label column {label_col!r} (missing or not one of its {len(names)} "
                         "names); label the row, or classify without labels"
                      for i, y in enumerate(ids) if y is None} if labelled else {}
        out.append(Rows(where, SplitImages(where, ds, image_col, resolved, unlabelled, content[where]), ids))
    return out, labelled


def class_names(raw: str | os.PathLike, split: str | None, label_column: str | None) -> list[str]:
    """The ``ClassLabel`` names of a labelled dataset (``add-class``: the new classes it holds)."""
    ds_lib = _datasets()
    split_name, ds = load_split(str(raw), split)
    column = _column(display(raw), ds, label_column, ds_lib.ClassLabel, "class labels (a ClassLabel feature)",
                     "label_column")
    if column is None:
        raise AvarcError(f"{display(raw)}[{split_name}]: no label column (a ClassLabel feature) to name the new "
                         f"classes; name it with --label-column (columns: {', '.join(ds.features)})",
                         option="label_column")
    return list(ds.features[column].names)


def class_pixels(raw: str | os.PathLike, split: str | None, image_column: str | None, label_column: str | None,
                 size: int, preprocess: str) -> tuple[dict[str, list[np.ndarray]], list[tuple[str, str]]]:
    """Every readable row of a labelled dataset, prepared as the model expects, by ``ClassLabel`` name, and the rows
    skipped with their reason (``add-class``'s reading of a dataset)."""
    names = class_names(raw, split, label_column)
    found, _ = read_rows([raw], lambda name, _where: names.index(name), "folders", split, image_column, label_column)
    images: dict[str, list[np.ndarray]] = {n: [] for n in names}
    skipped = []
    for rows in found:
        for i, y in enumerate(rows.labels):
            where = f"{rows.where}#{i}"
            try:
                px = preprocess_pil(rows.images.image(i), size, preprocess)
            except AvarcError as e:
                skipped.append((where, str(e)))
                continue
            if y is not None:
                images[names[y]].append(px)
    return images, skipped
