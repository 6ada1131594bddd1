"""``avarc classify``: staged generative classification of image files, folders and labelled datasets."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..options import (
    ClassesOpt,
    InputOptions,
    InputsArg,
    LabelsOpt,
    ModelOpt,
    ModelOptions,
    OodScore,
    ProfileOpt,
    SeedOpt,
    SubsetOpt,
    input_options,
    model_options,
    opt,
)


@model_options()
@input_options()
def classify(
    opts: ModelOptions,
    source: InputOptions,
    inputs: InputsArg = None,
    model: ModelOpt = "digits",
    profile: ProfileOpt = None,
    dataset: Annotated[Optional[str], opt("--dataset", metavar="NAME",
                                          help="Labelled preset: imagenet, imagenet-a, objectnet, …")] = None,
    subset: SubsetOpt = None,
    classes: ClassesOpt = None,
    labels: LabelsOpt = "auto",
    out: Annotated[Optional[Path], opt("--out", "-o", metavar="FILE",
                                       help="Write a JSON record per image (.jsonl; -: stdout): "
                                            "prediction, ranking, stages, status, run identity "
                                            "(schemas/record.schema.json).")] = None,
    csv: Annotated[Optional[Path], opt("--csv", metavar="FILE", help="Append the run's row to a CSV experiment log "
                                       "(model SHA, dtype, profile, OOD rule, top-1, abstained, GFLOPs, "
                                       "seconds; README).")] = None,
    resume: Annotated[bool, opt("--resume", help="Continue --out (the same run only).")] = False,
    seed: SeedOpt = 0,
    temperature: Annotated[Optional[float], opt("--temperature", min=1e-6, metavar="T",
                                                help="Posterior temperature (default: the profile's).")] = None,
    topk: Annotated[int, opt("--topk", min=1, metavar="K", help="Ranked classes kept per record.",
                             show_default=True)] = 5,
    ood_score: Annotated[Optional[OodScore], opt("--ood-score", help="Abstention score (default: profile's).")] = None,
    list_profiles_: Annotated[bool, opt("--list-profiles", help="List the shipped profiles and exit.")] = False,
) -> None:
    """\b
    avarc classify examples/digits       # demo model: labelled folders → accuracy
    avarc classify photo.jpg -m d16 --topk 3
    avarc classify val/ -m d16 --dataset imagenet --subset imagenet100 -o v.jsonl
    avarc classify a/ -m d20-cca --dataset imagenet-a -o a.jsonl --resume
    torchrun --nproc_per_node 8 -m avarc classify val/ -m d30 -o val.jsonl
    avarc classify objectnet-1.0/ -m d16 --dataset objectnet -o on.jsonl
    avarc classify val.parquet -m d16 --split validation   # or hf://datasets/…

    Each stage of the profile scores the surviving classes by the exact log-likelihood of the image's VAR tokens
    on the first scales and keeps the best. Unreadable images are recorded as skipped.
    """
    from avarc.errors import AvarcError
    from avarc.io import distributed
    from avarc.io.data import collect
    from avarc.io.files import check_output_files, refuse_inputs
    from avarc.io.results import STDOUT
    from avarc.runs.classify_run import classify_run

    from .. import output
    from ..interrupt import interruptible, results_safe
    from ..render import SHOWN, classify_summary, profiles_table

    if list_profiles_:
        return profiles_table()
    inputs = source.inputs(inputs)
    if not inputs:
        raise AvarcError("no inputs; pass image files or folders (e.g. `avarc classify examples/digits`)")
    if resume and out is None:
        raise AvarcError("--resume continues an --out file; pass --out FILE.jsonl")
    to_stdout = out is not None and str(out) == STDOUT
    if to_stdout:
        output.keep_stdout_for_data()
    check_output_files({"out": None if to_stdout else out, "csv": csv})
    dist, run = distributed.init(opts.device), None
    try:
        with interruptible(lambda: results_safe(out, None if run is None else run.safe) if dist.is_main else None):
            clf = opts.load(model, profile, device=distributed.rank_device(dist, opts.device))
            found = collect(inputs, clf.space, labels, dataset, subset, classes, exclude=[p for p in (out, csv) if p],
                            data=source.data())
            refuse_inputs([("out", out), ("csv", csv)],
                          [*opts.files(model, profile), *source.files(),
                           *(it.path for it in found.items if it.source is None)])
            with classify_run(clf, found, out, resume, csv=csv, seed=seed, temperature=temperature, topk=topk,
                              dist=dist, labels=labels, keep_records=0 if found.labelled else SHOWN,
                              ood_score=ood_score) as run:
                for note in run.notes() if dist.is_main else ():
                    output.say(note, err=True)
                with output.progress(disable=not dist.is_main) as bar:
                    task = bar.add_task("classify", total=len(run.todo), info="")
                    for batch in run:
                        acc = f" · top-1 {run.metrics.top1:.1%}" if run.metrics.top1 is not None else ""
                        bar.update(task, advance=len(batch), info=f"{run.rate or 0.0:.1f} img/s{acc}")
    finally:
        distributed.close(dist)
    if not dist.is_main:
        return
    classify_summary(run, topk, dist.world, None if out is None else "stdout" if to_stdout else out)
    if csv is not None and not run.append_summary(csv, dataset, subset, inputs):
        output.say(f"note: nothing new was classified; no row added to {csv}", err=True)
    if run.all_unreadable:
        output.say(f"error: none of the {run.new} images could be read (see the skipped records); check the inputs",
                   err=True)
        raise typer.Exit(1)

