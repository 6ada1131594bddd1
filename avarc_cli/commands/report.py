"""``avarc report``: one self-contained HTML page for a labelled classify run."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from core import AvarcError, Classifier
from core.io.files import absolute, check_output_file, write_text
from core.io.results import read_records
from core.io.registry import entry, is_registry_name
from core.runs.report import run_report
from core.models.specs import ModelSpec

from .. import output


def report(
    results: Annotated[Path, typer.Argument(metavar="RESULTS.jsonl", help="Records written by `avarc classify --out` on labelled folders.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="HTML file to write (default: RESULTS.html beside the records).", show_default=False)] = None,
    explain: Annotated[Optional[Path], typer.Option("--explain", help="Folder written by `avarc explain`: its panels are shown for the worst mistakes.", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model the run used, for GFLOPs per image (default: the records' registry name, if any).", show_default=False)] = None,
    worst: Annotated[int, typer.Option("--worst", min=0, help="How many of the most confident mistakes to show.")] = 12,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
) -> None:
    """\b
    avarc classify test/ --out run.jsonl && avarc report run.jsonl   # run.html
    avarc explain wrong/ --out why
    avarc report run.jsonl --explain why --out run.html --force

    Accuracy and top-5, accuracy per class, the confusion matrix, a reliability diagram with the ECE as run and untempered (T = 1, from the last stage's scores: what a tuned profile's temperature changed), how often the true class survives each stage (the pruning diagnostic), compute per image and the most confident mistakes, in one HTML file with its images embedded (opens from disk, no server). Needs `pip install 'avarc\\[report]'`.
    """
    records = read_records(results)
    out = out or results.with_suffix(".html")
    if absolute(out) == absolute(results) or (explain is not None and absolute(out).parent == absolute(explain)
                                              and out.suffix.lower() in (".png", ".npz")):
        raise AvarcError(f"{out}: is an input of this report; never written over, even with --force; choose another "
                         "file", option="out")
    out = check_output_file(out, "out", force)
    if explain is not None and not explain.is_dir():
        raise AvarcError(f"{explain}: no such folder; pass the --out folder of `avarc explain`")
    name = model or next((r["run"].get("model") for r in records if isinstance(r["run"].get("model"), str)), None)
    page = run_report(records, f"avarc report · {results.name}", _spec(name, model is not None), explain, worst)
    write_text(out, page, "out", force)
    output.say(f"wrote {out}")


def _spec(name: str | None, given: bool) -> ModelSpec | None:
    """The architecture for GFLOPs: a registry entry holds it (no download); a model file or folder the records
    name (or ``--model``) is loaded; one that cannot be is an error only when given."""
    if name is None:
        return None
    if is_registry_name(name):
        return entry(name).spec
    try:
        return Classifier.from_pretrained(name, device="cpu", dtype="fp32").spec
    except AvarcError:
        if given:
            raise
        return None
