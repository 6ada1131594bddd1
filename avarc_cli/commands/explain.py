"""``avarc explain``: token-wise log-likelihood-ratio heatmaps (PNG panels) and raw maps (NPZ) per image."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from .. import panels
from ..options import (
    Colormap,
    ForceOpt,
    InputOptions,
    InputsArg,
    LabelsOpt,
    MetricsStart,
    ModelOptions,
    ProfileOpt,
    input_options,
    model_options,
    opt,
)


@model_options()
@input_options("border")
def explain(
    opts: ModelOptions,
    source: InputOptions,
    inputs: InputsArg = None,
    model: Annotated[Optional[str], opt("--model", "-m", metavar="NAME", help="Name, folder or VAR file (default: "
                                        "digits).")] = None,
    profile: ProfileOpt = None,
    run: Annotated[Optional[Path], opt("--from", metavar="RUN.jsonl",
                                       help="A classify run's images, model and classes.")] = None,
    mistakes: Annotated[bool, opt("--mistakes", help="With --from: only the run's mistakes.")] = False,
    cls: Annotated[Optional[str], opt("--class", metavar="A",
                                      help="Class to explain (default: true, else predicted).")] = None,
    vs: Annotated[Optional[str], opt("--vs", metavar="B",
                                     help="Class to contrast (or null; default: best other).")] = None,
    label: Annotated[Optional[str], opt("--label", metavar="Y", help="True class of every input.")] = None,
    labels: LabelsOpt = "auto",
    out: Annotated[Path, opt("--out", "-o", metavar="DIR", help="Folder for the PNGs and NPZs.",
                             show_default=True)] = Path("explanations"),
    colormap: Annotated[Colormap, opt("--colormap", help="Heatmap colours.", show_default=True)] = "turbo",
    alpha: Annotated[float, opt("--alpha", min=0.0, max=1.0, metavar="A", help="Heatmap opacity, 0…1.",
                                show_default=True)] = 0.5,
    shared_scale: Annotated[bool, opt("--shared-scale", help="One colour scale (nats) for all three maps.")] = False,
    scales: Annotated[Optional[int], opt("--scales", metavar="S", help="Use the first S scales only.")] = None,
    metrics: Annotated[bool, opt("--metrics", help="Insertion/deletion AUC vs random (metrics.json).")] = False,
    metrics_start: Annotated[MetricsStart, opt("--metrics-start", show_default=True,
                                               help="Insertion's start, deletion's fill.")] = "blank",
    seed: Annotated[Optional[int], opt("--seed", help="Smoothing-noise seed (default: 0, or the run's).")] = None,
    counterfactual: Annotated[Optional[str], opt("--counterfactual", metavar="CLASS",
                                                 help="Redraw each image as CLASS (README).")] = None,
    keep_scales: Annotated[int, opt("--keep-scales", min=0, metavar="K", show_default=True,
                                    help="With --counterfactual: own scales kept.")] = 1,
    force: ForceOpt = False,
) -> None:
    """\b
    avarc explain examples/digits        # true class vs its best wrong class
    avarc explain cat.jpg -m d16 --out why      # A = prediction, B = runner-up
    avarc explain cat.jpg -m d16 --class tabby --vs tiger_cat
    avarc explain --from run.jsonl --mistakes --out why   # then: avarc report
    avarc explain --from run.jsonl digits/3 --vs 8 --metrics   # options apply
    avarc explain examples/digits/3 --counterfactual 8   # 3s drawn as 8s

    OUT/IMAGE.png: where the tokens favour A over the unconditional model, B over it, A over B (nats);
    OUT/IMAGE.npz: the signed maps (README). --metrics: insertion/deletion AUC of the A-vs-null maps (A-VARC's
    Table 3). --from: each image on the stage of the run that decided it.
    """
    from avarc.errors import AvarcError
    from avarc.io.data import collect
    from avarc.io.files import make_output_dir
    from avarc.tasks.heatmap import check_style

    if counterfactual is not None:
        given = [f for f, v in (("--class", cls), ("--vs", vs), ("--metrics", metrics), ("--scales", scales)) if v]
        if given:
            raise AvarcError(f"{given[0]} is for heatmaps; --counterfactual draws images instead: drop one of them")
        return _counterfactuals(opts, source, inputs, run, mistakes, model, profile, labels, out, counterfactual,
                                keep_scales, seed or 0, force)
    inputs = source.inputs(inputs)
    if run is not None:
        return panels.explain_run(opts, source, inputs, run, mistakes, model, profile, cls, vs, label, labels, out,
                                  colormap, alpha, shared_scale, scales, metrics_start if metrics else None, seed,
                                  force)
    if mistakes:
        raise AvarcError("picks a run's mistakes; pass the run with --from RUN.jsonl", option="mistakes")
    if not inputs:
        raise AvarcError("no inputs; pass image files or folders (e.g. `avarc explain examples/digits`)")
    check_style(colormap, alpha)
    make_output_dir(out, "out")
    clf = opts.load(model or "digits", profile)
    target = clf.target(cls, vs, label, where=("--class", "--vs", "--label"))
    found = collect(inputs, clf.space, "none" if label else labels, exclude=list(out.iterdir()) if out.is_dir() else [],
                    data=source.data())
    panels.write(clf, found.items, target, out, colormap, alpha, shared_scale, scales, seed or 0, force,
                 metrics=metrics_start if metrics else None)



def _counterfactuals(opts: ModelOptions, source: InputOptions, inputs: Optional[list[Path]], run: Optional[Path],
                     mistakes: bool, model: Optional[str], profile: Optional[str], labels: str, out: Path,
                     target: str, keep_scales: int, seed: int, force: bool) -> None:
    """``--counterfactual``: every input (or the run's images) drawn as the class asked."""
    from avarc.errors import AvarcError
    from avarc.io.data import collect
    from avarc.io.files import make_output_dir

    from .. import counterfactuals

    if run is not None:
        return counterfactuals.from_run(opts, run, mistakes, model, profile, out, target, keep_scales, force)
    if target.lower() == counterfactuals.TRUE:
        raise AvarcError("--counterfactual true needs --from RUN (the run's labels); name a class for images")
    inputs = source.inputs(inputs)
    if not inputs:
        raise AvarcError("no inputs; pass image files or folders (e.g. `avarc explain examples/digits/3 "
                         "--counterfactual 8`)")
    make_output_dir(out, "out")
    clf = opts.load(model or "digits", profile)
    cls = clf.class_id(target, "--counterfactual")
    found = collect(inputs, clf.space, labels, exclude=list(out.iterdir()) if out.is_dir() else [], data=source.data())
    counterfactuals.write(clf, found.items, {it.path: cls for it in found.items}, out, keep_scales, seed, force)
