"""How each command's results read in the terminal (tables), apart from the commands that compute them."""
from __future__ import annotations

from typing import Any

from . import output


def classify_summary(run: Any, topk: int, world: int) -> None:
    """A ``ClassifyRun``'s predictions (unlabelled inputs) and metrics."""
    m, profile = run.metrics, run.clf.profile
    if run.records:
        output.table("predictions", ["image", "prediction", "posterior", "runners-up"],
                     [(r["path"], "skipped", None, r["error"]) if r["status"] != "ok" else
                      (r["path"], r["pred_name"], f"{r['posterior'][0]['p']:.3f}",
                       ", ".join(t["name"] for t in r["topk"][1:topk])) for r in run.records])
    pct = lambda x: "–" if x is None else f"{100 * x:.2f}%"  # noqa: E731
    rows = [("images", m.images), ("classified", m.images - m.skipped), ("skipped", m.skipped)]
    if m.labelled:
        rows += [("top-1", pct(m.top1)), ("top-5", pct(m.top5))]
        rows += [(f"stage {i} recall ({st.scales} scales, {st.samples}× → keep {st.keep})", pct(r))
                 for i, (st, r) in enumerate(zip(profile.stages, m.recall), 1)]
    if any(st.exit_margin is not None for st in profile.stages):
        rows.append(("early exits", m.early_exits))
    rows.append(("images/s", f"{run.rate:.2f}" if run.rate else "–"))
    rows += [("processes", world)] if world > 1 else []
    output.table(f"avarc classify · profile {profile.name}", ["metric", "value"], rows)
