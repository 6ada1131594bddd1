"""``avarc report``: one self-contained HTML page for a labelled classify run."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..options import ForceOpt, opt


def report(
    results: Annotated[Path, typer.Argument(metavar="RESULTS.jsonl", show_default=False,
                                            help="Records of `avarc classify --out` on labelled folders.")],
    out: Annotated[Optional[Path], opt("--out", "-o", metavar="FILE",
                                       help="HTML file (default: RESULTS.html beside the records).")] = None,
    explain: Annotated[Optional[Path], opt("--explain", metavar="DIR",
                                           help="`avarc explain` folder: panels of the worst mistakes.")] = None,
    model: Annotated[Optional[str], opt("--model", "-m", metavar="NAME",
                                        help="The run's model, for GFLOPs (default: from the records).")] = None,
    worst: Annotated[int, opt("--worst", min=0, metavar="N", help="Most confident mistakes shown.",
                              show_default=True)] = 12,
    force: ForceOpt = False,
) -> None:
    """\b
    avarc classify test/ --out run.jsonl && avarc report run.jsonl   # run.html
    avarc explain wrong/ --out why
    avarc report run.jsonl --explain why --out run.html --force

    Accuracy, per-class accuracy, the confusion matrix, a reliability diagram (ECE as run and at T = 1), how
    often the true class survives each stage, compute and the worst mistakes, in one HTML file that opens from
    disk. Needs `pip install 'avarc[report]'`.
    """
    from avarc.errors import AvarcError
    from avarc.io.files import hold_outputs, with_contents, write_text
    from avarc.io.records import read_records, unique_records
    from avarc.io.registry import is_registry_name
    from avarc.runs.report import run_report
    from avarc.tasks.explain_run import record_file

    from .. import output

    out = out or results.with_suffix(".html")
    if explain is not None and not explain.is_dir():
        what = "not a folder" if explain.exists() else "no such folder"
        raise AvarcError(f"{explain}: {what}; pass the --out folder of `avarc explain`", option="explain")
    panels = [f for f in explain.iterdir() if f.suffix.lower() in (".png", ".npz")] if explain is not None else []
    weights = with_contents([model]) if model is not None and not is_registry_name(model) else []   # a folder's too
    records, repeated = unique_records(read_records(results))
    if repeated:
        output.say(f"note: {repeated} records repeat an image already in {results} (a skipped image tried again by "
                   "--resume, or a copied line); each image is counted once, by its last record", err=True)
    shown = [record_file(r) for r in records]                   # the images its thumbnails show
    with hold_outputs({"out": out}, [results, *panels, *weights, *shown], force):
        name = model or records[0]["run"].model
        page = run_report(records, f"avarc report · {results.name}", _spec(name, model is not None), explain, worst)
        write_text(out, page, "out", force)
    output.say(f"wrote {out}")


def _spec(name: str | None, given: bool):  # noqa: ANN202 (a core ModelSpec or None)
    """The architecture for GFLOPs: a registry entry holds it (no download); another model given is loaded."""
    from avarc import Classifier
    from avarc.io.registry import entry, is_registry_name

    if name is None:
        return None
    from avarc.errors import AvarcError

    if is_registry_name(name):
        return entry(name).spec
    try:
        return Classifier.from_pretrained(name, device="cpu", dtype="fp32").spec
    except AvarcError:
        if given:
            raise
        return None
