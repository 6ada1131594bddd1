"""``avarc add-class``: learn new classes from their own images only, writing an extension file."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal, Optional

import torch
import typer

from core import AvarcError, Classifier
from core.io.files import absolute, check_output_file
from core.io import hf_data
from core.io.preprocess import pixels_to_tensor
from core.tasks.incremental import INITS, ClassImages, check_names, labelled_folders, read_class_folders

from .. import output
from ..interrupt import interruptible
from ..options import (DeviceOpt, DtypeOpt, ExtensionOpt, ImageColumnOpt, LabelColumnOpt, ModelDirOpt, ModelOpt, PatchNumsOpt,
                       SplitOpt, ThreadsOpt, TrustPickleOpt, VaeOpt)

Init = Literal[INITS]  # type: ignore[valid-type]   (the initialisations core knows)


def add_class(
    classes: Annotated[list[str], typer.Argument(metavar="NAME DIR | NAME=DIR... | FOLDER", help="NAME IMAGES_DIR, or NAME=DIR pairs, or one folder of class sub-folders, or one labelled dataset (its ClassLabel names are the new classes).", show_default=False)],
    split: SplitOpt = None,
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
    model: ModelOpt = "digits",
    vae: VaeOpt = None,
    patch_nums: PatchNumsOpt = None,
    extension: ExtensionOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Extension file to write (default: NAME[+NAME…].ext.pt here).")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Training steps (only the new class rows are trained).")] = 600,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Peak learning rate (AdamW, warm-up then cosine).")] = 0.1,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Token sequences per step.")] = 32,
    augment_sigma: Annotated[float, typer.Option("--augment-sigma", min=0.0, help="Latent-noise augmentation: σ·N(0,1) on the encoder latent before re-quantising (0: clean tokens only).")] = 0.0,
    init: Annotated[Init, typer.Option("--init", help="Initial new rows: the null class's row, or the mean of the base classes' rows.")] = "null",
    holdout: Annotated[float, typer.Option("--holdout", min=0.0, max=0.95, help="Share of each class's images held out to report its accuracy against all classes.")] = 0.2,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the held-out split, batches and augmentation noise.")] = 0,
    threads: ThreadsOpt = None,
    model_dir: ModelDirOpt = None,
    trust_pickle: TrustPickleOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --out extension file (never the base model's files).")] = False,
) -> None:
    """\b
    avarc add-class seven digits7/ -m runs/digits-0-4   # a class from its images
    avarc add-class cat=cats/ dog=dogs/ -m d16 --steps 500    # several at once
    avarc add-class new/ -e ext1.pt --out ext2.pt   # sub-folders; stacks on ext1
    avarc classify test/ -m d16 -e ext2.pt          # then old and new together

    Only the new classes' embedding rows (one per block, start token and head) are trained, on the teacher-forced likelihood of their images; every other weight, and so every old class's score, stays exactly as it was. The base checkpoint is never modified.
    """
    dataset = classes[0] if len(classes) == 1 and hf_data.is_dataset(classes[0]) else None
    folders = dict.fromkeys(hf_data.class_names(dataset, split, label_column)) if dataset else _parse_classes(classes)
    out = check_output_file(out or Path("+".join(folders) + ".ext.pt"), "out", force)
    clf = Classifier.from_pretrained(model, vae=vae, extensions=extension or (), device=device, dtype=dtype,
                                     model_dir=model_dir, trust_pickle=trust_pickle, patch_nums=patch_nums, threads=threads)
    if absolute(out) in {absolute(p) for p in clf.files}:
        raise AvarcError(f"--out {out}: is a file the model is loaded from; never written over, even with --force; "
                         "choose another --out")
    check_names(clf.model, list(folders), "add-class")      # before reading any image
    if dataset:
        pixels, skipped = hf_data.class_pixels(dataset, split, image_column, label_column, clf.spec.image_size,
                                               clf.spec.preprocess)
        empty = next((n for n, px in pixels.items() if not px), None)
        if empty is not None:
            raise AvarcError(f"{dataset}: no readable images for class {empty!r}; every ClassLabel name needs rows")
        read = ClassImages({n: torch.stack([pixels_to_tensor(p) for p in px]) for n, px in pixels.items()}, skipped)
    else:
        read = read_class_folders(folders, clf.spec.image_size, clf.spec.preprocess)
    for path, reason in read.skipped:
        output.say(f"skipped {path}: {reason}", err=True)
    names = list(read.images)
    start = time.perf_counter()
    with interruptible(lambda: f"interrupted while training; {out} was not written"), output.progress() as bar:
        task = bar.add_task("add-class", total=steps, info="")
        ext = clf.add_classes(read.images, steps=steps, lr=lr, batch_size=batch_size, augment_sigma=augment_sigma,
                              init=init, seed=seed, holdout=holdout,
                              on_step=lambda s, total, loss: bar.update(task, completed=s, info=f"loss {loss:.3f}"))
    ext.save(out, exclusive=not force)
    n, acc = clf.model.num_classes, ext.training["held_out_accuracy"]
    rows = [(name, n - len(names) + i, count["train"], count["held_out"], None if acc[name] is None else f"{100 * acc[name]:.1f}")
            for i, (name, count) in enumerate(ext.training["images"].items())]
    output.table(f"avarc add-class · {len(names)} new of {n} classes · {time.perf_counter() - start:.1f} s",
                 ["class", "id", "train images", "held out", "held-out top-1 %"], rows)
    output.say(f"wrote {out}; use it with --extension {out}")


def _parse_classes(args: list[str]) -> dict[str, Path]:
    """NAME DIR | NAME=DIR … | ROOT (one sub-folder per class) → {name: folder}."""
    if all("=" in a for a in args):
        pairs = [a.split("=", 1) for a in args]
        if len({n for n, _ in pairs}) != len(pairs):
            raise AvarcError(f"class names repeat in {' '.join(args)}; give each new class once")
        return {n: Path(d) for n, d in pairs}
    if len(args) == 2 and "=" not in args[0]:
        return {args[0]: Path(args[1])}
    if len(args) == 1:
        return labelled_folders(args[0])
    raise AvarcError(f"cannot read classes from {' '.join(args)!r}; pass NAME IMAGES_DIR, NAME=DIR pairs, "
                     "or one folder of class sub-folders")
