"""All terminal output: rich tables and progress on stderr-friendly consoles, or one JSON document with --json."""
from __future__ import annotations

import json
import sys
from typing import Any, Iterable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    rows = [list(r) for r in rows]
    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        numeric = all(isinstance(r[i], (int, float)) or r[i] is None for r in rows)
        t.add_column(c, justify="right" if numeric or c[:1].isdigit() or c.endswith(("%", "/s", "s")) else "left",
                     overflow="fold")  # long paths wrap instead of losing their ends
    for r in rows:
        t.add_row(*[_fmt(x) for x in r])
    console.print(t)


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


def progress(transient: bool = False) -> Progress:
    """A progress bar on stderr (so stdout stays clean for JSON/JSONL)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=transient)


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e3 else f"{x:,.1f}"
    return str(x)
