"""``avarc explain``: token-wise log-likelihood-ratio heatmaps (PNG panels) and raw maps (NPZ) per image."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer

from core import AvarcError
from core.classifier import noise_generator
from core.data import LABEL_MODES, ClassSpace, Item, collect
from core.explain import Explanation, Target, check_scales, explain_images, save_npz, unique_stems
from core.files import atomic_write, make_output_dir
from core.heatmap import COLORMAPS, check_style, render
from core.incremental import apply_extensions
from core.model import Model, resolve_device, resolve_dtype
from core.preprocess import open_image, pixels_to_tensor, preprocess_pil
from core.profiles import default_profile_name, load_profile
from core.registry import resolve_model
from core.threads import set_threads

from .. import output
from ..options import (BatchSizeOpt, DeviceOpt, DtypeOpt, ExtensionOpt, ModelDirOpt, ModelOpt, ProfileOpt, SeedOpt, ThreadsOpt,
                       TrustPickleOpt, VaeOpt, EncoderOpt)

IMAGES_PER_STEP = 16


def explain(
    inputs: Annotated[Optional[list[Path]], typer.Argument(help="Image files and/or folders (searched recursively).", show_default=False)] = None,
    model: ModelOpt = "digits",
    vae: VaeOpt = None,
    extension: ExtensionOpt = None,
    profile: ProfileOpt = None,
    cls: Annotated[Optional[str], typer.Option("--class", help="Class to explain (A): index, synset or name. Default: the true class if known, else the prediction.")] = None,
    vs: Annotated[Optional[str], typer.Option("--vs", help="Class to contrast with (B): index, synset, name or `null`. Default: the best other class.")] = None,
    label: Annotated[Optional[str], typer.Option("--label", help="True class of every input (index, synset or name): A = it, B = the best wrong class.")] = None,
    labels: Annotated[str, typer.Option("--labels", help="Labels from class sub-folders as in classify: auto, folders or none.")] = "auto",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for <image>.png and <image>.npz.")] = Path("explanations"),
    colormap: Annotated[str, typer.Option("--colormap", help=f"Heatmap colours: {' or '.join(COLORMAPS)}.")] = "turbo",
    alpha: Annotated[float, typer.Option("--alpha", help="Heatmap opacity over the input, 0…1.")] = 0.5,
    scales: Annotated[Optional[int], typer.Option("--scales", help="Explain with the first S scales only (maps on the S-th scale's grid).")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: BatchSizeOpt = None,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    model_dir: ModelDirOpt = None,
    trust_pickle: TrustPickleOpt = False,
    encoder: EncoderOpt = "torch",
    force: Annotated[bool, typer.Option("--force", help="Overwrite <image>.png / <image>.npz files already in --out.")] = False,
) -> None:
    """\b
    avarc explain examples/digits                    # demo: each digit's true class vs its best wrong class
    avarc explain cat.jpg -m d16 --out why           # A = prediction, B = runner-up (after `avarc download d16`)
    avarc explain cat.jpg -m d16 --class tabby --vs tiger_cat
    avarc explain val/ -m d16 --labels folders       # A = true class, B = best wrong class, as in the paper
    avarc explain cat.jpg -m d16 --vs null --scales 8 --colormap jet --alpha 0.6

    OUT/<image>.png shows the input, then where its tokens favour A over the unconditional model, B over it, and
    the more likely of A, B over the other. OUT/<image>.npz holds the signed maps (3, p, p: A vs null, B vs null,
    A vs B), classes [A, B], scores log p(x|A), log p(x|B), log p(x|null) and the per-token differences. Classes
    left open are chosen with the profile's schedule, as `avarc classify` ranks them; unreadable images are skipped.
    """
    if not inputs:
        raise AvarcError("no inputs; pass image files or folders (e.g. `avarc explain examples/digits`)")
    if labels not in LABEL_MODES:
        raise AvarcError(f"--labels {labels}: unknown mode; use {', '.join(LABEL_MODES)}")
    check_style(colormap, alpha)
    make_output_dir(out, "--out")
    chosen = load_profile(profile) if profile else None
    dev = resolve_device(device)
    m = resolve_model(model, vae, dev, resolve_dtype(dtype, dev), model_dir, trust_pickle, encoder)
    set_threads(m.spec.var, threads)
    apply_extensions(m, extension)
    num_scales = check_scales(m, scales)
    prof = (chosen or load_profile(default_profile_name(m))).resolve(len(m.spec.var.patch_nums))
    space = ClassSpace(m)
    fixed = Target(cls=_parse(space, m, cls, "--class", allow_null=False), vs=_parse(space, m, vs, "--vs", allow_null=True),
                   label=_parse(space, m, label, "--label", allow_null=False))
    if fixed.cls is not None and fixed.cls == fixed.vs:
        raise AvarcError(f"--class and --vs name the same class ({fixed.cls}); pick two different classes")
    existing = list(out.iterdir()) if out.is_dir() else []
    found = collect([str(p) for p in inputs], space, "none" if label else labels, exclude=existing)
    names = [n.replace("_", " ") if space.imagenet else n for n in space.names] + ["null"]
    named = list(zip(found.items, unique_stems([it.path for it in found.items])))
    clash = [out / f"{stem}{ext}" for _, stem in named for ext in (".png", ".npz") if (out / f"{stem}{ext}").exists()]
    if clash and not force:
        raise AvarcError(f"--out {out}: {len(clash)} outputs already exist ({clash[0].name}…); pass --force to "
                         "overwrite them, or choose another --out")
    rows, skipped = [], []
    with output.progress() as prog:
        task = prog.add_task("explain", total=len(found.items), info="")
        for start in range(0, len(found.items), IMAGES_PER_STEP):
            batch = named[start:start + IMAGES_PER_STEP]
            loaded = [(it, stem, _load(it, m)) for it, stem in batch]
            skipped += [px for _, _, px in loaded if isinstance(px, str)]
            good = [(it, stem, px) for it, stem, px in loaded if not isinstance(px, str)]
            targets = [replace(fixed, label=fixed.label if fixed.label is not None else it.label) for it, _, _ in good]
            images = [pixels_to_tensor(px) for _, _, px in good]
            gens = [noise_generator(seed, it.key) for it, _, _ in good]
            results = explain_images(m, torch.stack(images), targets, prof, gens, num_scales, batch_size) if good else []
            for (it, stem, px), ex in zip(good, results):
                if isinstance(ex, AvarcError):
                    skipped.append(f"{it.path}: {ex}")
                else:
                    rows.append(_write(ex, px, out, stem, names, colormap, alpha, it.path))
            prog.update(task, advance=len(batch), info=f"{len(rows)} written")
    for reason in skipped:
        output.err_console.print(f"skipped: {reason}", markup=False, highlight=False)
    if rows:
        output.table(f"avarc explain · {len(rows)} written to {out} · log-likelihood ratios in nats on "
                     f"{num_scales} scales", ["image", "A", "B", "A vs null", "B vs null", "A vs B", "output"], rows)


def _parse(space: ClassSpace, model: Model, text: str | None, where: str, allow_null: bool) -> int | None:
    if text is None:
        return None
    if allow_null and text.strip().lower() == "null":
        try:
            return space.parse(text, where)     # a model may have a class named "null"
        except AvarcError:
            return model.null_class
    return space.parse(text, where)


def _load(item: Item, model: Model) -> np.ndarray | str:
    """The model's input pixels (uint8 R×R×3), or the one-line reason the image cannot be used."""
    try:
        return preprocess_pil(open_image(item.path), model.spec.image_size, model.spec.preprocess)
    except AvarcError as e:
        return str(e)
    except Exception as e:  # decoders raise many types (DecompressionBombError, MemoryError, …); skip, go on
        return f"{item.path}: not a readable image ({type(e).__name__}: {e})"


def _write(ex: Explanation, pixels: np.ndarray, out: Path, stem: str, names: list[str], colormap: str, alpha: float,
           path: str) -> tuple:
    a, b = (names[c] for c in ex.classes)
    notes = []
    if ex.label is not None:
        notes.append(f"true: {names[ex.label]}")
    if ex.pred is not None:
        notes.append(f"predicted: {names[ex.pred]}")
    save_npz(ex, out / f"{stem}.npz", (a, b))
    with atomic_write(out / f"{stem}.png") as f:
        render(pixels, ex, (a, b), colormap, alpha, ", ".join(notes)).save(f, format="PNG")
    r_a, r_b, r_ab = ex.ratios
    return path, a, b, f"{r_a:+.2f}", f"{r_b:+.2f}", f"{r_ab:+.2f}", stem
