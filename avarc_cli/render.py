"""How each command's results read in the terminal (tables), apart from the commands that compute them."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from . import output

if TYPE_CHECKING:
    from avarc.io.records import Record


def profiles_table() -> None:
    """``classify --list-profiles``: the shipped schedules, stage by stage."""
    from avarc.io.profiles import list_profiles

    output.table("profiles (`--profile NAME` or a YAML file)", ["name", "stages", "sigma", "description"],
                 [(p.name, "\n".join(f"{i}. {s.describe()}" for i, s in enumerate(p.stages, 1)), p.sigma,
                   p.description) for p in list_profiles()])


SHOWN = 20      # predictions of an unlabelled run shown in the terminal (the rest: "… N more")


def classify_summary(run: Any, topk: int, world: int, out: Any = None) -> None:
    """A ``ClassifyRun``'s predictions (unlabelled inputs; the first :data:`SHOWN`), metrics and where the records
    went."""
    m, profile = run.metrics, run.clf.profile
    if run.records:
        output.table("predictions", ["image", "prediction", "posterior", "runners-up"],
                     [(r["path"], "skipped", None, r["error"]) if r["status"] == "skipped" else
                      (r["path"], "none of these (abstained)", None, _ood_note(r)) if r["status"] == "abstained" else
                      (r["path"], r["pred_name"], f"{r['posterior'][0]['p']:.3f}",
                       ", ".join(t["name"] for t in r["topk"][1:topk])) for r in run.records])
        if run.new > len(run.records):
            output.say(f"… {run.new - len(run.records)} more" + (f" (all in {out})" if out is not None else ""))
    pct = lambda x: "–" if x is None else f"{100 * x:.2f}%"  # noqa: E731
    rows = [("images", m.images), ("classified", m.images - m.skipped), ("skipped", m.skipped)]
    if m.labelled:
        rows += [(f"top-{k}", pct(m.topk(k))) for k in m.ks]
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
    output.table(f"avarc classify · model {run.clf.source} · profile {profile.name}", ["metric", "value"], rows)
    if out is not None:
        output.say(f"wrote {run.new} records to {out}" + (f" ({run.safe} in all)" if run.safe > run.new else ""))


def _ood_note(record: Record) -> str:
    ood: Mapping[str, Any] = record.get("ood") or {}   # an abstained record has its scores
    return f"{ood['score']} {ood[ood['score']]:.3g} < {ood['threshold']:.3g}; best guess {record['topk'][0]['name']}"


MIN_PER_CLASS = 20      # fewer fit images per class than this cannot tell schedules apart reliably
NEAR = 2                # Pareto rows shown on each side of the chosen schedule


def tune_summary(res: Any, labels: Any, out: Any, report: Any, seconds: tuple[float, float], as_json: bool,
                 model: str) -> None:
    """A short summary and the Pareto rows nearest the budget (every schedule: ``--report`` or ``--json``). The
    chosen schedule's compute is one figure everywhere: on the images it was chosen on, as in its Pareto row."""
    import numpy as np

    c, base = res.chosen, res.baseline
    fewest = int(np.unique(np.asarray(labels)[res.fit_idx], return_counts=True)[1].min())
    if fewest < MIN_PER_CLASS:
        output.err_console.print(f"warning: only {fewest} images of some class choose the schedule (fewer than "
                                 f"{MIN_PER_CLASS}): the choice is mostly noise; tune on more labelled images "
                                 "(README, Choosing a schedule)", markup=False, highlight=False)
    if as_json:
        from avarc.runs.tune import tune_json

        output.emit_json(tune_json(res, str(out), None if report is None else str(report)))
        return
    front = sorted({p.stages: p for p in [*res.front, c]}.values(), key=lambda p: p.executed_gflops)
    at = next(i for i, p in enumerate(front) if p.stages == c.stages)
    held = {p.stages: h for p, h in zip(res.front, res.front_held)} | {c.stages: res.chosen_held}
    rows = [(p.describe(), f"{p.accuracy:.1%}", f"{held[p.stages].accuracy:.1%}" if held.get(p.stages) else "–",
             f"{p.executed_gflops:.4g}", f"{p.executed_gflops / base.executed_gflops:.0%}",
             "◀" if p.stages == c.stages else "") for p in front[max(at - NEAR, 0):at + NEAR + 1]]
    output.table(f"Pareto front near the budget ({len(front)} schedules on it, {len(res.points)} evaluated)",
                 ["schedule (scales×samples→keep)", "fit", "held", "GFLOPs", "varc", ""], rows)
    output.table(f"avarc tune · model {model}", ["", "value"], [
        ("chosen", c.describe()),
        ("images (chosen on / held out)", f"{len(res.fit_idx)} / {len(res.held_idx)}"),
        ("top-1 chosen on / held out", f"{c.accuracy:.2%} / "
         + (f"{res.chosen_held.accuracy:.2%} (varc {res.baseline_held.accuracy:.2%})" if res.chosen_held else "–")),
        ("top-1, all tuning images", f"{res.chosen_all.correct}/{res.chosen_all.images}"),
        ("executed GFLOPs/image", f"{c.executed_gflops:.4g} ({c.executed_gflops / base.executed_gflops:.0%} of varc)"),
        ("temperature", res.calibration.describe()),
        ("ECE held out (T=1 → cross-fitted)", f"{res.ece_before:.4f} → {res.ece_after:.4f}"
         if res.ece_before is not None else "–"),
        ("seconds (scoring / search)", f"{seconds[0]:.1f} / {seconds[1]:.1f}"),
        ("wrote", str(out) if report is None else f"{out}, {report}")])


def bench_tables(results: list, as_json: bool, title: str, flops: bool = False) -> None:
    """``avarc bench`` rows: one number per cell, each column with its unit."""
    if as_json:
        from avarc.runs.bench import bench_json

        output.emit_json(bench_json(results))
        return
    if flops:
        output.table(f"GFLOPs per image ({title})", ["profile", "paper", "executed", "attention"],
                     [(r.profile, r.gflops_per_image, r.gflops_executed, r.attention_gflops_per_image)
                      for r in results])
        return
    device = results[0].device if results else "-"
    g3 = lambda x: None if x is None else f"{x:.3g}"  # noqa: E731
    pct = lambda x: None if x is None else f"{100 * x:.0f}%"  # noqa: E731
    gpu = device.startswith("cuda")
    output.table(f"Speed: {title}, {device} (peak: the device's measured matmul TFLOP/s; memory: "
                 f"{'peak GPU allocation' if gpu else 'the process peak resident set, torch included'}, MiB)",
                 ["profile", "dtype", "s/image", "img/s", "TFLOP/s", "peak", "% peak", "GPU MiB" if gpu else "RSS MiB"],
                 [(r.profile, r.dtype, g3(r.s_per_image["median"]), g3(r.images_per_s), g3(r.tflops),
                   g3(r.tflops / r.peak_pct * 100) if r.peak_pct else None, f"{r.peak_pct:.0f}%",
                   round(r.peak_mem_mb)) for r in results])
    stages = max((len(r.stage_share or []) for r in results), default=0)
    output.table("Work per image: GFLOPs (paper convention, executed after reuse); time share of each part",
                 ["profile", "dtype", "GFLOPs", "executed", "attention", "encoder", *(f"stage {i + 1}" for i in
                                                                                   range(stages))],
                 [(r.profile, r.dtype, g3(r.gflops_per_image), g3(r.gflops_executed), g3(r.attention_gflops_per_image),
                   pct(r.encoder_share or 0), *[pct(x) for x in (r.stage_share or [])],
                   *[None] * (stages - len(r.stage_share or []))) for r in results])
    if any(r.agreement_fp32 is not None for r in results):
        output.table("Precision: top-1 agreement with fp32 (plain: with the optimised path), first-stage score error "
                     "vs fp32 (nats), precision guard (images re-scored in fp32, time share)",
                     ["profile", "dtype", "agree", "err RMS", "err max", "guarded", "guard time"],
                     [(r.profile, r.dtype, pct(r.agreement_fp32), g3(r.score_err_rms), g3(r.score_err_max),
                       pct(r.guard_images), pct(r.guard_share)) for r in results])
    if any(r.launches_per_forward is not None for r in results):
        output.table("Engine counters: aten ops (≈ kernel launches) of one full-length forward; ops that wait for "
                     "the device per scoring step", ["profile", "dtype", "launches/forward", "host syncs/step"],
                     [(r.profile, r.dtype, g3(r.launches_per_forward), g3(r.host_syncs_per_step)) for r in results])
    if any(r.compiled is not None for r in results):
        keys = ("graphs", "recompiles", "fallbacks")
        output.table("Compiled engine per row: graphs compiled, recompiles, block calls that fell back to eager "
                     "(fallbacks > 0: the row did not run compiled)", ["profile", "dtype", *keys],
                     [(r.profile, r.dtype, *(str(r.compiled[k]) if r.compiled else "-" for k in keys))
                      for r in results])
