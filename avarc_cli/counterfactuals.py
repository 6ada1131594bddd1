"""What ``avarc explain --counterfactual`` writes: each image as another class (``<stem>.as_<class>.png``) and its
panel (``<stem>.counterfactual.png``), for a list of images or a classify run's images."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, cast

from .options import ModelOptions

TRUE = "true"        # --counterfactual true: each record's true class (with --from)


def write(clf, items: list, targets: dict[str, int], out: Path, keep_scales: int, seed: int,  # noqa: ANN001
          force: bool) -> None:
    """The counterfactual of each item as its class in ``targets`` (by path) into ``out``, then a table and the
    share classified as the class asked."""
    from avarc.engine.sampling import Sampling
    from avarc.errors import AvarcError
    from avarc.io import distributed
    from avarc.io.preprocess import pixels_to_tensor
    from avarc.tasks.counterfactual import check_keep_scales
    from avarc.tasks.explain import safe_stem, unique_stems

    from . import output
    from .interrupt import interruptible

    check_keep_scales(keep_scales, len(clf.spec.var.patch_nums))
    stems = dict(zip((it.path for it in items), unique_stems([it.path for it in items])))
    names = clf.class_names
    clash = [f for it in items for f in (out / f"{stems[it.path]}.as_{safe_stem(names[targets[it.path]])}.png",
                                         out / f"{stems[it.path]}.counterfactual.png") if f.exists()]
    if clash and not force:
        raise AvarcError(f"--out {out}: {len(clash)} outputs already exist ({clash[0].name}…); pass --force to "
                         "overwrite them, or choose another --out")
    sampling = Sampling(seed)

    def step(batch: list, pixels: list) -> list:
        import torch

        good = [(it, px) for it, px in zip(batch, pixels) if not isinstance(px, str)]
        done = iter(clf.counterfactual_tensors(torch.stack([pixels_to_tensor(px) for _, px in good]),
                                               [targets[it.path] for it, _ in good], keep_scales, sampling)
                if good else ())
        return [(it, px if isinstance(px, str) else next(done)) for it, px in zip(batch, pixels)]

    rows: list[tuple[str, ...]]
    rows, skipped = [], []
    with interruptible(lambda: f"interrupted: {len(rows)} counterfactuals written to {out}"), \
            output.progress() as bar:
        task = bar.add_task("counterfactual", total=len(items), info="")
        for batch in distributed.run(items, clf.load, step):
            for it, cf in batch:
                if isinstance(cf, str):
                    skipped.append(cf)
                    continue
                image, _ = cf.save(out, stems[it.path], exclusive=not force)
                rows.append((it.path, cf.names[0], cf.names[1], cf.as_target_name, f"{cf.as_target_p:.3f}",
                             f"{cf.log_ratio:+.2f}", image.name))
            bar.update(task, advance=len(batch), info=f"{len(rows)} written")
    for reason in skipped:
        output.say(f"skipped: {reason}", err=True)
    if rows:
        hits = sum(r[2] == r[3] for r in rows)
        output.table(f"avarc explain --counterfactual · {len(rows)} written to {out} · own scales kept: {keep_scales}"
                     f" · classified as the class asked: {hits}/{len(rows)} ({100 * hits / len(rows):.1f}%)",
                     ["image", "predicted", "as class", "classified as", "p(class)", "log ratio (nats)", "output"],
                     rows)


def from_run(opts: ModelOptions, run: Path, mistakes: bool, model: Optional[str], profile: Optional[str],
             out: Path, target: str, keep_scales: int, force: bool) -> None:
    """``--from RUN --counterfactual CLASS|true``: the run's images (its mistakes), its model unless -m, its seed;
    ``true``: each image as its true class (images without a label are left out)."""
    from avarc.errors import AvarcError
    from avarc.io.files import make_output_dir
    from avarc.io.records import read_records, unique_records
    from avarc.tasks.explain_run import run_decisions

    from .panels import run_build

    records, _ = unique_records(read_records(run, option="from"))
    info = records[0]["run"]
    opts, model = run_build(opts, info, model, run)
    clf = opts.load(model, profile)
    chosen = [d for d in run_decisions(records, clf.model.num_classes, mistakes=mistakes, where=str(run))
              if target.lower() != TRUE or d.target.label is not None]
    if not chosen:
        what = "mistakes" if mistakes else "labelled images" if target.lower() == TRUE else "classified images"
        raise AvarcError(f"{run}: no {what} to draw counterfactuals of")
    make_output_dir(out, "out")
    fixed = None if target.lower() == TRUE else clf.class_id(target, "--counterfactual")
    write(clf, [d.item for d in chosen],     # without a fixed class, chosen holds labelled images only
          {d.item.path: fixed if fixed is not None else cast(int, d.target.label) for d in chosen},
          out, keep_scales, info.seed, force)
