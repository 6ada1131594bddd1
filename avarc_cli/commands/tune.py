"""``avarc tune``: the best schedule for a model and a compute budget, from one scoring pass over labelled images."""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from core import AvarcError, Classifier
from core.io.data import DataOptions, collect
from core.io.files import check_output_files, write_text
from core.io.profiles import write_profile
from core.runs.schedule_table import build_table
from core.runs.tune import model_name, shipped_points, tune as run_tune, tuned_profile

from .. import output
from ..interrupt import interruptible
from ..options import (ClassesOpt, DeviceOpt, DtypeOpt, EncoderOpt, ExtensionOpt, ImageColumnOpt, LabelColumnOpt,
                       ModelDirOpt, ModelOpt, PatchNumsOpt, SeedOpt, SplitOpt, ThreadsOpt, TrustPickleOpt, VaeOpt)


def tune(
    folder: Annotated[Path, typer.Argument(metavar="LABELLED_DIR", help="A folder of class sub-folders (labelled images), or a labelled dataset (parquet, save_to_disk folder, hf://datasets/OWNER/NAME), as `avarc classify` reads them.", show_default=False)],
    split: SplitOpt = None,
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
    model: ModelOpt = "digits",
    vae: VaeOpt = None,
    patch_nums: PatchNumsOpt = None,
    extension: ExtensionOpt = None,
    budget: Annotated[float, typer.Option("--budget", min=0.0, help="Compute budget as a fraction of `varc`'s executed GFLOPs per image (all candidates, all scales, clean tokens).")] = 0.5,
    budget_gflops: Annotated[Optional[float], typer.Option("--budget-gflops", min=0.0, help="Compute budget in executed GFLOPs per image (overrides --budget).", show_default=False)] = None,
    stages: Annotated[str, typer.Option("--stages", help="Stage counts to search: N or A..B.")] = "1..3",
    max_samples: Annotated[int, typer.Option("--max-samples", min=1, help="Most samples (1 clean + latent-noise neighbours) a stage may average.")] = 3,
    sigma: Annotated[float, typer.Option("--sigma", min=0.0, help="Latent-noise σ of the smoothing neighbours.")] = 0.1,
    holdout: Annotated[float, typer.Option("--holdout", min=0.0, max=0.95, help="Share of each class's images held out: the schedule is chosen on the rest and judged on these.")] = 0.5,
    classes: ClassesOpt = None,
    max_images: Annotated[Optional[int], typer.Option("--max-images", min=2, help="Score at most this many images (evenly spread over the sorted list).", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Profile YAML to write (run it with `avarc classify -p FILE`).")] = Path("tuned.yaml"),
    report: Annotated[Optional[Path], typer.Option("--report", help="Also write an HTML page: accuracy vs GFLOPs of every schedule, the Pareto front, shipped profiles, the choice.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out / --report if they exist.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    model_dir: ModelDirOpt = None,
    trust_pickle: TrustPickleOpt = False,
    encoder: EncoderOpt = "torch",
) -> None:
    """\b
    avarc tune val/ -m digits --budget 0.5 --out tuned.yaml   # half of varc
    avarc tune val/ -m d16-cca --max-images 500 --report tune.html
    avarc classify test/ -p tuned.yaml         # run the chosen schedule

    One pass scores every candidate class on every scale of every image, for the clean tokens and the smoothing neighbours `classify` draws (same --seed, same folder). Every schedule (stage count, scales, samples, keep, early-exit margins) is then evaluated exactly from those scores, without running the model again. The most accurate schedule within the budget on the fit part is chosen (the simplest one within one standard error of the best), judged on the held-out part, and written as a profile with a posterior temperature fitted on every tuning image by minimum NLL (only ever softening the posterior: 1 when the fit would sharpen it or there is no mistake to fit on); the held-out ECE and NLL are printed untempered and cross-fitted (each held-out image with the temperature fitted without it).
    """
    lo, hi = _stage_range(stages)
    check_output_files({"out": out, "report": report}, force)
    written: list[Path] = []
    with interruptible(lambda: "interrupted: " + (f"wrote {', '.join(map(str, written))}" if written else
                                                  f"nothing written ({out} was not written)")):
        clf = Classifier.from_pretrained(model, vae=vae, extensions=extension or (), device=device, dtype=dtype,
                                         encoder=encoder, model_dir=model_dir, trust_pickle=trust_pickle,
                                         patch_nums=patch_nums, threads=threads)
        found = collect([str(folder)], clf.space, "folders", None, None, classes, exclude=[p for p in (out, report) if p],
                        data=DataOptions(split, image_column, label_column))
        items = found.items
        if max_images is not None and max_images < len(items):
            step = len(items) / max_images
            items = [items[int(i * step)] for i in range(max_images)]

        start = time.perf_counter()
        with output.progress() as prog:
            task = prog.add_task("scoring", total=len(items), info=f"{len(found.candidates)} classes × {max_samples} samples")
            table = build_table(clf, items, found.candidates, max_samples, sigma, seed,
                                on_step=lambda n: prog.update(task, advance=n))
        scored_s = time.perf_counter() - start
        for path, reason in table.skipped:
            output.say(f"skipped {path}: {reason}", err=True)
        start = time.perf_counter()
        res = run_tune(table, clf.spec, budget=budget, budget_gflops=budget_gflops, holdout=holdout, min_stages=lo,
                       max_stages=hi, seed=seed)
        search_s = time.perf_counter() - start

        ident = model_name(clf)
        profile, note = tuned_profile(res, table, str(folder), ident, name=out.stem)
        write_profile(profile, out, note, force=force)
        written.append(out)

        _print(res)
        shipped = shipped_points(res, table, clf.spec)
        if report is not None:
            from core.runs.report import tune_report

            write_text(report, tune_report(res, shipped, title=f"avarc tune · {ident} · {folder.name}"), "report", force)
            written.append(report)
        rows = [("images (chosen on / held out)", f"{len(res.fit_idx)} / {len(res.held_idx)}"),
                ("chosen", res.chosen.describe()),
                ("top-1 on the images it was chosen on", f"{res.chosen.accuracy:.2%}"),
                ("top-1 held out (varc)", f"{res.chosen_held.accuracy:.2%} ({res.baseline_held.accuracy:.2%})"
                 if res.chosen_held else "–"),
                ("top-1, all tuning images", f"{res.chosen_all.correct}/{res.chosen_all.images}"),
                ("executed GFLOPs/image (varc)", f"{res.chosen_all.executed_gflops:.4g} ({res.baseline.executed_gflops:.4g}, "
                                                  f"{res.chosen_all.executed_gflops / res.baseline.executed_gflops:.0%})"),
                ("paper-convention GFLOPs/image", f"{res.chosen_all.paper_gflops:.4g}"),
                ("temperature (all tuning images)", res.calibration.describe()),
                ("ECE held out (T=1 → cross-fitted)", f"{res.ece_before:.4f} → {res.ece_after:.4f}" if res.ece_before is not None else "–"),
                ("NLL held out (T=1 → cross-fitted)", _nll(res)),
                ("schedules evaluated", len(res.points)),
                ("seconds (scoring pass / search)", f"{scored_s:.1f} / {search_s:.1f}"),
                ("profile", str(out))]
        if report is not None:
            rows.append(("report", str(report)))
        output.table("avarc tune", ["", "value"], rows)


def _stage_range(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:\.\.\s*(\d+)\s*)?", text)
    if not m:
        raise AvarcError(f"--stages {text!r}: give a count like 2 or a range like 1..3")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if not 1 <= lo <= hi:
        raise AvarcError(f"--stages {text!r}: counts must be ≥ 1 and the range increasing")
    return lo, hi


def _nll(res) -> str:
    if res.nll_before is None:
        return "–"
    pruned = len(res.held_idx) - res.nll_images
    return f"{res.nll_before:.3f} → {res.nll_after:.3f}" + (f" ({pruned} held-out images lost the true class to pruning)" if pruned else "")


def _print(res) -> None:
    rows = []
    front = res.front if any(p.stages == res.chosen.stages for p in res.front) else [*res.front, res.chosen]
    held = res.front_held if len(front) == len(res.front) else [*res.front_held, res.chosen_held]
    for p, h in zip(front, held):
        rows.append((p.describe(), f"{p.accuracy:.2%}", f"{h.accuracy:.2%}" if h else "–", round(p.executed_gflops, 6),
                     f"{p.executed_gflops / res.baseline.executed_gflops:.0%}", "◀ chosen" if p.stages == res.chosen.stages else ""))
    output.table("Pareto front on the fit part (stage: scales×samples→keep, exit≥margin in nats)",
                 ["schedule", "top-1 fit", "held out", "GFLOPs", "of varc", ""], rows)
