"""``avarc calibrate-ood``: fit abstention ("none of these") thresholds on in-distribution images; writes a profile."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

from ..options import (
    ClassesOpt,
    ForceOpt,
    InputOptions,
    InputsArg,
    ModelOpt,
    ModelOptions,
    OodScore,
    ProfileOpt,
    SeedOpt,
    input_options,
    model_options,
    opt,
)


@model_options("batch_size")
@input_options("border")
def calibrate_ood(
    opts: ModelOptions,
    source: InputOptions,
    inputs: InputsArg = None,
    model: ModelOpt = "digits",
    profile: ProfileOpt = None,
    classes: ClassesOpt = None,
    coverage: Annotated[float, opt("--coverage", min=0.01, max=1.0, metavar="F", show_default=True,
                                   help="Share of these in-distribution images each threshold accepts.")] = 0.95,
    ood_score: Annotated[OodScore, opt("--ood-score", show_default=True,
                                       help="The score that decides in classify (every threshold is written).")]
    = "likelihood",
    out: Annotated[Path, opt("--out", "-o", metavar="FILE", show_default=True,
                             help="Profile YAML: the schedule plus the `ood` rule.")] = Path("ood.yaml"),
    force: ForceOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """\b
    avarc calibrate-ood val/ -m digits --coverage 0.95 -o ood.yaml
    avarc classify new/ -p ood.yaml -o r.jsonl   # below it: "none of these"

    Classifies the images (in-distribution: of the model's classes; labels not needed) with the profile and sets
    each OOD score's threshold so that --coverage of them score at or above it (README, Say "none of these").
    The images must be ones the model never trained on (a held-out split): training images score higher, so
    thresholds set on them abstain on far more new images than 1 − coverage.
    """
    from dataclasses import replace

    from avarc.errors import AvarcError
    from avarc.io.data import collect
    from avarc.io.files import check_output_files, hold_outputs, refuse_inputs, with_contents
    from avarc.io.profiles import write_profile
    from avarc.runs.ood_calibration import calibrate_ood as run_calibration

    from .. import output
    from ..interrupt import interruptible

    with interruptible(lambda: f"interrupted: nothing written ({out} was not written)"):
        inputs = source.inputs(inputs)
        if not inputs:
            raise AvarcError("no inputs; pass in-distribution image files or folders (e.g. `avarc calibrate-ood "
                             "examples/digits`)")
        listed = [*opts.files(model, profile), *source.files()]
        refuse_inputs([("out", out)], [*listed, *with_contents(inputs)])   # before loading
        check_output_files({"out": out}, force)
        clf = opts.load(model, profile)
        found = collect(inputs, clf.space, "none" if source.per_class is None else "folders", None, None, classes,
                        data=source.data())
        read: list[str | Path] = [*listed, *(it.path for it in found.items if it.source is None)]
        with hold_outputs({"out": out}, read, force):
            with output.progress() as bar:
                task = bar.add_task("scoring", total=len(found.items), info="")
                fitted, used = run_calibration(clf, found.items, found.candidates, coverage, ood_score, seed,
                                               on_step=lambda n: bar.update(task, advance=n))
            fitted = replace(fitted, name=out.stem)
            where = ", ".join(str(p) for p in inputs)
            write_profile(fitted, out, f"profile {clf.profile.name} with abstention fitted by `avarc calibrate-ood` "
                                       f"on {used} images of {where} at {coverage:.0%} coverage (seed {seed})",
                          force=force)
    assert fitted.ood is not None   # the rule just fitted
    rows = [(name, f"{value:.6g}", "◀ decides" if name == ood_score else "") for name, value in fitted.ood.thresholds]
    output.table(f"avarc calibrate-ood · model {clf.source} · {used} images · accept score ≥ threshold · "
                 f"written to {out}",
                 ["score", "threshold", ""], rows)
    if used < few_images(coverage):
        output.say(f"warning: thresholds fitted on only {used} image{'s' * (used != 1)}; at {coverage:.0%} coverage "
                   f"the threshold is set by the lowest few scores; fit on {few_images(coverage)} or more "
                   "in-distribution images for the coverage to mean what it says", err=True)


def few_images(coverage: float) -> int:
    """The fewest images whose lowest (1 - coverage) share holds at least one image, and never under 10."""
    return max(10, math.ceil(1 / (1 - coverage)) if coverage < 1 else 1)
