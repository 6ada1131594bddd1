"""What ``avarc explain`` writes: the panels and maps of a list of images, or of a classify run's images."""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import typer

from .options import InputOptions, ModelOptions

if TYPE_CHECKING:
    from avarc.io.records import RunIdentity
    from avarc.tasks.explain_metrics import ImageMetrics


def write(clf, items: list, target, out: Path, colormap: str, alpha: float, shared_scale: bool,  # noqa: ANN001
          scales: Optional[int], seed: int, force: bool, decisions: Optional[dict] = None,
          metrics: Optional[str] = None) -> None:
    """Explain ``items`` into ``out`` (``decisions``: a run's decision per path, for the captions and the run's own
    lead; ``metrics``: also measure each map's insertion/deletion AUC from this start). Images that cannot be
    explained are named and counted; when none can, the command fails."""
    from avarc.errors import AvarcError
    from avarc.io.files import hold_folder, refuse_inputs
    from avarc.tasks.explain import unique_stems
    from avarc.tasks.explain_metrics import image_metrics, metrics_clash, write_metrics

    from . import output
    from .interrupt import interruptible

    if metrics and (scales or len(clf.spec.var.patch_nums)) < 2:
        raise AvarcError("1 scale is one token: insertion and deletion would rank a single region, the same as the "
                         "random ranking; use --scales 2 or more with --metrics", option="scales")
    stems = dict(zip((it.path for it in items), unique_stems([it.path for it in items])))
    with hold_folder(out, "out"):
        panels = [out / f"{s}{ext}" for s in stems.values() for ext in (".png", ".npz")]
        refuse_inputs([("out", f) for f in panels], [it.path for it in items if it.source is None])
        clash = [f for f in panels if f.exists()] + (metrics_clash(out) if metrics else [])
        if clash and not force:
            raise AvarcError(f"--out {out}: {len(clash)} outputs already exist ({clash[0].name}…); pass --force to "
                             "overwrite them, or choose another --out")
        rows: list[tuple[str, ...]] = []
        skipped: list[str] = []
        measured: list[tuple[str, ImageMetrics]] = []
        batches = clf.explain_items(items, target, scales, seed)

        def safe() -> str:
            return f"{len(rows)} explanations written to {out}"

        with disk_full(safe), interruptible(lambda: f"interrupted: {safe()}"), output.progress() as bar:
            task = bar.add_task("explain", total=len(items), info="")
            for batch in batches:
                for it, ex in batch:
                    if isinstance(ex, str):
                        skipped.append(ex)
                        continue
                    run = decisions[it.path] if decisions is not None else None
                    if run is not None:
                        ex.pred, ex.pred_name = run.pred, None if run.pred is None else clf.class_names[run.pred]
                    ex.save(out / f"{stems[it.path]}.png", colormap=colormap, alpha=alpha, shared_scale=shared_scale,
                            image=it.file, exclusive=not force)
                    ratios = [f"{r:+.2f}" for r in ex.ratios]
                    if run is not None:
                        ratios += [f"{len(ex.patch_nums)}×{ex.samples}",
                                   "–" if run.lead is None else f"{run.lead:+.2f}"]
                    rows.append((it.path, ex.names[0], ex.names[1], *ratios, stems[it.path]))
                    if metrics:
                        with clf.settings():
                            measured.append((it.path, image_metrics(clf.model, ex, clf.profile, metrics, seed)))
                bar.update(task, advance=len(batch), info=f"{len(rows)} written")
            if measured:
                written = write_metrics(measured, out, force)
    for reason in skipped:
        output.say(f"skipped: {output.one_line(reason)}", err=True)
    if rows:
        header = ["image", "A", "B", "A vs null", "B vs null", "A vs B"]
        header += ["scales×samples", "run: A vs B"] if decisions is not None else []
        on = "on the scales and samples of the stage that decided each image" if decisions is not None else \
            f"on {scales or len(clf.spec.var.patch_nums)} scales"
        output.table(f"avarc explain · model {clf.source} · {len(rows)} written to {out} · log-likelihood ratios in "
                     f"nats {on}",
                     [*header, "output"], rows)
    if measured:
        assert metrics is not None          # measured only with --metrics
        metrics_table(measured, written, metrics)
    if skipped:
        output.say(f"{'error' if not rows else 'note'}: {len(skipped)} of {len(items)} images could not be explained "
                   "(named above)", err=True)
    if not rows:
        raise typer.Exit(1)


@contextmanager
def disk_full(safe: Callable[[], str]) -> Iterator[None]:
    """A full disk while explaining: what is safe, and that running again needs --force (it replaces this run's
    outputs; a metrics pair is complete only once its metrics.json is written, last)."""
    from avarc.errors import AvarcError
    from avarc.io.files import DiskFull

    try:
        yield
    except DiskFull as e:
        raise AvarcError(f"{str(e).split(';')[0]}; {safe()}; free space and run again with --force (it replaces this "
                         "run's outputs)") from None


def explain_run(opts: ModelOptions, source: InputOptions, inputs: list, run: Path, mistakes: bool,
                model: Optional[str], profile: Optional[str], cls: Optional[str], vs: Optional[str],
                label: Optional[str], labels: str, out: Path, colormap: str, alpha: float, shared_scale: bool,
                scales: Optional[int], metrics: Optional[str], seed: Optional[int], force: bool) -> None:
    """``--from``: a classify run's images (by identity, from any folder), rebuilt as the run built its model (its
    model, VQ-VAE, extensions and dtype, unless given), each explained on the stage that decided it, with the
    run's seed and schedule. Positional inputs pick images of the run; the other options apply as without it."""
    from avarc.errors import AvarcError
    from avarc.io.data import collect
    from avarc.io.files import make_output_dir
    from avarc.io.profiles import load_profile, shipped_names
    from avarc.io.records import read_records, unique_records
    from avarc.tasks.explain_run import run_decisions, run_profile
    from avarc.tasks.heatmap import check_style

    check_style(colormap, alpha)
    records, _ = unique_records(read_records(run, option="from"))
    info = records[0]["run"]
    ran = info.seed
    if seed is not None and seed != ran:
        raise AvarcError(f"{run} was run with seed {ran}, whose noise decided its images; leave --seed out",
                         option="seed")
    given = load_profile(profile) if profile is not None else None
    try:
        recorded = run_profile(info, str(run))
    except AvarcError:
        if given is None:
            raise
        recorded = None                     # a damaged schedule, and the run's profile given
    named = info.profile
    schedule = recorded or given or (load_profile(named) if named in shipped_names() else None)
    opts, model = run_build(opts, info, model, run)
    clf = opts.load(model, schedule)
    mine = given.resolve(len(clf.spec.var.patch_nums)) if given is not None else None
    if mine is not None and recorded is not None and (mine.stages, mine.sigma) != (recorded.stages, recorded.sigma):
        assert given is not None            # mine is given's schedule
        raise AvarcError(f"{run} was run with another schedule than profile {given.name}; leave -p out: --from "
                         "explains on the run's own", option="profile")
    data, keys = source.data(), None
    unused = [f for f, v in (("split", data.split), ("label_column", data.label_column)) if v is not None]
    if unused and not inputs:
        raise AvarcError(f"picks rows of a dataset input; --from reads each row's split and class from {run} (name "
                         "dataset inputs to pick rows of the run)", option=unused[0])
    if inputs:
        keys = {it.file for it in collect(inputs, clf.space, "none", data=data).items}
    target = clf.target(cls, vs, label, where=("--class", "--vs", "--label"))
    chosen = run_decisions(records, clf.model.num_classes, data, mistakes, target.cls, target.vs,
                           target.label, labels, keys, str(run))
    if keys is not None and len(chosen) < len(keys):
        raise AvarcError(f"{len(keys) - len(chosen)} of the inputs are not explainable images of {run}; pass images "
                         "the run classified")
    if not chosen:
        raise AvarcError(f"{run}: no {'mistakes' if mistakes else 'classified images'} to explain")
    if schedule is None and any(d.target.samples > 1 for d in chosen):
        raise AvarcError(f"{run}: its records do not hold the run's schedule (written by an older avarc) and its "
                         "images were decided on smoothed samples; pass the run's profile with -p", option="profile")
    make_output_dir(out, "out")
    write(clf, [d.item for d in chosen], {d.item.path: d.target for d in chosen}, out, colormap, alpha, shared_scale,
          scales, ran, force, {d.item.path: d for d in chosen}, metrics)


def run_build(opts: ModelOptions, info: RunIdentity, model: Optional[str], run: Path) -> tuple[ModelOptions, str]:
    """The options that rebuild the run's model: its model, VQ-VAE, extensions and dtype, each unless given."""
    from avarc.errors import AvarcError
    from avarc.io.registry import is_registry_name

    used = info.model
    model = model or (used if is_registry_name(used) or Path(used).exists() else None)
    if model is None:
        raise AvarcError(f"{run}: the run's model {used!r} is not a registry name or a path here; pass it with -m")
    vae, listed = opts.vae or info.vae_file, info.extension_files
    if opts.vae is None and vae is not None and not (is_registry_name(vae) or Path(vae).exists()):
        raise AvarcError(f"{run}: the run's VQ-VAE {vae} is not here; pass it with --vae")
    extensions = opts.extension or [Path(e) for e in listed]
    lost = [e for e in extensions if not opts.extension and not e.is_file()]
    if lost:
        raise AvarcError(f"{run}: the run's extension {lost[0]} is not here; pass the run's extensions with -e")
    dtype = opts.dtype if opts.dtype != "auto" else DTYPE_NAMES.get(info.dtype or "", "auto")
    return dataclasses.replace(opts, vae=vae, extension=extensions, dtype=dtype), model


DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}     # a record's dtype → --dtype


def metrics_table(measured: list, written: tuple[Path, Path], start: str) -> None:
    """Print the means of the explanation metrics written to ``written`` (``OUT/metrics.json``, ``.png``)."""
    from avarc.tasks.explain_metrics import summarise

    from . import output

    mean = summarise([m for _, m in measured])
    output.table(f"explanation metrics · {len(measured)} images · start {start} · mean ± s.e. · written to "
                 f"{written[0]}, {written[1].name}", ["AUC", "heatmap ranking", "random ranking", ""],
                 [(mode, *(f"{mean[k][0]:.4f} ± {mean[k][1]:.4f}" for k in (mode, f"random_{mode}")), better)
                  for mode, better in (("insertion", "higher is better"), ("deletion", "lower is better"))])
