"""Class-incremental learning without replay: new classes as new class-embedding rows, trained alone.

A generative classifier scores each class by its own likelihood, so a class can be learnt from its own images:
grow the class table by one entry per new class and train only those entries (every other weight frozen) to
maximise the teacher-forced likelihood of the new images. The old classes' likelihoods cannot change, not by a bit.
A new class's entry is one embedding row per place the class enters the network (start token, each block's AdaLN,
the head's AdaLN) rather than one shared row: a frozen network fits a class it never saw far better with a row per
slot (the digits protocol's numbers: README, Add classes without forgetting).

An *extension file* holds the new rows, their names, how they were trained, the identity of the base checkpoint
(SHA-256 of the VAR file) and of the extensions it was stacked on, so it is refused on any other model. It is a
plain ``torch.save`` of tensors, strings and numbers, readable with ``weights_only=True``; the base checkpoint is
never modified.
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, model_validator

from ..choices import INITS
from ..engine.model import Model
from ..engine.schedule import classify
from ..errors import AvarcError, schema_problem
from ..io import hf_data
from ..io.data import DataOptions
from ..io.files import atomic_write
from ..io.preprocess import load_pixels, pixels_to_tensor
from ..io.profiles import default_profile_name, load_profile
from ..models.checkpoints import file_sha256
from .training import Augment, OnStep, TrainConfig, TrainLog, token_pool, train_var

EXTENSION_FORMAT = "avarc-extension/1"


def rows_sha256(rows: torch.Tensor) -> str:
    """Identity of an extension: SHA-256 of its rows as fp32 bytes."""
    return hashlib.sha256(rows.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def base_sha256(model: Model) -> str:
    if model.var_file is None:
        raise AvarcError("this model was not loaded from a VAR checkpoint file, so extensions cannot name their base; "
                         "save it with save_model_dir and load it from there")
    return file_sha256(model.var_file)


@dataclass
class Extension:
    """New classes' embedding rows (n, slots, C; see ``VAR.add_classes``) and everything needed to apply them to
    the right model in the right order."""

    rows: torch.Tensor
    names: list[str]
    base_sha256: str
    base_name: str | None = None                        # registry name of the base, if it had one
    offset: int = 0                                     # classes the model had when these rows were trained
    parents: list[dict] = field(default_factory=list)   # [{"sha256", "names"}] of the extensions below this one
    training: dict = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return rows_sha256(self.rows)

    def save(self, path: str | os.PathLike, exclusive: bool = False) -> Path:
        """Write the extension file (loads with ``weights_only=True``; apply it with ``extensions=[path]``);
        ``exclusive``: refused if the file exists by then (another run wrote it meanwhile)."""
        return save_extension(self, path, exclusive)

    def __repr__(self) -> str:
        return f"Extension({len(self.names)} classes {self.names[:5]}, on {self.describe_base()}, offset {self.offset})"

    def describe_base(self) -> str:
        short = self.base_sha256[:12]
        return f"{self.base_name} (sha256 {short}…)" if self.base_name else f"sha256 {short}…"


def _rows(rows: torch.Tensor) -> torch.Tensor:
    if rows.ndim != 3 or not rows.is_floating_point():
        raise ValueError("not a 3-d float tensor")
    if not torch.isfinite(rows).all():
        raise ValueError("not finite")
    return rows


class ParentFile(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    sha256: str
    names: list[str]


class ExtensionFile(BaseModel):
    """An extension file's fields (a weights-only torch file), the one declaration its writer
    (:func:`save_extension`) and reader (:func:`load_extension`) use: every field is checked before any is used, so a
    hand-damaged file is one line, never a traceback."""

    model_config = ConfigDict(strict=True, extra="allow", arbitrary_types_allowed=True)

    format: Literal[EXTENSION_FORMAT]                       # type: ignore[valid-type]
    rows: Annotated[torch.Tensor, AfterValidator(_rows)]   # n, slots, C
    names: list[Annotated[str, Field(min_length=1)]]
    base_sha256: str
    base_name: str = ""
    offset: NonNegativeInt = 0
    parents: list[ParentFile] = []
    training: dict = {}

    @model_validator(mode="after")
    def _one_name_per_row(self) -> ExtensionFile:
        if len(self.names) != self.rows.shape[0]:
            raise ValueError(f"names: {len(self.names)} names for {self.rows.shape[0]} rows")
        return self


def save_extension(ext: Extension, path: str | os.PathLike, exclusive: bool = False) -> Path:
    """Written atomically (temporary file + rename): a kill mid-write never leaves half an extension."""
    path = Path(path)
    doc = ExtensionFile(format=EXTENSION_FORMAT, rows=ext.rows.detach().float().cpu().contiguous(),
                        names=list(ext.names), base_sha256=ext.base_sha256, base_name=ext.base_name or "",
                        offset=int(ext.offset), parents=[ParentFile(**p) for p in ext.parents],
                        training=dict(ext.training))
    with atomic_write(path, exclusive=exclusive, option="out") as f:
        torch.save(doc.model_dump(), f)
    return path


def load_extension(path: str | os.PathLike) -> Extension:
    """Read an extension file with ``weights_only=True``; anything else is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise AvarcError(f"{path}: no such extension file; pass a file written by `avarc add-class`")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError):
        raise AvarcError(f"{path}: not an extension file (unreadable as a weights-only torch file); "
                         "pass a file written by `avarc add-class`") from None
    if not isinstance(doc, Mapping) or doc.get("format") != EXTENSION_FORMAT:
        raise AvarcError(f"{path}: not an extension file (no format {EXTENSION_FORMAT!r}); "
                         "pass a file written by `avarc add-class`, not a model checkpoint")
    try:
        f = ExtensionFile.model_validate(dict(doc))
    except ValidationError as e:
        loc, problem = schema_problem(e)
        where = ".".join(map(str, loc))
        raise AvarcError(f"{path}: damaged extension file ({where + ': ' if where else ''}{problem}); write it again "
                         "with `avarc add-class`") from None
    return Extension(rows=f.rows, names=list(f.names), base_sha256=f.base_sha256, base_name=f.base_name or None,
                     offset=f.offset, parents=[p.model_dump() for p in f.parents], training=dict(f.training))


def applied(model: Model) -> list[dict]:
    """The extensions applied to a model so far, bottom first, as extension files record their parents."""
    return [{"sha256": ext.sha256, "names": list(ext.names)} for ext in model.extensions]


def check_names(model: Model, names: Sequence[str], where: str) -> None:
    existing = {model.class_name(i) for i in range(model.num_classes)}
    for i, name in enumerate(names):
        if not name or name != name.strip() or "=" in name or "," in name or not name.isprintable():
            raise AvarcError(f"{where}: class name {name!r} is not usable (--classes could never name it); use a "
                             "printable name without '=', ',' or outer spaces")
        if name.lower() == "null":
            raise AvarcError(f"{where}: class name {name!r} is reserved (`--vs null` is the unconditional model); "
                             "choose another name")
        if name in existing or name in names[:i]:
            raise AvarcError(f"{where}: class {name!r} already exists in this model; choose another name")


def apply_extension(model: Model, ext: Extension, where: str = "extension") -> None:
    """Append an extension's rows after checking it belongs to this base and to the extensions already applied."""
    sha = base_sha256(model)
    if ext.base_sha256 != sha:
        hint = f"model {ext.base_name}" if ext.base_name else "VAR checkpoint it was trained on"
        raise AvarcError(f"{where}: was trained on {ext.describe_base()} but the model is sha256 {sha[:12]}…; "
                         f"use the {hint}",
                         option="model")
    below = applied(model)
    if [p["sha256"] for p in ext.parents] != [p["sha256"] for p in below] or ext.offset != model.num_classes:
        need = ", ".join("+".join(p["names"]) for p in ext.parents) or "none"
        have = ", ".join("+".join(p["names"]) for p in below) or "none"
        raise AvarcError(f"{where}: stacks on the extensions [{need}] but the model has [{have}]; "
                         "apply the extensions it was trained on first, in the same order", option="extensions")
    want = (model.var.num_slots, model.spec.var.embed_dim)
    if tuple(ext.rows.shape[1:]) != want:
        raise AvarcError(f"{where}: rows are {tuple(ext.rows.shape[1:])} (slots, width) but the model needs {want}; "
                         "use the model it was trained on")
    check_names(model, ext.names, where)
    model.var.add_classes(ext.rows.to(model.device))
    model.extensions.append(ext)


def apply_extensions(model: Model, paths: Sequence[str | os.PathLike] | None) -> list[Extension]:
    """Load extension files and apply them in the given order (each must stack on the ones before it)."""
    out = []
    for p in paths or ():
        ext = load_extension(p)
        apply_extension(model, ext, str(p))
        out.append(ext)
    return out


@dataclass
class ClassImages:
    """Preprocessed images per new class, and the files that were skipped with their reason."""

    images: dict[str, torch.Tensor]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def read_class_folders(folders: Mapping[str, str | os.PathLike], size: int, preprocess: str) -> ClassImages:
    """``{name: folder}`` → every readable image below each folder (sorted, hidden files ignored), prepared as
    the model expects; unreadable files are skipped with their reason, an empty class is an error."""
    out = ClassImages({})
    for name, folder in folders.items():
        folder = Path(folder)
        if not folder.is_dir():
            raise AvarcError(f"{folder}: no such folder; pass a folder of {name!r} images")
        files = sorted(p for p in folder.rglob("*")
                       if p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts))
        xs = []
        for f in files:
            px = load_pixels(f, size, preprocess)
            if isinstance(px, str):
                out.skipped.append((str(f), px))
            else:
                xs.append(pixels_to_tensor(px))
        if not xs:
            raise AvarcError(f"{folder}: no readable images for class {name!r}; put its images in that folder")
        out.images[name] = torch.stack(xs)
    return out


def read_dataset_classes(dataset: str, data: DataOptions, size: int, preprocess: str) -> ClassImages:
    """A labelled dataset's images grouped by its ClassLabel names (each name a new class), unreadable rows skipped."""
    pixels, skipped = hf_data.class_pixels(dataset, data.split, data.image_column, data.label_column, size, preprocess)
    empty = next((n for n, px in pixels.items() if not px), None)
    if empty is not None:
        raise AvarcError(f"{dataset}: no readable images for class {empty!r}; every ClassLabel name needs rows")
    return ClassImages({n: torch.stack([pixels_to_tensor(p) for p in px]) for n, px in pixels.items()}, skipped)


def labelled_folders(root: str | os.PathLike) -> dict[str, Path]:
    """A folder of labelled sub-folders → {sub-folder name: sub-folder}."""
    root = Path(root)
    if not root.is_dir():
        raise AvarcError(f"{root}: no such folder; pass NAME IMAGES_DIR, NAME=DIR pairs, "
                         "or a folder of class sub-folders")
    subs = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    if not subs:
        raise AvarcError(f"{root}: no class sub-folders; pass NAME IMAGES_DIR, "
                         "or a folder with one sub-folder per class")
    return subs


@dataclass(frozen=True)
class HeldOut:
    """Held-out accuracy of one new class, classified against every class of the extended model."""

    name: str
    correct: int
    total: int
    train_images: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.total if self.total else None


@dataclass
class AddedClasses:
    extension: Extension
    log: TrainLog
    held_out: list[HeldOut]


def split_holdout(n: int, holdout: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, held out) of n images: a ``holdout`` share, at least one when n ≥ 2, never all."""
    k = min(n - 1, max(1, round(holdout * n))) if holdout > 0 and n >= 2 else 0
    perm = torch.randperm(n, generator=gen)
    return perm[k:].sort().values, perm[:k].sort().values


def _init_rows(model: Model, n: int, init: str) -> torch.Tensor:
    """n, C starting rows: the null class's row, or the mean of the base classes' rows."""
    w, K = model.var.class_emb.weight.detach(), model.spec.var.num_classes
    row = w[K] if init == "null" else w[:K].mean(0)
    return row.unsqueeze(0).repeat(n, 1)


def add_classes(model: Model, images: Mapping[str, torch.Tensor], steps: int = 600, lr: float = 0.1,
                batch_size: int = 32, augment_sigma: float = 0.0, init: str = "null", seed: int = 0,
                holdout: float = 0.2, copies: int | None = None, affine: Augment = Augment(),
                base_name: str | None = None, on_step: OnStep | None = None) -> AddedClasses:
    """Learn one new class per ``{name: N, 3, R, R images in [-1, 1]}`` entry: grow the class table, train only the
    new rows with teacher forcing (cross-entropy over all tokens), then classify each class's held-out images
    among all classes (old and new) with the model's default profile. The model keeps the new classes."""
    if not images:
        raise AvarcError("no classes to add; give at least one NAME and its images")
    names = list(images)
    check_names(model, names, "add-class")
    for name, x in images.items():
        if x.shape[0] == 0:
            raise AvarcError(f"{name}: no images; give a folder with at least one readable image")
    if not (steps >= 1 and 0 < lr < math.inf and batch_size >= 1 and 0 <= augment_sigma < math.inf
            and 0 <= holdout < 1):
        raise AvarcError("add-class: need steps ≥ 1, a finite lr > 0, batch size ≥ 1, a finite augment sigma ≥ 0 "
                         "and 0 ≤ holdout < 1")
    if init not in INITS:
        raise AvarcError(f"unknown initialisation {init!r}; use {' or '.join(INITS)}", option="init")
    base_sha = base_sha256(model)
    parents = [dict(p) for p in applied(model)]
    offset = model.num_classes
    copies = (8 if augment_sigma > 0 or affine != Augment() else 0) if copies is None else copies
    gen = torch.Generator().manual_seed(seed)

    splits = {name: split_holdout(x.shape[0], holdout, gen) for name, x in images.items()}
    tokens, labels = [], []
    for j, (name, x) in enumerate(images.items()):
        train = x[splits[name][0]]
        t, y = token_pool(model, train, torch.full((len(train),), offset + j, dtype=torch.long), copies, affine, gen,
                          chunk=64, sigma=augment_sigma)
        tokens.append(t)
        labels.append(y)

    var = model.var
    old_extra = None if var.extra_class_emb is None else var.extra_class_emb.detach().clone()
    var.add_classes(_init_rows(model, len(names), init))
    keep = torch.zeros(var.num_extra_classes, 1, 1, device=model.device)
    keep[-len(names):] = 1
    trained = var.extra_class_emb
    assert trained is not None   # add_classes set it
    trained.requires_grad_(True)
    hook = trained.register_hook(lambda g: g * keep)   # earlier extensions' rows get no gradient
    cfg = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, warmup=min(20, steps // 10), weight_decay=0.0,
                      seed=seed)
    try:
        log = train_var(model, torch.cat(tokens), torch.cat(labels), cfg, [("extra_class_emb", trained)],
                        label_drop=0.0, on_step=on_step)
    except BaseException:
        var.extra_class_emb = None if old_extra is None else torch.nn.Parameter(old_extra, requires_grad=False)
        raise     # the model goes back to the classes it had
    finally:
        hook.remove()
    rows = trained.detach()[-len(names):].clone()
    if not torch.isfinite(rows).all():
        var.extra_class_emb = None if old_extra is None else torch.nn.Parameter(old_extra, requires_grad=False)
        raise AvarcError(f"add-class: training diverged (the new rows are not finite, final loss {log.mean(last=1)}); "
                         "nothing was written; lower --lr")
    extra = rows if old_extra is None else torch.cat((old_extra, rows))   # earlier rows restored bit-for-bit
    var.extra_class_emb = torch.nn.Parameter(extra, requires_grad=False)

    ext = Extension(rows=rows.cpu(), names=names, base_sha256=base_sha, base_name=base_name, offset=offset,
                    parents=parents)
    model.extensions.append(ext)
    held = _held_out(model, images, splits, offset, seed)
    ext.training = {"steps": steps, "lr": lr, "batch_size": batch_size, "init": init, "augment_sigma": augment_sigma,
                "augment_copies": copies,
                "affine": {"shift": affine.shift, "rotate": affine.rotate, "scale": affine.scale},
                "seed": seed, "holdout": holdout, "final_loss": round(log.mean(last=min(20, steps)), 4),
                "images": {h.name: {"train": h.train_images, "held_out": h.total} for h in held},
                "held_out_accuracy": {h.name: h.accuracy for h in held}}
    return AddedClasses(ext, log, held)


@torch.no_grad()
def _held_out(model: Model, images: Mapping[str, torch.Tensor], splits: dict, offset: int, seed: int) -> list[HeldOut]:
    profile = load_profile(default_profile_name(model))
    candidates = list(range(model.num_classes))
    out = []
    for j, (name, x) in enumerate(images.items()):
        train_idx, held_idx = splits[name]
        correct = 0
        for i in held_idx.tolist():
            pred = classify(model, model.encode(x[i:i + 1]), candidates, profile, seed)[0]
            correct += int(pred.pred == offset + j)
        out.append(HeldOut(name, correct, len(held_idx), len(train_idx)))
    return out

