"""``avarc explain``: token-wise log-likelihood-ratio heatmaps (PNG panels) and raw maps (NPZ) per image."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from core import AvarcError, Classifier
from core.io.data import DataOptions, collect, read_list
from core.tasks.explain import unique_stems
from core.io.files import make_output_dir
from core.io.results import image_key
from core.tasks.explain_metrics import STARTS, image_metrics, summarise, write_metrics
from core.tasks.heatmap import COLORMAPS, check_style, save_explanation

from .. import output
from ..interrupt import interruptible
from ..options import (BatchSizeOpt, DeviceOpt, DtypeOpt, EncoderOpt, ExtensionOpt, FromListOpt, ImageColumnOpt, InputsArg,
                       LabelColumnOpt, LabelsOpt, ModelDirOpt, ModelOpt, PatchNumsOpt, ProfileOpt, SeedOpt, SplitOpt,
                       ThreadsOpt, TrustPickleOpt, VaeOpt)

Colormap = Literal[tuple(COLORMAPS)]  # type: ignore[valid-type]   (the colormaps core draws)
Start = Literal[tuple(STARTS)]  # type: ignore[valid-type]   (the start images of the insertion/deletion metrics)


def explain(
    inputs: InputsArg = None,
    model: ModelOpt = "digits",
    vae: VaeOpt = None,
    patch_nums: PatchNumsOpt = None,
    extension: ExtensionOpt = None,
    profile: ProfileOpt = None,
    cls: Annotated[Optional[str], typer.Option("--class", help="Class to explain (A): index, synset or name. Default: the true class if known, else the prediction.")] = None,
    vs: Annotated[Optional[str], typer.Option("--vs", help="Class to contrast with (B): index, synset, name or `null`. Default: the best other class.")] = None,
    label: Annotated[Optional[str], typer.Option("--label", help="True class of every input (index, synset or name): A = it, B = the best wrong class.")] = None,
    labels: LabelsOpt = "auto",
    from_list: FromListOpt = None,
    split: SplitOpt = None,
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for <image>.png and <image>.npz.")] = Path("explanations"),
    colormap: Annotated[Colormap, typer.Option("--colormap", help="Heatmap colours.")] = "turbo",
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="Heatmap opacity over the input, 0…1.")] = 0.5,
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
    metrics: Annotated[bool, typer.Option("--metrics", help="Also measure each map: insertion and deletion AUC of the class-A posterior when the finest-scale token regions are inserted into / deleted from the image best first, against random rankings; writes OUT/metrics.json and OUT/metrics.png.")] = False,
    metrics_start: Annotated[Start, typer.Option("--metrics-start", help="What insertion starts from and deletion fills in: blank (black) or blur (the image blurred).")] = "blank",
) -> None:
    """\b
    avarc explain examples/digits        # true class vs its best wrong class
    avarc explain cat.jpg -m d16 --out why      # A = prediction, B = runner-up
    avarc explain cat.jpg -m d16 --class tabby --vs tiger_cat
    avarc explain val/ -m d16 --labels folders  # A = true, B = best wrong class
    avarc explain cat.jpg -m d16 --vs null --scales 8 --colormap jet

    OUT/<image>.png shows the input, then where its tokens favour A over the unconditional model, B over it, and the more likely of A, B over the other. OUT/<image>.npz holds the signed maps (3, p, p: A vs null, B vs null, A vs B), classes [A, B], scores log p(x|A), log p(x|B), log p(x|null) and the per-token differences. Classes left open are chosen with the profile's schedule, as `avarc classify` ranks them; unreadable images are skipped. --metrics scores the A-vs-null maps by insertion/deletion AUC (the A-VARC paper's Table 3 protocol).
    """
    inputs = [*(inputs or []), *(read_list(from_list) if from_list is not None else [])]
    if not inputs:
        raise AvarcError("no inputs; pass image files or folders (e.g. `avarc explain examples/digits`)")
    check_style(colormap, alpha)
    make_output_dir(out, "out")
    clf = Classifier.from_pretrained(model, vae=vae, extensions=extension or (), profile=profile, device=device, dtype=dtype,
                                     encoder=encoder, model_dir=model_dir, trust_pickle=trust_pickle,
                                     patch_nums=patch_nums, threads=threads, batch_size=batch_size)
    target = clf.target(cls, vs, label, where=("--class", "--vs", "--label"))
    found = collect(inputs, clf.space, "none" if label else labels, exclude=list(out.iterdir()) if out.is_dir() else [],
                    data=DataOptions(split, image_column, label_column))
    names = [n.replace("_", " ") if clf.space.imagenet else n for n in clf.class_names] + ["null"]
    stems = dict(zip((it.path for it in found.items), unique_stems([it.path for it in found.items])))
    clash = [out / f"{stem}{ext}" for stem in stems.values() for ext in (".png", ".npz") if (out / f"{stem}{ext}").exists()]
    clash += [f for f in (out / "metrics.json", out / "metrics.png") if metrics and f.exists()]
    if clash and not force:
        raise AvarcError(f"--out {out}: {len(clash)} outputs already exist ({clash[0].name}…); pass --force to "
                         "overwrite them, or choose another --out")
    rows, skipped, measured, batches = [], [], [], clf.explain_items(found.items, target, scales, seed)
    with interruptible(lambda: f"interrupted: {len(rows)} explanations written to {out}"), output.progress() as bar:
        task = bar.add_task("explain", total=len(found.items), info="")
        for batch in batches:
            for it, ex in batch:
                if isinstance(ex, str):
                    skipped.append(ex)
                else:
                    a, b = save_explanation(ex, out, stems[it.path], names, colormap, alpha, image_key(it.path),
                                            exclusive=not force)
                    rows.append((it.path, a, b, *(f"{r:+.2f}" for r in ex.ratios), stems[it.path]))
                    if metrics:
                        measured.append((it.path, image_metrics(clf.model, ex, clf.profile, metrics_start, seed)))
            bar.update(task, advance=len(batch), info=f"{len(rows)} written")
    for reason in skipped:
        output.say(f"skipped: {reason}", err=True)
    if rows:
        output.table(f"avarc explain · {len(rows)} written to {out} · log-likelihood ratios in nats on "
                     f"{scales or len(clf.spec.var.patch_nums)} scales",
                     ["image", "A", "B", "A vs null", "B vs null", "A vs B", "output"], rows)

    if measured:
        written = write_metrics(measured, out)
        mean = summarise([m for _, m in measured])
        output.table(f"explanation metrics · {len(measured)} images · start {metrics_start} · mean ± s.e. · "
                     f"written to {written[0]}, {written[1].name}", ["AUC", "heatmap ranking", "random ranking", ""],
                     [(mode, *(f"{mean[k][0]:.4f} ± {mean[k][1]:.4f}" for k in (mode, f"random_{mode}")), better)
                      for mode, better in (("insertion", "higher is better"), ("deletion", "lower is better"))])
