"""``avarc calibrate-ood``: fit abstention ("none of these") thresholds on in-distribution images; writes a profile."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from core import AvarcError, Classifier
from core.io.data import collect
from core.io.files import check_output_files
from core.io.profiles import write_profile
from core.runs.tune import calibrate_ood as run_calibration
from core.tasks.ood import DEFAULT_OOD_SCORE, OOD_SCORES, check_score

from .. import output
from ..options import (ClassesOpt, DeviceOpt, DtypeOpt, EncoderOpt, ExtensionOpt, InputsArg, ModelDirOpt, ModelOpt,
                       PatchNumsOpt, ProfileOpt, SeedOpt, ThreadsOpt, TrustPickleOpt, VaeOpt)


def calibrate_ood(
    inputs: InputsArg = None,
    model: ModelOpt = "digits",
    vae: VaeOpt = None,
    patch_nums: PatchNumsOpt = None,
    extension: ExtensionOpt = None,
    profile: ProfileOpt = None,
    classes: ClassesOpt = None,
    coverage: Annotated[float, typer.Option("--coverage", min=0.01, max=1.0, help="Share of these in-distribution images each threshold accepts.")] = 0.95,
    ood_score: Annotated[str, typer.Option("--ood-score", help=f"The score that decides in `avarc classify`: {', '.join(OOD_SCORES)} (every score's threshold is written).")] = DEFAULT_OOD_SCORE,
    out: Annotated[Path, typer.Option("--out", "-o", help="Profile YAML to write: the profile's schedule plus the `ood` rule (run it with `avarc classify -p FILE`).")] = Path("ood.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    model_dir: ModelDirOpt = None,
    trust_pickle: TrustPickleOpt = False,
    encoder: EncoderOpt = "torch",
) -> None:
    """\b
    avarc calibrate-ood val/ -m digits --coverage 0.95 -o ood.yaml
    avarc classify new/ -p ood.yaml -o r.jsonl     # pred null, status "abstained" below the threshold

    Classifies the images (in-distribution: images of the model's classes, labels not needed) with the profile, and sets each OOD score's threshold so that --coverage of them score at or above it. `avarc classify` with the written profile answers "none of these" (pred null, status abstained) for an image whose --ood-score is below its threshold.
    """
    if not inputs:
        raise AvarcError("no inputs; pass in-distribution image files or folders (e.g. `avarc calibrate-ood examples/digits`)")
    check_score(ood_score)
    check_output_files({"out": out}, force)
    clf = Classifier.from_pretrained(model, vae=vae, extensions=extension or (), profile=profile, device=device,
                                     dtype=dtype, encoder=encoder, model_dir=model_dir, trust_pickle=trust_pickle,
                                     patch_nums=patch_nums, threads=threads)
    found = collect(inputs, clf.space, "none", None, None, classes, exclude=[out])
    with output.progress() as bar:
        task = bar.add_task("scoring", total=len(found.items), info="")
        fitted, used = run_calibration(clf, found.items, found.candidates, coverage, ood_score, seed,
                                       on_step=lambda n: bar.update(task, advance=n))
    fitted = replace(fitted, name=out.stem)
    where = ", ".join(str(p) for p in inputs)
    write_profile(fitted, out, f"profile {clf.profile.name} with abstention fitted by `avarc calibrate-ood` on {used} "
                               f"images of {where} at {coverage:.0%} coverage (seed {seed})", force=force)
    rows = [(name, f"{value:.6g}", "◀ decides" if name == ood_score else "") for name, value in fitted.ood.thresholds]
    output.table(f"avarc calibrate-ood · {used} images · accept score ≥ threshold · written to {out}",
                 ["score", "threshold", ""], rows)
