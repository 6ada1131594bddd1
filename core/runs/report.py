"""One self-contained HTML page for a labelled classify run or a tune run: plots as embedded PNGs (base64), so the
file opens from disk with no server and can be mailed around. Plots need matplotlib (``pip install 'avarc[report]'``).
"""
from __future__ import annotations

import base64
import html
import io
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..engine.flops import encoder_macs, sequence_macs
from ..errors import AvarcError
from ..io.data import DataOptions, Item
from ..io.records import Record, record_key
from ..io.summary import shown_ks, stage_survival
from ..models.specs import ModelSpec
from ..tasks.calibration import posterior, reliability
from ..tasks.explain import explained_panels, safe_stem
from ..tasks.explain_run import record_file, record_item, run_rows

if TYPE_CHECKING:
    from .tune import Point, TuneResult

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{padding:3px 9px;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left}.plots{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.plots img{max-width:100%;height:auto;border:1px solid #eee}.gallery{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #ddd;padding:6px;font-size:.8em;text-align:center;max-width:100%}
.card img{image-rendering:pixelated;display:block;margin:auto;max-width:100%}.chosen{background:#fff4cc}"""


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise AvarcError("reports need matplotlib; pip install 'avarc[report]'") from None
    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False     # a class name with `$` is text, not mathtext
    import matplotlib.pyplot as plt
    return plt


def _text(value) -> str:
    """User text (a path, a class name) for the page: escaped, and a non-UTF-8 file name's odd bytes shown as U+FFFD."""
    return html.escape(str(value).encode("utf-8", "surrogateescape").decode("utf-8", "replace"))


def _img(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _png_file(path: Path, width: int | None = None) -> str:
    style = f' width="{width}"' if width else ""
    return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"{style}>'


def _image_thumb(item: Item, size: int = 96) -> str:
    """An input image (a file, or a dataset row) as an embedded PNG thumbnail (nearest-neighbour, so tiny images
    stay sharp); of files only a regular one is opened (a FIFO or a device where an image was would block or never
    end)."""
    from PIL import Image

    if item.source is None and not Path(item.path).is_file():
        return "<i>image not found</i>"
    try:
        with item.open() as im:
            im = im.convert("RGB")
            scale = max(1, size // max(im.size))
            im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST) if scale > 1 else im
            im.thumbnail((size * 2, size * 2))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except Exception:  # noqa: BLE001 — a moved or broken image must not stop the report
        return "<i>image not readable</i>"
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _mistake_thumb(record: Record, rows: dict | None) -> str:
    """The record's image by its identity (its absolute file, or its dataset row), as a thumbnail; ``rows`` None: the
    run's datasets cannot be read here, or are not the ones it read (:func:`run_rows`)."""
    if rows is None and record_file(record) != record_key(record):
        return "<i>its dataset cannot be read here, or changed since the run</i>"
    try:
        return _image_thumb(record_item(record, DataOptions(border=0), rows or {}))
    except AvarcError:                  # its dataset cannot be read here
        return "<i>image not found</i>"


def _table(header: Sequence[str], rows: Sequence[Sequence], classes: Sequence[str] = ()) -> str:
    head = "".join(f"<th>{_text(h)}</th>" for h in header)
    body = "".join(f'<tr class="{c}">' + "".join(f"<td>{_text(x)}</td>" for x in r) + "</tr>"
                   for r, c in zip(rows, [*classes, *[""] * len(rows)]))
    return f"<table><tr>{head}</tr>{body}</table>"


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{_text(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{_text(title)}</h1>{body}</body></html>\n")


def record_gflops(record: Record, spec: ModelSpec) -> float:
    """Paper-convention GFLOPs (1e9 MACs) the record's stages scored: candidates × samples × the scales' tokens,
    plus the encoder (what it cost, early exits included)."""
    ends = spec.var.scale_ends()
    macs: float = encoder_macs(spec.vae, spec.image_size, spec.var.patch_nums)
    for st in record["stages"]:
        macs += len(st["candidates"]) * st["samples"] * sequence_macs(spec.var, ends[st["scales"] - 1]).paper
    return macs / 1e9


def record_compute(records: Sequence[Record], spec: ModelSpec | None) -> tuple[list[float], list[float] | None]:
    """Each record's own compute (``gflops``: executed, paper convention); records written before it carried
    compute have no executed figure, and their paper figure is counted from their stages when ``spec`` is known."""
    carried = [g for r in records if isinstance(g := r.get("gflops"), dict)]
    if records and len(carried) == len(records):
        return [g["executed"] for g in carried], [g["paper"] for g in carried]
    return [], [record_gflops(r, spec) for r in records] if spec is not None else None


def untempered_confidence(record: Record) -> float:
    """The top-1 probability at temperature 1: softmax over the last stage's scores (what the posterior tempers), so
    a report shows what a profile's fitted temperature did to the calibration of the images it was run on."""
    return float(posterior(np.asarray([record["stages"][-1]["scores"]], dtype=np.float64), 1.0).max())


def run_report(records: list[Record], title: str, spec: ModelSpec | None = None, explain_dir: Path | None = None,
               worst: int = 12) -> str:
    """The page for a labelled classify run's records."""
    plt = _plt()
    ok = [r for r in records if r["status"] == "ok"]
    lab = [r for r in ok if r["label"] is not None]
    if not lab:
        raise AvarcError("the results hold no labelled, classified images; run classify on class folders")
    run = lab[0]["run"]
    num_stages = max(len(r["stages"]) for r in lab)
    names = {r["label"]: r["label_name"] for r in lab} | {r["pred"]: r["pred_name"] for r in lab}
    correct = np.asarray([r["pred"] == r["label"] for r in lab])
    topk = [(f"top-{k}", f"{np.mean([r['label_rank'] is not None and r['label_rank'] <= k for r in lab]):.2%}")
            for k in shown_ks(len(lab[0]["stages"][0]["candidates"])) if k > 1]
    conf = np.asarray([r["posterior"][0]["p"] if r["posterior"] else 1.0 for r in lab])
    rel = reliability(conf, correct)
    plain = reliability([untempered_confidence(r) for r in lab], correct)
    skipped = sum(r["status"] == "skipped" for r in records)
    summary = [("model", run.model), ("profile", run.profile), ("seed", run.seed), ("threads", run.threads or "?"),
               ("images", len(records)), ("skipped", skipped), ("abstained", len(records) - skipped - len(ok)),
               ("labelled", len(lab)),
               ("top-1", f"{correct.mean():.2%}"), *topk, ("mistakes", int((~correct).sum())),
               ("early exits", sum(r["exited_after"] is not None for r in lab)),
               ("ECE (top-1, 15 bins)", f"{rel.ece:.4f}"),
               ("ECE untempered (T = 1)", f"{plain.ece:.4f}")]
    executed, gflops = record_compute(lab, spec)
    if executed:
        q = np.percentile(executed, [0, 50, 90, 100])
        summary.append(("GFLOPs/image executed (mean)", f"{np.mean(executed):.4g}"))
        summary.append(("GFLOPs/image executed (min / median / p90 / max)", " / ".join(f"{x:.4g}" for x in q)))
    if gflops:
        summary.append(("GFLOPs/image, paper convention (mean)", f"{np.mean(gflops):.4g}"))
    parts = [f"<h2>Summary</h2>{_table(['', 'value'], summary)}"]

    # per-class accuracy and confusion matrix
    truth = [(r["label"], r["pred"]) for r in lab]
    truth_pred = [(a, b) for a, b in truth if a is not None and b is not None]   # all of lab: labelled and classified
    labels = sorted({c for pair in truth_pred for c in pair})
    idx = {c: i for i, c in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels)), int)
    for a, b in truth_pred:
        cm[idx[a], idx[b]] += 1
    tick = [str(names[c]) for c in labels]
    per = [(names[c], int(cm[i].sum()), f"{cm[i, i] / cm[i].sum():.1%}" if cm[i].sum() else "–")
           for i, c in enumerate(labels)]
    if any("accepted" in r for r in lab):      # ObjectNet: one row per ObjectNet class, right = any accepted class
        by_class: dict[str, list[int]] = {}
        for r in lab:
            by_class.setdefault(str(r["label_name"]), []).append(r["pred"] == r["label"])
        per = [(name, len(ok), f"{np.mean(ok):.1%}") for name, ok in sorted(by_class.items())]
    fig, ax = plt.subplots(figsize=(max(4, 0.32 * len(labels) + 2), 3))
    rows_with = cm.sum(1) > 0
    ax.bar(np.arange(len(labels))[rows_with], (np.diag(cm) / np.maximum(cm.sum(1), 1))[rows_with], color="#4c72b0")
    ax.set_xticks(range(len(labels)), tick, rotation=90 if len(labels) > 12 else 0, fontsize=8)
    ax.set_ylim(0, 1.05), ax.set_ylabel("top-1"), ax.set_title("accuracy per true class")
    acc_plot = _img(fig)
    fig, ax = plt.subplots(figsize=(min(12, 0.3 * len(labels) + 1.5),) * 2)
    ax.imshow(np.log1p(cm), cmap="Blues")
    if len(labels) <= 30:
        for (i, j), n in np.ndenumerate(cm):
            if n:
                ax.text(j, i, n, ha="center", va="center", fontsize=7, color="white" if n > cm.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), tick, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), tick, fontsize=7)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title("confusion matrix")
    parts.append(f'<h2>Per class</h2><div class="plots">{acc_plot}{_img(fig)}</div>'
                 f"<details><summary>table</summary>{_table(['class', 'images', 'top-1'], per)}</details>")

    # reliability, survival per stage, compute per image
    fig, ax = plt.subplots(figsize=(4, 4))
    mids = (rel.edges[:-1] + rel.edges[1:]) / 2
    has = rel.count > 0
    ax.bar(mids[has], rel.accuracy[has], width=1 / len(mids), edgecolor="k", color="#8fb3de", label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.plot(mids[has], rel.confidence[has], "o", color="#c44e52", ms=4, label="mean confidence (bin)")
    for x, y, n in zip(mids[has], np.maximum(rel.accuracy[has], rel.confidence[has]), rel.count[has]):
        ax.text(x, y + 0.02, str(n), ha="center", fontsize=6)        # images in the bin
    ax.set_ylim(0, 1.12), ax.set_xlabel("top-1 posterior (numbers: images per bin)"), ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {rel.ece:.3f})")
    ax.legend(fontsize=7, loc="upper left")
    plots = [_img(fig)]
    survived = np.mean([stage_survival(r, num_stages) for r in lab], axis=0)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.bar(range(1, num_stages + 1), survived, color="#55a868")
    for s, v in enumerate(survived, 1):
        ax.text(s, v + 0.01, f"{v:.1%}", ha="center", fontsize=8)
    ax.set_xticks(range(1, num_stages + 1)), ax.set_ylim(0, 1.08), ax.set_xlabel("stage")
    ax.set_title("true class still in the running after each stage"), ax.title.set_fontsize(9)
    plots.append(_img(fig))
    fig, ax = plt.subplots(figsize=(4, 4))
    if executed or gflops:
        ax.hist(executed or gflops, bins=20, color="#8172b2")
        ax.set_xlabel(f"GFLOPs per image ({'executed' if executed else 'paper convention'})")
    else:
        pairs = [sum(len(s["candidates"]) * s["samples"] for s in r["stages"]) for r in lab]
        ax.hist(pairs, bins=20, color="#8172b2"), ax.set_xlabel("(class, sample) pairs scored per image")
    ax.set_ylabel("images"), ax.set_title("compute per image")
    plots.append(_img(fig))
    parts.append(f'<h2>Calibration, pruning and compute</h2><div class="plots">{"".join(plots)}</div>')

    parts.append(ood_section(records))
    # the worst mistakes: most confident first
    wrong = sorted((r for r in lab if r["pred"] != r["label"]),
                   key=lambda r: -(r["posterior"][0]["p"] if r["posterior"] else 1))
    cards, panel_of = [], mistake_panels(records, explain_dir) if explain_dir else {}
    try:
        rows: dict | None = run_rows(records, DataOptions(border=0), title) if wrong[:worst] else {}
    except AvarcError:
        rows = None
    for r in wrong[:worst]:
        p = r["posterior"][0]["p"] if r["posterior"] else float("nan")
        panel = panel_of.get(record_key(r))
        pic = _png_file(panel) if panel is not None else _mistake_thumb(r, rows)
        rank = r["label_rank"] if r["label_rank"] is not None else "pruned"
        cards.append(f'<div class="card">{pic}<br>{_text(Path(r["path"]).name)}<br>true <b>'
                     f'{_text(r["label_name"])}</b>, predicted <b>{_text(r["pred_name"])}</b> '
                     f"(p {p:.3f}); true class rank {rank}</div>")
    parts.append(f"<h2>Worst mistakes ({len(wrong)} in all, most confident first)</h2>"
                 f'<div class="gallery">{"".join(cards) or "<p>none</p>"}</div>')
    if Counter(r["run"].fingerprint for r in lab).most_common(2)[1:]:
        parts.insert(0, "<p><b>note:</b> these results mix several runs (different run fingerprints).</p>")
    return _page(title, "".join(parts))


def mistake_panels(records: Sequence[Record], folder: Path) -> dict[str, Path]:
    """Each record's panel in an ``avarc explain`` folder, by the record's identity (the image key its ``.npz``
    holds); a panel of a copy of the image (explained from elsewhere) by its file name, only where no other image of
    the run has that name or claims that panel."""
    by_key = explained_panels(folder)
    keys = {record_key(r) for r in records}
    claimed = {png: key for key, png in by_key.items() if key in keys}
    stems = Counter(safe_stem(Path(r["path"]).stem).lower() for r in records)
    out = {}
    for r in records:
        key, stem = record_key(r), safe_stem(Path(r["path"]).stem)
        png = by_key.get(key) or folder / f"{stem}.png"
        if png.is_file() and claimed.get(png, key) == key and (key in by_key or stems[stem.lower()] == 1):
            out[key] = png
    return out


def ood_section(records: Sequence[Record]) -> str:
    """Abstention: the deciding OOD score of accepted vs abstained images, and top-1 against coverage when the
    images are accepted best score first (empty when the records carry no OOD scores)."""
    scored = [r for r in records if r["status"] in ("ok", "abstained") and r.get("ood")]
    if not scored:
        return ""

    def ood(r: Record) -> Mapping[str, Any]:
        return r.get("ood") or {}

    plt = _plt()
    name = ood(scored[0])["score"]
    values = np.asarray([ood(r)[name] for r in scored])
    abstained = np.asarray([r["status"] == "abstained" for r in scored])
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    bins = np.histogram_bin_edges(values, bins=30)
    ax.hist(values[~abstained], bins=bins, color="#55a868", alpha=0.8, label=f"accepted ({(~abstained).sum()})")
    ax.hist(values[abstained], bins=bins, color="#c44e52", alpha=0.8, label=f"abstained ({abstained.sum()})")
    threshold = ood(scored[0]).get("threshold")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label="threshold")
    ax.set_xlabel(f"OOD score: {name}"), ax.set_ylabel("images"), ax.set_title("accepted vs abstained")
    ax.legend(fontsize=7)
    plots = [_img(fig)]
    lab = [r for r in scored if r["label"] is not None]
    if lab:
        order = np.argsort([-ood(r)[name] for r in lab], kind="stable")
        right = np.asarray([lab[i]["label_rank"] == 1 for i in order], float)
        n = np.arange(1, len(lab) + 1)
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        ax.plot(n / len(lab), right.cumsum() / n, color="#4c72b0")
        kept = sum(r["status"] == "ok" for r in lab) / len(lab)
        ax.axvline(kept, color="k", ls="--", lw=1, label=f"this run: {kept:.1%} accepted")
        ax.set_xlabel(f"coverage (accepted best {name} first)"), ax.set_ylabel("top-1 of the accepted")
        ax.set_title("accuracy vs coverage"), ax.legend(fontsize=7)
        plots.append(_img(fig))
    return (f"<h2>Out of distribution: {int(abstained.sum())} of {len(scored)} abstained</h2>"
            f'<div class="plots">{"".join(plots)}</div>')


def tune_report(result: TuneResult, shipped: Sequence[tuple[str, Point]], title: str) -> str:
    """The page for a tune run: every schedule's fit accuracy against executed GFLOPs, the Pareto front, the
    shipped profiles and the choice, then the front as a table."""
    plt = _plt()
    pts = result.points
    fig, ax = plt.subplots(figsize=(9, 5.5))
    ax.scatter([p.executed_gflops for p in pts], [p.accuracy for p in pts], s=6, c="#b0b0b0", label="every schedule")
    front = result.front
    ax.step([p.executed_gflops for p in front], [p.accuracy for p in front], where="post", color="#4c72b0",
            label="Pareto front")
    for name, p in shipped:
        ax.plot(p.executed_gflops, p.accuracy, "s", color="#55a868", ms=7)
        ax.annotate(name, (p.executed_gflops, p.accuracy), textcoords="offset points", xytext=(5, -12), fontsize=8)
    c = result.chosen
    ax.plot(c.executed_gflops, c.accuracy, "*", color="#c44e52", ms=16, label="chosen")
    ax.axvline(result.budget_gflops, color="#c44e52", ls="--", lw=1, label="budget")
    top = max(p.accuracy for p in pts)
    ax.set_ylim(max(0.0, min(p.accuracy for p in front) - 0.05), min(1.0, top + 0.02) + 0.01)
    ax.set_xlabel("executed GFLOPs per image"), ax.set_ylabel("top-1 on the fit images")
    ax.set_title(f"{len(pts)} schedules"), ax.legend(fontsize=8, loc="lower right"), ax.grid(alpha=0.3)
    rows, classes = [], []
    listed = list(zip(front, result.front_held))
    if not any(p.stages == c.stages for p in front):
        listed.append((c, result.chosen_held))
    for p, h in listed:
        rows.append((p.describe(), f"{p.accuracy:.2%}", f"{h.accuracy:.2%}" if h else "–", f"{p.executed_gflops:.4g}",
                     f"{p.paper_gflops:.4g}", f"{p.executed_gflops / result.baseline.executed_gflops:.0%}"))
        classes.append("chosen" if p.stages == c.stages else "")
    held = result.chosen_held
    summary = [("chosen", c.describe()), ("top-1 fit", f"{c.accuracy:.2%}"),
               ("top-1 held out", f"{held.accuracy:.2%}" if held else "–"),
               ("varc top-1 held out", f"{result.baseline_held.accuracy:.2%}" if result.baseline_held else "–"),
               ("executed GFLOPs/image (varc)", f"{result.chosen.executed_gflops:.4g} "
                                                f"({result.baseline.executed_gflops:.4g})"),
               ("budget", f"{result.budget_gflops:.4g}"), ("temperature", f"{result.temperature:.4g}"),
               ("ECE held out, T=1 → fitted (cross-fitted)", f"{result.ece_before:.4f} → {result.ece_after:.4f}"
                if result.ece_before is not None else "–")]
    body = (f"<h2>Choice</h2>{_table(['', 'value'], summary)}<h2>Accuracy vs compute</h2>"
            f'<div class="plots">{_img(fig)}</div><h2>Pareto front</h2>'
            + _table(["schedule (scales×samples→keep, exit≥nats)", "top-1 fit", "top-1 held out", "GFLOPs executed",
                      "GFLOPs paper", "of varc"], rows, classes))
    return _page(title, body)
