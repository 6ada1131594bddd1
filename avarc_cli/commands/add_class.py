"""``avarc add-class``: learn new classes from their own images only, writing an extension file."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from core import AvarcError
from core.files import absolute, check_output_file
from core.incremental import (INITS, add_classes, apply_extensions, check_names, labelled_folders, read_class_folders,
                              save_extension)
from core.model import Model, resolve_dtype, resolve_device
from core.registry import REGISTRY, resolve_model
from core.threads import set_threads

from .. import output
from ..options import DeviceOpt, DtypeOpt, ExtensionOpt, ModelDirOpt, ModelOpt, ThreadsOpt, TrustPickleOpt, VaeOpt


def add_class(
    classes: Annotated[list[str], typer.Argument(metavar="NAME DIR | NAME=DIR... | FOLDER", help="NAME IMAGES_DIR, or NAME=DIR pairs, or one folder of class sub-folders.", show_default=False)],
    model: ModelOpt = "digits",
    vae: VaeOpt = None,
    extension: ExtensionOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Extension file to write (default: NAME[+NAME…].ext.pt here).")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Training steps (only the new class rows are trained).")] = 600,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Peak learning rate (AdamW, warm-up then cosine).")] = 0.1,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Token sequences per step.")] = 32,
    augment_sigma: Annotated[float, typer.Option("--augment-sigma", min=0.0, help="Latent-noise augmentation: σ·N(0,1) on the encoder latent before re-quantising (0: clean tokens only).")] = 0.0,
    init: Annotated[str, typer.Option("--init", help=f"Initial new rows: {' or '.join(INITS)} (the null class row, or the mean of the base classes' rows).")] = "null",
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
    avarc add-class seven digits7/ --model runs/digits-0-4        # one new class from a folder of its images
    avarc add-class cat=cats/ dog=dogs/ -m d16 --steps 500       # several at once
    avarc add-class new_classes/ --extension ext1.pt --out ext2.pt  # sub-folders are classes; stacks on ext1
    avarc classify test/ -m d16 --extension ext.pt                # then score old and new classes together

    Only the new classes' embedding rows (one per block, start token and head) are trained, on the teacher-forced
    likelihood of their images; every other weight, and so every old class's score, stays exactly as it was. The
    base checkpoint is never modified.
    """
    folders = _parse_classes(classes)
    out = check_output_file(out or Path("+".join(folders) + ".ext.pt"), "--out", force)
    dev = resolve_device(device)
    m = resolve_model(model, vae, dev, resolve_dtype(dtype, dev), model_dir, trust_pickle)
    _protect(out, m, vae, extension)
    set_threads(m.spec.var, threads)
    apply_extensions(m, extension)
    check_names(m, list(folders), "add-class")
    read = read_class_folders(folders, m.spec.image_size, m.spec.preprocess)
    for path, reason in read.skipped:
        output.err_console.print(f"skipped {path}: {reason}")
    names = list(read.images)
    base_name = model.lower() if model.lower() in REGISTRY and not Path(model).exists() else None

    start = time.perf_counter()
    with output.progress() as bar:
        task = bar.add_task("add-class", total=steps, info="")
        result = add_classes(m, read.images, steps=steps, lr=lr, batch_size=batch_size, augment_sigma=augment_sigma,
                             init=init, seed=seed, holdout=holdout, base_name=base_name,
                             on_step=lambda s, total, loss: bar.update(task, completed=s, info=f"loss {loss:.3f}"))
    save_extension(result.extension, out)
    rows = [(h.name, m.num_classes - len(names) + i, h.train_images, h.total,
             None if h.accuracy is None else f"{100 * h.accuracy:.1f}") for i, h in enumerate(result.held_out)]
    output.table(f"avarc add-class · {len(names)} new of {m.num_classes} classes · {time.perf_counter() - start:.1f} s",
                 ["class", "id", "train images", "held out", "held-out top-1 %"], rows)
    output.console.print(f"wrote {out}; use it with --extension {out}")


def _protect(out: Path, m: Model, vae: str | None, extensions: list[Path] | None) -> None:
    """--out may never name a file the model was loaded from (its VAR, VQ-VAE, metadata or an input extension)."""
    base = [m.var_file, m.var_file.with_name("vae.pth"), m.var_file.with_name("meta.json")] if m.var_file else []
    inputs = base + ([Path(vae)] if vae and Path(vae).exists() else []) + list(extensions or [])
    if absolute(out) in {absolute(p) for p in inputs}:
        raise AvarcError(f"--out {out}: is a file the model is loaded from; never written over, even with --force; "
                         "choose another --out")


def _parse_classes(args: list[str]) -> dict[str, Path]:
    """NAME DIR | NAME=DIR … | ROOT (one sub-folder per class) → {name: folder}."""
    if all("=" in a for a in args):
        pairs = [a.split("=", 1) for a in args]
        names = [n for n, _ in pairs]
        if len(set(names)) != len(names):
            raise AvarcError(f"class names repeat in {' '.join(args)}; give each new class once")
        return {n: Path(d) for n, d in pairs}
    if len(args) == 2 and "=" not in args[0]:
        return {args[0]: Path(args[1])}
    if len(args) == 1:
        return labelled_folders(args[0])
    raise AvarcError(f"cannot read classes from {' '.join(args)!r}; pass NAME IMAGES_DIR, NAME=DIR pairs, "
                     "or one folder of class sub-folders")
