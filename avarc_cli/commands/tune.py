"""``avarc tune``: the best schedule for a model and a compute budget, from one scoring pass over labelled images."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..options import (
    ClassesOpt,
    ForceOpt,
    InputOptions,
    JsonOpt,
    ModelOpt,
    ModelOptions,
    SeedOpt,
    input_options,
    model_options,
    opt,
    stage_range,
)


@model_options("batch_size")
@input_options("from_list", "border")
def tune(
    opts: ModelOptions,
    source: InputOptions,
    folder: Annotated[Path, typer.Argument(metavar="LABELLED_DIR", show_default=False,
                                           help="A folder of class sub-folders (labelled images).")],
    model: ModelOpt = "digits",
    budget: Annotated[float, opt("--budget", min=0.0, metavar="F", show_default=True,
                                 help="Budget as a share of `varc`'s executed GFLOPs per image.")] = 0.5,
    budget_gflops: Annotated[Optional[float], opt("--budget-gflops", min=0.0, metavar="G", help="Budget in "
                                                  "executed GFLOPs per image (wins over --budget).")] = None,
    stages: Annotated[str, opt("--stages", metavar="N|A..B", help="Stage counts to search.", callback=stage_range,
                               show_default=True)] = "1..3",
    max_samples: Annotated[int, opt("--max-samples", min=1, metavar="N", show_default=True,
                                    help="Most samples (clean + noisy neighbours) per stage.")] = 3,
    sigma: Annotated[float, opt("--sigma", min=0.0, metavar="σ", help="Latent-noise σ of the neighbours.",
                                show_default=True)] = 0.1,
    holdout: Annotated[float, opt("--holdout", min=0.0, max=0.95, metavar="F", show_default=True,
                                  help="Share of each class held out to judge the choice.")] = 0.5,
    classes: ClassesOpt = None,
    max_images: Annotated[Optional[int], opt("--max-images", min=2, metavar="N",
                                             help="Score at most N images (evenly spread).")] = None,
    out: Annotated[Path, opt("--out", "-o", metavar="FILE", help="Profile YAML to write.",
                             show_default=True)] = Path("tuned.yaml"),
    report: Annotated[Optional[Path], opt("--report", metavar="FILE",
                                          help="HTML page: every schedule, the front, the choice.")] = None,
    json_: JsonOpt = False,
    force: ForceOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """\b
    avarc tune val/ -m digits --budget 0.5 --out tuned.yaml   # half of varc
    avarc tune val/ -m d16-cca --max-images 500 --report tune.html
    avarc classify test/ -p tuned.yaml         # run the chosen schedule

    One pass scores every class on every scale of every image (clean and noisy, as classify draws them); every
    schedule is then replayed from those scores. The most accurate one within the budget on the fit part is
    chosen, judged on the held-out part and written as a profile with a fitted temperature
    (README, Choosing a schedule).
    """
    from avarc.errors import AvarcError
    from avarc.io.data import check_inputs, collect
    from avarc.io.files import check_output_files, hold_outputs, refuse_inputs, with_contents, write_text
    from avarc.io.profiles import write_profile
    from avarc.runs.schedule_table import build_table
    from avarc.runs.tune import model_name, shipped_points, tuned_profile
    from avarc.runs.tune import tune as run_tune

    from .. import output
    from ..interrupt import interruptible
    from ..render import tune_summary

    lo, hi = stage_range(stages)   # typer has run this callback already: a tuple, typed as the str it parsed
    check_inputs([folder])
    refuse_inputs([("out", out), ("report", report)],           # before loading: the obvious cases, before --force
                  [*opts.files(model), *with_contents([folder])])
    check_output_files({"out": out, "report": report}, force)
    written: list[Path] = []
    with interruptible(lambda: "interrupted: " + (f"wrote {', '.join(map(str, written))}" if written else
                                                  f"nothing written ({out} was not written)")):
        clf = opts.load(model)
        try:
            found = collect([str(folder)], clf.space, "folders", None, None, classes, data=source.data())
        except AvarcError as e:       # collect words a missing class folder for classify's --labels
            if e.option != "labels":
                raise
            raise AvarcError(f"{str(e).split(';')[0]}; tune needs labelled images: a folder of class sub-folders "
                             "(LABELLED_DIR/<class>/image)") from None
        read: list[str | Path] = [*opts.files(model), *(it.path for it in found.items if it.source is None)]
        with hold_outputs({"out": out, "report": report}, read, force):
            items = found.items
            if max_images is not None and max_images < len(items):
                items = [items[int(i * len(items) / max_images)] for i in range(max_images)]
            start = time.perf_counter()
            with output.progress() as prog:
                task = prog.add_task("scoring", total=len(items),
                                     info=f"{len(found.candidates)} classes × {max_samples}")
                table = build_table(clf, items, found.candidates, max_samples, sigma, seed,
                                    on_step=lambda n: prog.update(task, advance=n))
            scored_s, start = time.perf_counter() - start, time.perf_counter()
            for _, reason in table.skipped:
                output.say(f"skipped: {output.one_line(reason)}", err=True)        # the reason names the file
            with output.err_console.status("searching schedules…"):
                res = run_tune(table, clf.spec, budget=budget, budget_gflops=budget_gflops, holdout=holdout,
                               min_stages=lo, max_stages=hi, seed=seed)
            ident = model_name(clf)
            profile, note = tuned_profile(res, table, str(folder), ident, name=out.stem)
            write_profile(profile, out, note, force=force)
            written.append(out)
            if report is not None:
                from avarc.runs.report import tune_report

                page = tune_report(res, shipped_points(res, table, clf.spec),
                                   title=f"avarc tune · {ident} · {folder.name}")
                write_text(report, page, "report", force)
                written.append(report)
    tune_summary(res, table.labels, out, report, (scored_s, time.perf_counter() - start), json_, clf.source)
