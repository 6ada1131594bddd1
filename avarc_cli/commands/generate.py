"""``avarc generate``: what the model draws for its classes (PNGs, a contact sheet, the token ids)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..options import ForceOpt, ModelOpt, ModelOptions, ProfileOpt, model_options, opt


@model_options()
def generate(
    opts: ModelOptions,
    classes: Annotated[list[str], typer.Argument(metavar="CLASS...", show_default=False,
                                                 help="Classes to draw: indices or names (added classes too).")],
    n: Annotated[int, opt("-n", min=1, metavar="N", help="Samples per class.", show_default=True)] = 1,
    model: ModelOpt = "digits",
    profile: ProfileOpt = None,
    seed: Annotated[int, opt("--seed", help="Seed of the one generator of the batch.", show_default=True)] = 0,
    cfg: Annotated[float, opt("--cfg", min=0.0, metavar="F", show_default=True,
                              help="Classifier-free guidance at the last scale (rises from 0).")] = 1.5,
    top_k: Annotated[int, opt("--top-k", min=0, metavar="K", help="Draw from the K likeliest tokens (0: all).",
                              show_default=True)] = 0,
    top_p: Annotated[float, opt("--top-p", min=0.0, max=0.999999, metavar="P", show_default=True,
                                help="Then from the smallest set holding share P (0: all).")] = 0.0,
    out: Annotated[Path, opt("--out", "-o", metavar="DIR", help="Folder for CLASS/K.png, grid.png, tokens.npz.",
                             show_default=True)] = Path("samples"),
    check: Annotated[bool, opt("--check", help="Classify the samples with the same model; print the share "
                               "classified as the class asked.")] = False,
    force: ForceOpt = False,
) -> None:
    """\b
    avarc generate 0 1 2 3 4 5 6 7 8 9 -n 10 --check   # each digit, checked
    avarc generate tabby 207 -m d16 -n 4 --cfg 4 --top-k 900 --top-p 0.95
    avarc generate seven -m runs/digits-0-4 -e seven.ext.pt -n 8   # added

    One batch: the classes in the order given, each N times, drawn with one generator seeded by --seed, exactly
    as upstream VAR's autoregressive_infer_cfg draws them (the same token ids for the same settings; in fp32
    unless --dtype says otherwise). Writes
    OUT/CLASS/K.png, OUT/grid.png (one labelled row per class) and OUT/tokens.npz (tokens: B×L int64, coarse to
    fine; labels: B).
    """
    from avarc.engine.sampling import Sampling
    from avarc.errors import AvarcError
    from avarc.io.files import hold_folder, make_output_dir
    from avarc.tasks.samples import sample_files

    from .. import output
    from ..interrupt import interruptible

    clf = opts.load(model, profile, **({"dtype": "fp32"} if opts.dtype == "auto" else {}))   # upstream's draws
    ids = [clf.class_id(c, "class") for c in classes]
    Sampling(seed, cfg, top_k, top_p).check(clf.spec.var.vocab_size)       # before any folder is made
    labels = [y for y in ids for _ in range(n)]
    names = [out / f for f in sample_files(labels, [clf.class_names[y] for y in labels])]
    clash = [f for f in [*names, out / "grid.png", out / "tokens.npz"] if f.exists()]
    if clash and not force:
        raise AvarcError(f"--out {out}: {len(clash)} outputs already exist ({clash[0].relative_to(out)}…); pass "
                         "--force to overwrite them, or choose another --out")
    make_output_dir(out, "out")
    with hold_folder(out, "out"):           # a second run into it is refused: never samples of one, grid of the other
        with interruptible(lambda: f"interrupted while sampling; nothing was written to {out}"), \
                output.progress() as bar:
            task = bar.add_task("generate", total=len(clf.spec.var.patch_nums), info=f"{len(labels)} samples")
            samples = clf.generate(ids, n, seed=seed, cfg=cfg, top_k=top_k, top_p=top_p,
                                   on_scale=lambda k, S: bar.update(task, completed=k + 1, info=f"scale {k + 1}/{S}"))
        preds = None
        if check:
            preds = [p.pred for p in clf.classify_samples(samples, seed)]
        samples.save(out, exclusive=not force, captions=None if preds is None else
                     [f"as {clf.class_names[p]}" for p in preds])
    output.say(f"wrote {len(samples)} samples of {len(set(ids))} classes to {out} (grid.png, tokens.npz)")
    if preds is not None:
        print_shares(clf, samples.labels.tolist(), preds, f"avarc generate --check · seed {seed}, cfg {cfg:g}, "
                     f"top-k {top_k}, top-p {top_p:g}")


def print_shares(clf, labels: list[int], preds: list[int], title: str) -> None:  # noqa: ANN001 (a Classifier)
    """The share of samples classified as the class asked, per class and overall."""
    from avarc.tasks.samples import class_shares

    from .. import output

    shares = class_shares(labels, preds)
    rows = [(clf.class_names[y], n, hit, f"{100 * hit / n:.1f}") for y, (hit, n) in shares.items()]
    hits, total = sum(h for h, _ in shares.values()), sum(n for _, n in shares.values())
    rows.append(("all", total, hits, f"{100 * hits / total:.1f}"))
    output.table(title, ["class", "samples", "classified as it", "share %"], rows)
