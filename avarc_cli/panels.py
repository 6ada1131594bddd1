"""What ``avarc explain`` writes: the panels and maps of a list of images, or of a classify run's images."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .options import ModelOptions

if TYPE_CHECKING:
    from avarc.tasks.explain_metrics import ImageMetrics


def write(clf, items: list, target, out: Path, colormap: str, alpha: float, shared_scale: bool,  # noqa: ANN001
          scales: Optional[int], seed: int, force: bool, preds: Optional[dict] = None,
          metrics: Optional[str] = None) -> None:
    """Explain ``items`` into ``out`` (``preds``: a run's prediction per path, for the captions; ``metrics``: also
    measure each map's insertion/deletion AUC from this start)."""
    from avarc.errors import AvarcError
    from avarc.tasks.explain import unique_stems
    from avarc.tasks.explain_metrics import image_metrics

    from . import output
    from .interrupt import interruptible

    stems = dict(zip((it.path for it in items), unique_stems([it.path for it in items])))
    clash = [out / f"{s}{ext}" for s in stems.values() for ext in (".png", ".npz") if (out / f"{s}{ext}").exists()]
    clash += [f for f in (out / "metrics.json", out / "metrics.png") if metrics and f.exists()]
    if clash and not force:
        raise AvarcError(f"--out {out}: {len(clash)} outputs already exist ({clash[0].name}…); pass --force to "
                         "overwrite them, or choose another --out")
    rows: list[tuple[str, ...]] = []
    skipped: list[str] = []
    measured: list[tuple[str, ImageMetrics]] = []
    batches = clf.explain_items(items, target, scales, seed)
    with interruptible(lambda: f"interrupted: {len(rows)} explanations written to {out}"), output.progress() as bar:
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
                rows.append((it.path, ex.names[0], ex.names[1], *(f"{r:+.2f}" for r in ex.ratios), stems[it.path]))
                if metrics:
                    with clf.settings():
                        measured.append((it.path, image_metrics(clf.model, ex, clf.profile, metrics, seed)))
            bar.update(task, advance=len(batch), info=f"{len(rows)} written")
    for reason in skipped:
        output.say(f"skipped: {reason}", err=True)
    if rows:
        output.table(f"avarc explain · model {clf.source} · {len(rows)} written to {out} · log-likelihood ratios in "
                     f"nats on {scales or len(clf.spec.var.patch_nums)} scales",
                     ["image", "A", "B", "A vs null", "B vs null", "A vs B", "output"], rows)
    if measured and metrics:   # measured only with metrics
        metrics_table(measured, out, metrics)


def explain_run(opts: ModelOptions, run: Path, mistakes: bool, model: Optional[str], profile: Optional[str],
                out: Path, colormap: str, alpha: float, shared_scale: bool, scales: Optional[int], force: bool) -> None:
    """``--from``: a classify run's images, its model (unless -m), seed and true/predicted classes."""
    from avarc.errors import AvarcError
    from avarc.io.files import make_output_dir
    from avarc.io.records import read_records, unique_records
    from avarc.io.registry import is_registry_name
    from avarc.tasks.explain import record_targets
    from avarc.tasks.heatmap import check_style


    check_style(colormap, alpha)
    records, _ = unique_records(read_records(run))
    info = records[0]["run"]
    used = info.model
    model = model or (used if used and (is_registry_name(used) or Path(used).exists()) else None)
    if model is None:
        raise AvarcError(f"{run}: the run's model {used!r} is not a registry name or a path here; pass it with -m")
    chosen = record_targets(records, mistakes)
    if not chosen:
        raise AvarcError(f"{run}: no {'mistakes' if mistakes else 'classified images'} to explain")
    make_output_dir(out, "out")
    clf = opts.load(model, profile)
    write(clf, [it for it, _, _ in chosen], {it.path: t for it, t, _ in chosen}, out, colormap, alpha, shared_scale,
          scales, info.seed, force, {it.path: p for it, _, p in chosen})


def metrics_table(measured: list, out: Path, start: str) -> None:
    """Write the explanation metrics (``OUT/metrics.json``, ``.png``) and print their means."""
    from avarc.tasks.explain_metrics import summarise, write_metrics

    from . import output

    written = write_metrics(measured, out)
    mean = summarise([m for _, m in measured])
    output.table(f"explanation metrics · {len(measured)} images · start {start} · mean ± s.e. · written to "
                 f"{written[0]}, {written[1].name}", ["AUC", "heatmap ranking", "random ranking", ""],
                 [(mode, *(f"{mean[k][0]:.4f} ± {mean[k][1]:.4f}" for k in (mode, f"random_{mode}")), better)
                  for mode, better in (("insertion", "higher is better"), ("deletion", "lower is better"))])
