"""``avarc classify``: staged generative classification of image files, folders and labelled datasets."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from core import AvarcError, Classifier
from core.io import distributed
from core.io.data import DataOptions, collect, dataset_presets, read_list
from core.runs.classify_run import ClassifyRun, classify_run
from core.io.files import check_output_files
from core.io.profiles import list_profiles
from core.tasks.ood import check_score

from .. import output
from ..interrupt import interruptible, results_safe
from ..options import (BatchSizeOpt, BorderOpt, ClassesOpt, DeviceOpt, DtypeOpt, EncoderOpt, ExtensionOpt, FromListOpt,
                       ImageColumnOpt, InputsArg, LabelColumnOpt, LabelsOpt, ModelDirOpt, ModelOpt, PatchNumsOpt, ProfileOpt,
                       SeedOpt, SplitOpt, SubsetOpt, ThreadsOpt, TrustPickleOpt, VaeOpt)


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
    from_list: FromListOpt = None,
    split: SplitOpt = None,
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
    border: BorderOpt = 2,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write one JSON record per image to this .jsonl file, as results arrive (locked for the run: one writer at a time).")] = None,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Append this run's summary (accuracy, recall, images/s) as a row to a CSV file.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue --out: skip images it already holds for the same run (model weights, profile, seed, dtype, temperature, --topk, --labels; a file of another run is refused, never changed, naming the difference).")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: BatchSizeOpt = None,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", min=1e-6, help="Softmax temperature of the posterior over the final scores (default: the profile's, from `avarc tune`, else 1).", show_default=False)] = None,
    topk: Annotated[int, typer.Option("--topk", min=1, help="How many ranked classes (and posterior entries) each record keeps.")] = 5,
    ood_score: Annotated[Optional[str], typer.Option("--ood-score", help="OOD score that decides abstention: likelihood (lower bound of log p(x) per token), ratio (log p(x|pred) − log p(x|null)) or posterior (its maximum). Default: the profile's, from `avarc calibrate-ood`, else likelihood.", show_default=False)] = None,
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
    avarc classify objectnet-1.0/ -m d16 --dataset objectnet -o on.jsonl
    avarc classify val.parquet -m d16 --split validation -o v.jsonl   # also save_to_disk folders, hf://datasets/…
    avarc classify --from-list mine.txt -m d16    # image paths, one a line
    avarc classify --list-profiles       # the shipped schedules, stage by stage

    Each stage of the profile scores the surviving candidate classes by the exact log-likelihood of the image's VAR tokens on the first scales, keeps the best, and the last stage's best is the prediction. Unreadable images are recorded as skipped; --resume continues an interrupted --out file.
    """
    if list_profiles_:
        output.table("profiles (`--profile NAME` or a YAML file)", ["name", "stages", "sigma", "description"],
                     [(p.name, "\n".join(f"{i}. {s.describe()}" for i, s in enumerate(p.stages, 1)), p.sigma, p.description)
                      for p in list_profiles()])
        return
    inputs = [*(inputs or []), *(read_list(from_list) if from_list is not None else [])]
    if not inputs:
        raise AvarcError("no inputs; pass image files or folders (e.g. `avarc classify examples/digits`)")
    if resume and out is None:
        raise AvarcError("--resume continues an --out file; pass --out FILE.jsonl")
    check_output_files({"out": out, "csv": csv})
    if ood_score is not None:
        check_score(ood_score)
    dist, run = distributed.init(device), None
    try:
        with interruptible(lambda: results_safe(out, None if run is None else run.safe) if dist.is_main else None):
            clf = Classifier.from_pretrained(model, vae=vae, extensions=extension or (), profile=profile,
                                             device=distributed.rank_device(dist, device), dtype=dtype, encoder=encoder,
                                             model_dir=model_dir, trust_pickle=trust_pickle, patch_nums=patch_nums, threads=threads,
                                             batch_size=batch_size)
            found = collect(inputs, clf.space, labels, dataset, subset, classes, exclude=[p for p in (out, csv) if p],
                            data=DataOptions(split, image_column, label_column, border))
            with classify_run(clf, found, out, resume, csv=csv, seed=seed, temperature=temperature, topk=topk, dist=dist,
                              labels=labels,
                              keep_records=out is None and not found.labelled, ood_score=ood_score) as run:
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
    _report(run, topk, dist.world)
    if csv is not None and not run.append_summary(csv, dataset, subset):
        output.say(f"note: nothing new was classified; no row added to {csv}", err=True)
    if run.all_unreadable:
        output.say(f"error: none of the {run.new} images could be read (see the skipped records); check the inputs",
                   err=True)
        raise typer.Exit(1)


def _report(run: ClassifyRun, topk: int, world: int) -> None:
    m, profile = run.metrics, run.clf.profile
    if run.records:
        output.table("predictions", ["image", "prediction", "posterior", "runners-up"],
                     [(r["path"], "skipped", None, r["error"]) if r["status"] == "skipped" else
                      (r["path"], "none of these (abstained)", None, _ood_note(r)) if r["status"] == "abstained" else
                      (r["path"], r["pred_name"], f"{r['posterior'][0]['p']:.3f}", ", ".join(t["name"] for t in r["topk"][1:topk]))
                      for r in run.records])
    pct = lambda x: "–" if x is None else f"{100 * x:.2f}%"  # noqa: E731
    rows = [("images", m.images), ("classified", m.images - m.skipped), ("skipped", m.skipped)]
    if m.labelled:
        rows += [("top-1", pct(m.top1)), ("top-5", pct(m.top5))]
        rows += [(f"stage {i} recall ({st.scales} scales, {st.samples}× → keep {st.keep})", pct(r))
                 for i, (st, r) in enumerate(zip(profile.stages, m.recall), 1)]
    if profile.ood is not None:
        rows.append((f"abstained ({run.ood_score or profile.ood.score} below its threshold)", m.abstained))
    if any(st.exit_margin is not None for st in profile.stages):
        rows.append(("early exits", m.early_exits))
    if run.gflops_per_image is not None:
        rows.append(("GFLOPs/image executed (mean)", f"{run.gflops_per_image:.4g}"))
    rows.append(("images/s", f"{run.rate:.2f}" if run.rate else "–"))
    rows += [("processes", world)] if world > 1 else []
    output.table(f"avarc classify · profile {profile.name}", ["metric", "value"], rows)


def _ood_note(record: dict) -> str:
    ood = record["ood"]
    return f"{ood['score']} {ood[ood['score']]:.3g} < {ood['threshold']:.3g}; best guess {record['topk'][0]['name']}"
