"""All terminal output: rich tables and progress on stderr-friendly consoles, or one JSON document with --json."""
from __future__ import annotations

import json
import re
import sys
from typing import Any, Iterable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from core import AvarcError

console = Console()
err_console = Console(stderr=True)
_NUMBER = re.compile(r"[+\-−]?[\d.,]+(e[+\-]?\d+)?\s*(%|[kMG]?B|s)?(\s*\(.*\))?")


FLAGS = {"a": "--class", "b": "--vs", "extensions": "--extension"}   # core parameter → its flag, where they differ


def message(err: AvarcError) -> str:
    """An error as one line; one about a parameter names its flag (``patch_nums`` → ``--patch-nums``)."""
    if err.option is None:
        return str(err)
    return f"{FLAGS.get(err.option, '--' + err.option.replace('_', '-'))}: {err}"


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A table whose numeric columns are right-aligned and whose headers never break inside a word (long cells,
    such as paths, fold instead), so it reads at 80 columns."""
    rows = [[_fmt(x) for x in r] for r in rows]
    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        cells = [r[i] for r in rows if r[i] != "–"]
        numeric = bool(cells) and all(_NUMBER.fullmatch(x) for x in cells)
        t.add_column(c, justify="right" if numeric else "left", overflow="fold",
                     min_width=max(len(w) for w in c.split()) if c.strip() else None)
    for r in rows:
        t.add_row(*r)
    console.print(t)


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


def progress(transient: bool = False, disable: bool = False) -> Progress:
    """A progress bar on stderr (so stdout stays clean for JSON/JSONL); ``disable`` silences it (other ranks)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=transient, disable=disable)


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e3 else f"{x:,.1f}"
    return str(x)
