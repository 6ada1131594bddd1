"""``avarc add-class``: learn new classes from their own images only, writing an extension file."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..options import ForceOpt, Init, InputOptions, ModelOpt, ModelOptions, input_options, model_options, opt


@model_options("batch_size", "compile", "cuda_graphs", "encoder")
@input_options("from_list", "border", "per_class")
def add_class(
    opts: ModelOptions,
    source: InputOptions,
    classes: Annotated[list[str], typer.Argument(metavar="NAME DIR | NAME=DIR... | FOLDER", show_default=False,
                                                 help="A class and its images, NAME=DIR pairs, class sub-folders, "
                                                 "or a labelled dataset.")],
    model: ModelOpt = "digits",
    out: Annotated[Optional[Path], opt("--out", "-o", metavar="FILE",
                                       help="Extension file (default: NAME[+NAME…].ext.pt here).")] = None,
    steps: Annotated[int, opt("--steps", min=1, metavar="N", help="Training steps.", show_default=True)] = 600,
    lr: Annotated[float, opt("--lr", min=0.0, metavar="LR", help="Peak learning rate (AdamW).",
                             show_default=True)] = 0.1,
    batch_size: Annotated[int, opt("--batch-size", "-b", min=1, metavar="N", help="Token sequences per step.",
                                   show_default=True)] = 32,
    augment_sigma: Annotated[float, opt("--augment-sigma", min=0.0, metavar="σ",
                                        help="Latent-noise augmentation (0: clean tokens only).")] = 0.0,
    init: Annotated[Init, opt("--init", help="New rows start as the null class's or the mean row.",
                              show_default=True)] = "null",
    holdout: Annotated[float, opt("--holdout", min=0.0, max=0.95, metavar="F", show_default=True,
                                  help="Share of each class's images held out to report accuracy.")] = 0.2,
    seed: Annotated[int, opt("--seed", help="Seed of the split, batches and noise.", show_default=True)] = 0,
    samples: Annotated[int, opt("--samples", min=0, metavar="N",
                                help="Draw N samples of each new class beside OUT; print the share "
                                "classified as it.")] = 0,
    force: ForceOpt = False,
) -> None:
    """\b
    avarc add-class seven digits7/ -m runs/digits-0-4   # a class from its images
    avarc add-class cat=cats/ dog=dogs/ -m d16 --steps 500    # several at once
    avarc add-class new/ -e ext1.pt --out ext2.pt   # sub-folders; stacks on ext1
    avarc classify test/ -m d16 -e ext2.pt          # then old and new together
    avarc add-class seven digits7/ --samples 8      # and see what it learnt

    Only the new classes' embedding rows train, on the likelihood of their images; every other weight, and so
    every old class's score, stays exactly as it was. The base checkpoint is never modified.
    """
    from avarc.errors import AvarcError
    from avarc.io import hf_data
    from avarc.io.files import check_output_file, hold_outputs, refuse_inputs, with_contents
    from avarc.tasks.incremental import check_names, read_class_folders, read_dataset_classes
    from avarc.tasks.samples import sample_files

    from .. import output
    from ..interrupt import interruptible

    dataset = classes[0] if len(classes) == 1 and hf_data.is_dataset(classes[0]) else None
    folders: dict[str, Any] = dict.fromkeys(hf_data.class_names(dataset, source.split, source.label_column)) \
        if dataset else _parse_classes(classes)     # a dataset's classes: None; else each class's folder
    read_from = with_contents([dataset] if dataset else folders.values())
    out = out or Path("+".join(folders) + ".ext.pt")
    refuse_inputs([("out", out)], [*opts.files(model), *read_from])      # before --force is asked for
    out = check_output_file(out, "out", force)
    drawn = samples_folder(out)
    if samples and drawn.exists() and not force:
        raise AvarcError(f"{drawn}: already exists (the samples of an earlier run); pass --force to overwrite its "
                         "files, or choose another --out", option="samples")
    clf = opts.load(model)
    names = list(folders)
    inputs = [*clf.files, *read_from]
    with hold_outputs({"out": out}, inputs, force):         # the samples folder is out's: its lock covers it
        if samples:
            ids = [clf.model.num_classes + i for i in range(len(names)) for _ in range(samples)]
            planned = [*sample_files(ids, [names[y - clf.model.num_classes] for y in ids]), "grid.png", "tokens.npz"]
            refuse_inputs([("samples", drawn / f) for f in planned], inputs)
        check_names(clf.model, names, "add-class")      # before reading any image
        read = read_dataset_classes(dataset, source.data(), clf.spec.image_size, clf.spec.preprocess) if dataset \
            else read_class_folders(folders, clf.spec.image_size, clf.spec.preprocess)
        for _, reason in read.skipped:
            output.say(f"skipped: {output.one_line(reason)}", err=True)      # the reason names the file (or the row)
        names = list(read.images)
        start = time.perf_counter()
        with interruptible(lambda: f"interrupted while training; {out} was not written"), output.progress() as bar:
            task = bar.add_task("add-class", total=steps, info="")
            ext = clf.add_classes(read.images, steps=steps, lr=lr, batch_size=batch_size,
                                  augment_sigma=augment_sigma, init=init, seed=seed, holdout=holdout,
                                  on_step=lambda s, total, loss: bar.update(task, completed=s, info=f"loss {loss:.3f}"))
        ext.save(out, exclusive=not force)
        n, acc = clf.model.num_classes, ext.training["held_out_accuracy"]
        rows = [(name, n - len(names) + i, count["train"], count["held_out"],
                 None if acc[name] is None else f"{100 * acc[name]:.1f}")
                for i, (name, count) in enumerate(ext.training["images"].items())]
        output.table(f"avarc add-class · model {clf.source} · {len(names)} new of {n} classes · "
                     f"{time.perf_counter() - start:.1f} s",
                     ["class", "id", "train images", "held out", "held-out top-1 %"], rows)
        output.say(f"wrote {out}; use it with --extension {out}")
        if samples:
            _draw_samples(clf, list(range(n - len(names), n)), samples, seed, drawn, force)


def samples_folder(extension: Path) -> Path:
    """Where ``--samples`` writes: beside the extension, ``NAME.samples`` for ``NAME.pt``."""
    return extension.with_name(extension.name.removesuffix(".pt") + ".samples")


def _draw_samples(clf, ids: list[int], n: int, seed: int, folder: Path, force: bool) -> None:  # noqa: ANN001
    """``--samples``: n samples of each new class, checked by the classifier that now holds them."""
    from avarc.io.files import hold_folder, make_output_dir

    from .generate import print_shares

    make_output_dir(folder, "samples")
    with hold_folder(folder, "samples"):
        drawn = clf.generate(ids, n, seed=seed)
        preds = [p.pred for p in clf.classify_samples(drawn, seed)]
        drawn.save(folder, exclusive=not force, captions=[f"as {clf.class_names[p]}" for p in preds])
    print_shares(clf, drawn.labels.tolist(), preds, f"avarc add-class --samples {n} · written to {folder} · "
                 f"classified as the new class")


def _parse_classes(args: list[str]) -> dict[str, Path]:
    """NAME DIR | NAME=DIR … | ROOT (one sub-folder per class) → {name: folder}."""
    from avarc.errors import AvarcError
    from avarc.tasks.incremental import labelled_folders

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
