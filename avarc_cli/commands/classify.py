"""``avarc classify``: staged generative classification of image files, folders and labelled datasets."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from core import AvarcError, Classifier, distributed
from core.data import collect, dataset_presets
from core.profiles import list_profiles
from core.files import check_output_files
from core.results import Metrics, append_csv_summary, check_csv, image_key, results_file, summary_row

from .. import output
from ..interrupt import interrupt_code, say_interrupted, stop_on_signals
from ..options import (BatchSizeOpt, ClassesOpt, DeviceOpt, DtypeOpt, EncoderOpt, ExtensionOpt, InputsArg, LabelsOpt,
                       ModelDirOpt, ModelOpt, PatchNumsOpt, ProfileOpt, SeedOpt, SubsetOpt, ThreadsOpt, TrustPickleOpt, VaeOpt)


def classify(
    inputs: InputsArg = None,
    model: ModelOpt = "digits",
    vae: VaeOpt = None,
    patch_nums: PatchNumsOpt = None,
    extension: ExtensionOpt = None,
    profile: ProfileOpt = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help=f"Labelled evaluation preset for the folder you pass: {', '.join(dataset_presets())}.")] = None,
    subset: SubsetOpt = None,
    classes: ClassesOpt = None,
    labels: LabelsOpt = "auto",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write one JSON record per image to this .jsonl file, as results arrive (locked for the run: one writer at a time).")] = None,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Append this run's summary (accuracy, recall, images/s) as a row to a CSV file.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue --out: skip images it already holds for the same model, profile and seed (a file of another run is refused, never changed).")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: BatchSizeOpt = None,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", min=1e-6, help="Softmax temperature of the posterior over the final scores (default: the profile's, from `avarc tune`, else 1).", show_default=False)] = None,
    topk: Annotated[int, typer.Option("--topk", min=1, help="How many ranked classes (and posterior entries) each record keeps.")] = 5,
    list_profiles_: Annotated[bool, typer.Option("--list-profiles", help="List the shipped profiles with their stages and exit.")] = False,
    model_dir: ModelDirOpt = None,
    trust_pickle: TrustPickleOpt = False,
    encoder: EncoderOpt = "torch",
) -> None:
    """\b
    avarc classify examples/digits       # demo model: labelled folders → accuracy
    avarc classify photo.jpg -m d16 --topk 3    # after `avarc download d16`
    avarc classify val/ -m d16 --dataset imagenet --subset imagenet100 -o v.jsonl
    avarc classify a/ -m d20-cca --dataset imagenet-a -p adaptive -o a.jsonl
    avarc classify a/ -m d20-cca --dataset imagenet-a -o a.jsonl --resume
    torchrun --nproc_per_node 8 -m avarc_cli classify val/ -m d30 -o val.jsonl
    avarc classify --list-profiles       # the shipped schedules, stage by stage

    Each stage of the profile scores the surviving candidate classes by the exact log-likelihood of the image's VAR tokens on the first scales, keeps the best, and the last stage's best is the prediction. Unreadable images are recorded as skipped; --resume continues an interrupted --out file.
    """
    if list_profiles_:
        output.table("profiles (`--profile NAME` or a YAML file)", ["name", "stages", "sigma", "description"],
                     [(p.name, "\n".join(f"{i}. {s.describe()}" for i, s in enumerate(p.stages, 1)), p.sigma, p.description)
                      for p in list_profiles()])
        return
    if not inputs:
        raise AvarcError("no inputs; pass image files or folders (e.g. `avarc classify examples/digits`)")
    if resume and out is None:
        raise AvarcError("--resume continues an --out file; pass --out FILE.jsonl")
    check_output_files({"--out": out, "--csv": csv})
    dist, safe = distributed.init(device), None       # safe: records in --out once classifying has begun
    try:
        with stop_on_signals():
            clf = Classifier.from_pretrained(model, vae=vae, extensions=extension or (), profile=profile,
                                             device=distributed.rank_device(dist, device), dtype=dtype, encoder=encoder,
                                             model_dir=model_dir, trust_pickle=trust_pickle, patch_nums=patch_nums, threads=threads,
                                             batch_size=batch_size)
            found = collect(inputs, clf.space, labels, dataset, subset, classes, exclude=[p for p in (out, csv) if p])
            run_key, metrics = clf.run_key(seed, found.candidates), Metrics(len(clf.profile.stages))
            if csv is not None and dist.is_main:
                check_csv(csv, list(summary_row(metrics, clf.profile, run_key, dataset, subset, 0, 0.0)))
            with results_file(out, resume, run_key, dist) as results:
                todo = [it for it in found.items if image_key(it.path) not in results.done]
                if dist.is_main:
                    _notes(clf, found, results, len(todo))
                for rec in results.resumed.done.values() if results.resumed else ():
                    metrics.add(rec)
                shown, new, bad, start, safe = [], 0, 0, time.perf_counter(), len(results.done)
                with output.progress(disable=not dist.is_main) as bar:
                    task = bar.add_task("classify", total=len(todo), info="")
                    for batch in clf.classify_items(todo, found.candidates, seed, temperature, topk, run_key, dist):
                        results.write(batch)
                        for rec in batch:
                            metrics.add(rec)
                        new, safe, bad = new + len(batch), safe + len(batch), bad + sum(r["status"] != "ok" for r in batch)
                        shown += batch if out is None and not found.labelled else []
                        acc = f" · top-1 {metrics.top1:.1%}" if metrics.top1 is not None else ""
                        bar.update(task, advance=len(batch), info=f"{new / (time.perf_counter() - start):.1f} img/s{acc}")
    except KeyboardInterrupt:
        if dist.is_main:
            say_interrupted(out, safe)
        raise typer.Exit(interrupt_code()) from None
    finally:
        distributed.close(dist)
    if not dist.is_main:
        return
    seconds = time.perf_counter() - start
    _report(clf, metrics, shown, topk, new / seconds if new else None, dist.world)
    if csv is not None and new:
        append_csv_summary(csv, summary_row(metrics, clf.profile, run_key, dataset, subset, new, seconds))
    elif csv is not None:
        output.err_console.print(f"note: nothing new was classified; no row added to {csv}", markup=False)
    if new and bad == new:
        output.err_console.print(f"error: none of the {new} images could be read (see the skipped records); "
                                 "check the inputs", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _notes(clf: Classifier, found, results, todo: int) -> None:
    say = lambda text: output.err_console.print(text, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    if found.left_out:
        say(f"note: left out {found.left_out} labelled images whose class is not a candidate")
    big = [i for i, st in enumerate(clf.profile.stages, 1) if st.keep > len(found.candidates)]
    if big:
        say(f"warning: profile {clf.profile.name} keeps more classes (stage {big[0]}: {clf.profile.stages[big[0] - 1].keep}) "
            f"than there are candidates ({len(found.candidates)}); those stages keep every candidate")
    if results.resumed is not None and (results.done or results.resumed.torn):
        say(f"resume: {len(results.done)} images already done, {todo} to go"
            + (" (cut off a torn last line)" if results.resumed.torn else ""))


def _report(clf: Classifier, m: Metrics, shown: list[dict], topk: int, rate: float | None, world: int) -> None:
    if shown:
        output.table("predictions", ["image", "prediction", "posterior", "runners-up"],
                     [(r["path"], "skipped", None, r["error"]) if r["status"] != "ok" else
                      (r["path"], r["pred_name"], f"{r['posterior'][0]['p']:.3f}", ", ".join(t["name"] for t in r["topk"][1:topk]))
                      for r in shown])
    pct = lambda x: "–" if x is None else f"{100 * x:.2f}%"  # noqa: E731
    rows = [("images", m.images), ("classified", m.images - m.skipped), ("skipped", m.skipped)]
    if m.labelled:
        rows += [("top-1", pct(m.top1)), ("top-5", pct(m.top5))]
        rows += [(f"stage {i} recall ({st.scales} scales, {st.samples}× → keep {st.keep})", pct(r))
                 for i, (st, r) in enumerate(zip(clf.profile.stages, m.recall), 1)]
    if any(st.exit_margin is not None for st in clf.profile.stages):
        rows.append(("early exits", m.early_exits))
    rows.append(("images/s", f"{rate:.2f}" if rate else "–"))
    rows += [("processes", world)] if world > 1 else []
    output.table(f"avarc classify · profile {clf.profile.name}", ["metric", "value"], rows)
