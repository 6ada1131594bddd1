"""What ``avarc explain`` writes: the panels and maps of a list of images, or of a classify run's images."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from .options import ModelOptions


def write(clf, items: list, target, out: Path, colormap: str, alpha: float, shared_scale: bool,  # noqa: ANN001
          scales: Optional[int], seed: int, force: bool, preds: Optional[dict] = None,
          metrics: Optional[str] = None) -> None:
    """Explain ``items`` into ``out`` (``preds``: a run's prediction per path, for the captions; ``metrics``: also
    measure each map's insertion/deletion AUC from this start)."""
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
        rows, skipped, measured, batches = [], [], [], clf.explain_items(items, target, scales, seed)

        def safe() -> str:
            return f"{len(rows)} explanations written to {out}"

        with disk_full(safe), interruptible(lambda: f"interrupted: {safe()}"), output.progress() as bar:
            task = bar.add_task("explain", total=len(items), info="")
            for batch in batches:
                for it, ex in batch:
                    if isinstance(ex, str):
                        skipped.append(ex)
                        continue
                    if preds is not None:
                        ex.pred, ex.pred_name = preds[it.path], clf.class_names[preds[it.path]]
                    ex.save(out / f"{stems[it.path]}.png", colormap=colormap, alpha=alpha, shared_scale=shared_scale,
                            image=it.file, exclusive=not force)
                    rows.append((it.path, ex.names[0], ex.names[1], *(f"{r:+.2f}" for r in ex.ratios),
                                 stems[it.path]))
                    if metrics:
                        measured.append((it.path, image_metrics(clf.model, ex, clf.profile, metrics, seed)))
                bar.update(task, advance=len(batch), info=f"{len(rows)} written")
            if measured:
                written = write_metrics(measured, out, force)
    for reason in skipped:
        output.say(f"skipped: {output.one_line(reason)}", err=True)
    if rows:
        output.table(f"avarc explain · {len(rows)} written to {out} · log-likelihood ratios in nats on "
                     f"{scales or len(clf.spec.var.patch_nums)} scales",
                     ["image", "A", "B", "A vs null", "B vs null", "A vs B", "output"], rows)
    if measured:
        metrics_table(measured, written, metrics)


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


def explain_run(opts: ModelOptions, run: Path, mistakes: bool, model: Optional[str], profile: Optional[str],
                out: Path, colormap: str, alpha: float, shared_scale: bool, scales: Optional[int], force: bool) -> None:
    """``--from``: a classify run's images, its model (unless -m), seed and true/predicted classes."""
    from avarc.errors import AvarcError
    from avarc.io.files import make_output_dir
    from avarc.io.records import read_records
    from avarc.io.registry import is_registry_name
    from avarc.tasks.explain import record_targets
    from avarc.tasks.heatmap import check_style


    check_style(colormap, alpha)
    records = read_records(run)
    info = next((r["run"] for r in records if r.get("run")), {})
    used = info.get("model")
    model = model or (used if used and (is_registry_name(used) or Path(used).exists()) else None)
    if model is None:
        raise AvarcError(f"{run}: the run's model {used!r} is not a registry name or a path here; pass it with -m")
    chosen = record_targets(records, mistakes)
    if not chosen:
        raise AvarcError(f"{run}: no {'mistakes' if mistakes else 'classified images'} to explain")
    make_output_dir(out, "out")
    clf = opts.load(model, profile)
    write(clf, [it for it, _, _ in chosen], {it.path: t for it, t, _ in chosen}, out, colormap, alpha, shared_scale,
          scales, info.get("seed", 0), force, {it.path: p for it, _, p in chosen})


def metrics_table(measured: list, written: tuple[Path, Path], start: str) -> None:
    """Print the means of the explanation metrics written to ``written`` (``OUT/metrics.json``, ``.png``)."""
    from avarc.tasks.explain_metrics import summarise

    from . import output

    mean = summarise([m for _, m in measured])
    output.table(f"explanation metrics · {len(measured)} images · start {start} · mean ± s.e. · written to "
                 f"{written[0]}, {written[1].name}", ["AUC", "heatmap ranking", "random ranking", ""],
                 [(mode, *(f"{mean[k][0]:.4f} ± {mean[k][1]:.4f}" for k in (mode, f"random_{mode}")), better)
                  for mode, better in (("insertion", "higher is better"), ("deletion", "lower is better"))])
