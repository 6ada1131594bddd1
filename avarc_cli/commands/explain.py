"""``avarc explain``: token-wise log-likelihood-ratio heatmaps (PNG panels) and raw maps (NPZ) per image."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from ..options import (Colormap, ForceOpt, InputsArg, LabelsOpt, ModelOpt, ModelOptions, ProfileOpt, SeedOpt,
                       model_options, opt)


@model_options()
def explain(
    opts: ModelOptions,
    inputs: InputsArg = None,
    model: ModelOpt = "digits",
    profile: ProfileOpt = None,
    cls: Annotated[Optional[str], opt("--class", metavar="A", help="Class to explain (default: true, else predicted).")] = None,
    vs: Annotated[Optional[str], opt("--vs", metavar="B", help="Class to contrast (or null; default: best other).")] = None,
    label: Annotated[Optional[str], opt("--label", metavar="Y", help="True class of every input.")] = None,
    labels: LabelsOpt = "auto",
    out: Annotated[Path, opt("--out", "-o", metavar="DIR", help="Folder for IMAGE.png and IMAGE.npz.",
                             show_default=True)] = Path("explanations"),
    colormap: Annotated[Colormap, opt("--colormap", help="Heatmap colours.", show_default=True)] = "turbo",
    alpha: Annotated[float, opt("--alpha", min=0.0, max=1.0, metavar="A", help="Heatmap opacity, 0…1.",
                                show_default=True)] = 0.5,
    shared_scale: Annotated[bool, opt("--shared-scale", help="One colour scale (nats) for all three maps.")] = False,
    scales: Annotated[Optional[int], opt("--scales", metavar="S", help="Use the first S scales only.")] = None,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
) -> None:
    """\b
    avarc explain examples/digits        # true class vs its best wrong class
    avarc explain cat.jpg -m d16 --out why      # A = prediction, B = runner-up
    avarc explain cat.jpg -m d16 --class tabby --vs tiger_cat
    avarc explain cat.jpg -m d16 --vs null --scales 8 --colormap jet

    OUT/IMAGE.png shows the input and where its tokens favour A over the unconditional model, B over it, and A
    over B, each with a colour bar in nats; OUT/IMAGE.npz holds the signed maps and scores (README, Explain).
    """
    from core.errors import AvarcError
    from core.io.data import collect
    from core.io.files import make_output_dir
    from core.tasks.explain import unique_stems
    from core.tasks.heatmap import check_style

    from .. import output
    from ..interrupt import interruptible

    if not inputs:
        raise AvarcError("no inputs; pass image files or folders (e.g. `avarc explain examples/digits`)")
    check_style(colormap, alpha)
    make_output_dir(out, "out")
    clf = opts.load(model, profile)
    target = clf.target(cls, vs, label, where=("--class", "--vs", "--label"))
    found = collect(inputs, clf.space, "none" if label else labels, exclude=list(out.iterdir()) if out.is_dir() else [])
    stems = dict(zip((it.path for it in found.items), unique_stems([it.path for it in found.items])))
    clash = [out / f"{s}{ext}" for s in stems.values() for ext in (".png", ".npz") if (out / f"{s}{ext}").exists()]
    if clash and not force:
        raise AvarcError(f"--out {out}: {len(clash)} outputs already exist ({clash[0].name}…); pass --force to "
                         "overwrite them, or choose another --out")
    rows, skipped, batches = [], [], clf.explain_items(found.items, target, scales, seed)
    with interruptible(lambda: f"interrupted: {len(rows)} explanations written to {out}"), output.progress() as bar:
        task = bar.add_task("explain", total=len(found.items), info="")
        for batch in batches:
            for it, ex in batch:
                if isinstance(ex, str):
                    skipped.append(ex)
                    continue
                ex.save(out / f"{stems[it.path]}.png", colormap=colormap, alpha=alpha, shared_scale=shared_scale)
                rows.append((it.path, ex.names[0], ex.names[1], *(f"{r:+.2f}" for r in ex.ratios), stems[it.path]))
            bar.update(task, advance=len(batch), info=f"{len(rows)} written")
    for reason in skipped:
        output.err_console.print(f"skipped: {reason}", markup=False, highlight=False)
    if rows:
        output.table(f"avarc explain · {len(rows)} written to {out} · log-likelihood ratios in nats on "
                     f"{scales or len(clf.spec.var.patch_nums)} scales",
                     ["image", "A", "B", "A vs null", "B vs null", "A vs B", "output"], rows)
