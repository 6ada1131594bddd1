"""``avarc classify``: staged generative classification of image files, folders and labelled datasets."""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from core import AvarcError, distributed
from core.classifier import Scorer
from core.data import LABEL_MODES, ClassSpace, collect, dataset_presets
from core.incremental import apply_extensions
from core.model import resolve_dtype, resolve_device
from core.profiles import Profile, default_profile_name, list_profiles, load_profile
from core.registry import resolve_model
from core.threads import set_threads
from core.files import absolute, check_output_file
from core.results import (Metrics, ResultsWriter, append_csv_summary, check_csv, image_key, lock_results, model_identity,
                          open_results, run_info)

from .. import output
from ..interrupt import interrupt_code, stop_on_signals
from ..options import (BatchSizeOpt, ClassesOpt, DeviceOpt, DtypeOpt, ExtensionOpt, ModelDirOpt, ModelOpt, ProfileOpt, SeedOpt,
                       SubsetOpt, ThreadsOpt, TrustPickleOpt, VaeOpt, EncoderOpt)


def classify(
    inputs: Annotated[Optional[list[Path]], typer.Argument(help="Image files and/or folders (searched recursively).", show_default=False)] = None,
    model: ModelOpt = "digits",
    vae: VaeOpt = None,
    extension: ExtensionOpt = None,
    profile: ProfileOpt = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help=f"Labelled evaluation preset for the folder you pass: {', '.join(dataset_presets())}.")] = None,
    subset: SubsetOpt = None,
    classes: ClassesOpt = None,
    labels: Annotated[str, typer.Option("--labels", help="Where true labels come from: auto (class sub-folders if every folder name is a class), folders, or none.")] = "auto",
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
    avarc classify examples/digits                  # bundled demo model, labelled folders → accuracy table
    avarc classify photo.jpg --model d16 --topk 3   # one image, official VAR-d16 (after `avarc download`)
    avarc classify val/ -m d16 --dataset imagenet --subset imagenet100 --out val.jsonl --csv runs.csv
    avarc classify imagenet-a/ -m d20-cca --dataset imagenet-a --profile adaptive --out a.jsonl --resume
    torchrun --nproc_per_node 8 -m avarc_cli classify val/ -m d30 --dataset imagenet --out val.jsonl
    avarc classify --list-profiles                  # the shipped schedules and their stages

    Each stage of the profile scores the surviving candidate classes by the exact log-likelihood of the image's
    VAR tokens on the first scales, keeps the best, and the last stage's best is the prediction.
    Unreadable images are recorded as skipped; --resume continues an interrupted --out file.
    """
    if list_profiles_:
        _print_profiles()
        return
    if not inputs:
        raise AvarcError("no inputs; pass image files or folders (e.g. `avarc classify examples/digits`)")
    if labels not in LABEL_MODES:
        raise AvarcError(f"--labels {labels}: unknown mode; use {', '.join(LABEL_MODES)}")
    if resume and out is None:
        raise AvarcError("--resume continues an --out file; pass --out FILE.jsonl")
    if out is not None:
        check_output_file(out, "--out")
    if csv is not None:
        check_output_file(csv, "--csv")
        if out is not None and absolute(csv) == absolute(out):
            raise AvarcError(f"--csv {csv}: is the --out file; give the summary its own file")
    chosen = load_profile(profile) if profile else None     # fail on a bad profile before loading a model

    dist = distributed.init(device)
    try:
        with stop_on_signals():
            _run(dist, inputs, model, vae, extension, chosen, dataset, subset, classes, labels, out, csv, resume, device,
                 dtype, batch_size, seed, temperature, topk, model_dir, trust_pickle, encoder, threads)
    except KeyboardInterrupt:       # before the first record (loading the model, reading the inputs)
        if dist.is_main:
            output.err_console.print("interrupted before any image was classified; no new record was written",
                                     markup=False, highlight=False)
        raise typer.Exit(interrupt_code()) from None
    finally:
        distributed.close(dist)


def _run(dist, inputs, model_arg, vae, extension, chosen: Profile | None, dataset, subset, classes, labels, out, csv, resume,
         device, dtype, batch_size, seed, temperature, topk, model_dir, trust_pickle, encoder, threads) -> None:
    main = dist.is_main
    dev = resolve_device(distributed.rank_device(dist, device))
    model = resolve_model(model_arg, vae, dev, resolve_dtype(dtype, dev), model_dir, trust_pickle, encoder)
    set_threads(model.spec.var, threads)
    added = apply_extensions(model, extension)
    profile = (chosen or load_profile(default_profile_name(model))).resolve(len(model.spec.var.patch_nums))
    temperature = temperature if temperature is not None else profile.temperature or 1.0
    space = ClassSpace(model)
    found = collect([str(p) for p in inputs], space, labels, dataset, subset, classes,
                    exclude=[p for p in (out, csv) if p is not None])
    run_key = run_info(model_identity(model, model_arg), profile, seed, found.candidates,
                       {"extensions": [e.sha256 for e in added]} if added else None)
    metrics = Metrics(len(profile.stages))
    if csv is not None and main:
        check_csv(csv, list(_summary_row(metrics, profile, run_key, dataset, subset, 0.0, 0)))
    if main:
        _warn_keep(profile, len(found.candidates))

    resumed = {}
    try:
        if out is not None:
            def prepare() -> list[str]:
                resumed["lock"] = lock_results(out)
                resumed["state"] = open_results(out, resume, run_key)
                return sorted(resumed["state"].done)
            done = set(dist.from_main(prepare))
        else:
            done = set()
        _classify(dist, model, found, profile, seed, space, run_key, metrics, done, resumed.get("state"), out, csv,
                  dataset, subset, batch_size, temperature, topk)
    finally:
        if "lock" in resumed:
            resumed["lock"].release()


def _classify(dist, model, found, profile: Profile, seed, space, run_key, metrics: Metrics, done: set[str], state,
              out, csv, dataset, subset, batch_size, temperature, topk) -> None:
    main = dist.is_main
    todo = [it for it in found.items if image_key(it.path) not in done]
    if main:
        _notes(found, state, len(done), len(todo))
        for rec in (state.done.values() if state is not None else ()):
            metrics.add(rec)

    writer = ResultsWriter(out) if out is not None and main else None
    shown: list[dict] = []
    start, new, new_skipped = time.perf_counter(), 0, 0
    records = distributed.run(model, todo, found.candidates, profile, seed, space.names, run_key, dist,
                              Scorer(model, batch_size), temperature, topk,
                              distributed.images_per_step(batch_size, len(found.candidates)))
    try:
        with output.progress(transient=False) if main else _Quiet() as prog:
            task = prog.add_task("classify", total=len(todo), info="")
            for batch in records:
                if not main:
                    continue
                if writer:
                    writer.write(batch)
                for rec in batch:
                    metrics.add(rec)
                    new_skipped += rec["status"] != "ok"
                if out is None and not found.labelled:
                    shown += batch
                new += len(batch)
                rate = new / max(time.perf_counter() - start, 1e-9)
                acc = f" · top-1 {metrics.top1:.1%}" if metrics.top1 is not None else ""
                prog.update(task, advance=len(batch), info=f"{rate:.1f} img/s{acc}")
    except KeyboardInterrupt:
        if main:
            _say_interrupted(out, len(done) + new)
        raise typer.Exit(interrupt_code()) from None
    finally:
        if writer:
            writer.close()
    if not main:
        return
    seconds = time.perf_counter() - start
    if shown:
        _print_predictions(shown, topk)
    _print_summary(metrics, profile, seconds, new, dist.world)
    if csv is not None and new:
        append_csv_summary(csv, _summary_row(metrics, profile, run_key, dataset, subset, seconds, new))
    elif csv is not None:
        output.err_console.print(f"note: nothing new was classified; no row added to {csv}", markup=False)
    if new and new_skipped == new:
        output.err_console.print(f"error: none of the {new} images could be read (see the skipped records); "
                                 "check the inputs", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _say_interrupted(out, safe: int) -> None:
    """The one line after Ctrl-C / SIGTERM: what is safe where, and how to go on."""
    say = output.err_console.print
    if out is None:
        say("interrupted: nothing was saved (no --out file)", markup=False, highlight=False)
        return
    args = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
    say(f"interrupted: {safe} records safe in {out}; continue with: avarc {shlex.join(args)}",
        markup=False, highlight=False, soft_wrap=True)


def _warn_keep(profile: Profile, candidates: int) -> None:
    big = [i for i, st in enumerate(profile.stages, 1) if st.keep > candidates]
    if big:
        output.err_console.print(f"warning: profile {profile.name} keeps more classes (stage {big[0]}: "
                                 f"{profile.stages[big[0] - 1].keep}) than there are candidates ({candidates}); "
                                 "those stages keep every candidate", markup=False, highlight=False, soft_wrap=True)


class _Quiet:
    """Stands in for the progress bar on ranks other than 0."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, *a, **k) -> int:
        return 0

    def update(self, *a, **k) -> None:
        return None


def _notes(found, state, done: int, todo: int) -> None:
    say = output.err_console.print
    if found.left_out:
        say(f"note: left out {found.left_out} labelled images whose class is not a candidate")
    if state is not None and (done or state.torn):
        say(f"resume: {done} images already done, {todo} to go" + (" (cut off a torn last line)" if state.torn else ""))


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _print_summary(m: Metrics, profile: Profile, seconds: float, new: int, world: int) -> None:
    rows = [("images", m.images), ("classified", m.images - m.skipped), ("skipped", m.skipped)]
    if m.labelled:
        rows += [("top-1", _pct(m.top1)), ("top-5", _pct(m.top5))]
        for i, (st, r) in enumerate(zip(profile.stages, m.recall), 1):
            rows.append((f"stage {i} recall ({st.scales} scales, {st.samples}× → keep {st.keep})", _pct(r)))
    if any(st.exit_margin is not None for st in profile.stages):
        rows.append(("early exits", m.early_exits))
    rows.append(("images/s", f"{new / seconds:.2f}" if new and seconds > 0 else "–"))
    if world > 1:
        rows.append(("processes", world))
    output.table(f"avarc classify · profile {profile.name}", ["metric", "value"], rows)


def _print_predictions(records: list[dict], topk: int) -> None:
    rows = []
    for r in records:
        if r["status"] != "ok":
            rows.append((r["path"], "skipped", None, r["error"]))
            continue
        p = r["posterior"][0]["p"] if r["posterior"] else None
        rest = ", ".join(t["name"] for t in r["topk"][1:topk])
        rows.append((r["path"], r["pred_name"], f"{p:.3f}" if p is not None else None, rest))
    output.table("predictions", ["image", "prediction", "posterior", "runners-up"], rows)


def _summary_row(m: Metrics, profile: Profile, run_key: dict, dataset, subset, seconds: float, new: int) -> dict:
    row = {"model": run_key["model"], "profile": profile.name, "seed": run_key["seed"], "dataset": dataset or "",
           "subset": subset or "", "images": m.images, "skipped": m.skipped,
           "top1": m.top1 if m.top1 is not None else "", "top5": m.top5 if m.top5 is not None else ""}
    row.update({f"recall_stage{i}": r if r is not None else "" for i, r in enumerate(m.recall, 1)})
    row.update({"early_exits": m.early_exits, "images_per_s": round(new / seconds, 3) if new and seconds > 0 else ""})
    return row


def _print_profiles() -> None:
    rows = [(p.name, "\n".join(f"{i}. {s.describe()}" for i, s in enumerate(p.stages, 1)), p.sigma, p.description)
            for p in list_profiles()]
    output.table("profiles (`--profile NAME` or a YAML file)", ["name", "stages", "sigma", "description"], rows)
