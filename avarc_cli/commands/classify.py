"""``avarc classify``: staged generative classification of image files, folders and labelled datasets."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from core import AvarcError, Classifier, distributed
from core.data import collect, dataset_presets
from core.profiles import list_profiles
from core.results import Metrics, ResultsWriter, append_csv_summary, open_results, summary_row

from .. import output
from ..options import (BatchSizeOpt, ClassesOpt, DeviceOpt, DtypeOpt, EncoderOpt, ExtensionOpt, InputsArg, LabelsOpt,
                       ModelDirOpt, ModelOpt, PatchNumsOpt, ProfileOpt, SeedOpt, SubsetOpt, TrustPickleOpt, VaeOpt)


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
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write one JSON record per image to this .jsonl file, as results arrive.")] = None,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Append this run's summary (accuracy, recall, images/s) as a row to a CSV file.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue --out: skip images it already holds for the same model, profile and seed.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: BatchSizeOpt = None,
    seed: SeedOpt = 0,
    temperature: Annotated[float, typer.Option("--temperature", min=1e-6, help="Softmax temperature of the posterior over the final scores.")] = 1.0,
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
    dist = distributed.init(device)
    try:
        clf = Classifier.from_pretrained(model, vae=vae, extensions=extension or (), profile=profile, device=distributed.rank_device(dist, device),
                                         dtype=dtype, encoder=encoder, model_dir=model_dir, trust_pickle=trust_pickle,
                                         patch_nums=patch_nums, batch_size=batch_size)
        found = collect(inputs, clf.space, labels, dataset, subset, classes, exclude=[p for p in (out, csv) if p])
        run_key = clf.run_key(seed, found.candidates)
        resumed = {}     # rank 0 opens (or resumes) the results file; every rank learns which images are done
        done = set(dist.from_main(lambda: sorted(resumed.setdefault("state", open_results(out, resume, run_key)).done))
                   if out is not None else ())
        todo = [it for it in found.items if it.path not in done]
        metrics, state = Metrics(len(clf.profile.stages)), resumed.get("state")
        if dist.is_main:
            _notes(found.left_out, state, len(done), len(todo))
            for rec in state.done.values() if state else ():
                metrics.add(rec)
        writer = ResultsWriter(out) if out is not None and dist.is_main else None
        shown, new, start = [], 0, time.perf_counter()
        try:
            with output.progress(disable=not dist.is_main) as bar:
                task = bar.add_task("classify", total=len(todo), info="")
                for batch in clf.classify_items(todo, found.candidates, seed, temperature, topk, run_key, dist):
                    if writer:
                        writer.write(batch)
                    for rec in batch:
                        metrics.add(rec)
                    shown += batch if out is None and not found.labelled else []
                    new += len(batch)
                    rate = new / max(time.perf_counter() - start, 1e-9)
                    acc = f" · top-1 {metrics.top1:.1%}" if metrics.top1 is not None else ""
                    bar.update(task, advance=len(batch), info=f"{rate:.1f} img/s{acc}")
        finally:
            if writer:
                writer.close()
    finally:
        distributed.close(dist)
    if dist.is_main:
        seconds = time.perf_counter() - start
        _report(clf, metrics, shown, topk, new / seconds if new and seconds > 0 else None, dist.world)
        if csv is not None:
            append_csv_summary(csv, summary_row(metrics, clf.profile, run_key, dataset, subset, new, seconds))


def _notes(left_out: int, state, done: int, todo: int) -> None:
    if left_out:
        output.err_console.print(f"note: left out {left_out} labelled images whose class is not a candidate")
    if state is not None and (done or state.torn or state.dropped):
        extra = (["cut off a torn last line"] if state.torn else []) + ([f"removed {state.dropped} records of another run"] if state.dropped else [])
        output.err_console.print(f"resume: {done} images already done, {todo} to go" + (f" ({'; '.join(extra)})" if extra else ""))


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
