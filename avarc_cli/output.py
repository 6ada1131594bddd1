"""All terminal output: rich tables and progress on stderr-friendly consoles, or one JSON document with --json.

Every string a user can influence (paths, class names, error text) is printed as text, never as rich markup or
emoji codes: :func:`say` for lines and :func:`table` for tables are the only ways text reaches the terminal, and a
file name that is not UTF-8 shows its odd bytes as U+FFFD instead of failing to print."""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Iterable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from avarc.errors import FIX, AvarcError, NeedsDownload

console = Console()
err_console = Console(stderr=True)
_QUANTITY = re.compile(r"[+\-−]?[\d,]*\.?\d+(e[+\-]?\d+)?\s*(%|[kMG]?B|s)?(\s*\(.*\))?")


FLAGS = {"a": "--class", "b": "--vs", "extensions": "--extension"}   # core parameter → its flag, where they differ


def flag(option: str) -> str:
    """The flag of a core parameter (``patch_nums`` → ``--patch-nums``)."""
    return FLAGS.get(option, "--" + option.replace("_", "-"))


def message(err: AvarcError) -> str:
    """An error as one line; one about a parameter names its flag, and a remedy is worded as a flag or a command."""
    text = shown(err) if err.fix is None else shown(err.template.replace(FIX, _fix(err.fix)))
    return text if err.option is None else f"{flag(err.option)}: {text}"


def _fix(fix: str | NeedsDownload) -> str:
    if isinstance(fix, str):
        return f"pass {flag(fix)}"
    return f"run `avarc download {fix.name}{'' if fix.model_dir is None else f' --dir {fix.model_dir}'}`"


def _numeric(cell: Any) -> bool:
    """A number, or text that reads as a quantity (a sign, a decimal point or a unit); a bare digit string such as
    a class name ``3`` or a file stem ``1438`` is text."""
    if isinstance(cell, (int, float)):
        return True
    return isinstance(cell, str) and bool(_QUANTITY.fullmatch(cell)) and not cell.isdigit()


def shown(value: Any) -> str:
    """A value as terminal text: a surrogate-escaped byte of a non-UTF-8 file name becomes U+FFFD (printable)."""
    return str(value).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def one_line(text: str) -> str:
    """An error as one terminal line: a newline, tab or other control character in a path or a name is written as
    its escape (``\\n``), so the message is never split and still says which name it was."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in shown(text))


def say(line: Any, err: bool = False) -> None:
    """Print one line of user-facing text (stdout, or stderr with ``err``), literally: brackets, ``$`` and ``:x:``
    in a path or a class name are shown as they are."""
    (err_console if err else console).print(Text(shown(line)), soft_wrap=True, emoji=False, highlight=False)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A table whose numeric columns are right-aligned and keep their numbers whole, and whose headers never break
    inside a word (long text cells, such as paths, fold instead). Too wide for the terminal even so, it is printed
    turned: one column per row, headed by its first cell, with the column names down the side, so it still reads at
    80 columns."""
    rows = [list(r) for r in rows]
    if rows and len(rows) < len(columns) and _least_width(columns, rows) > console.width:
        columns, rows = ([columns[0], *(_fmt(r[0]) for r in rows)],
                         [[c, *(r[i] for r in rows)] for i, c in enumerate(columns) if i])
    t = Table(title=Text(shown(title)), title_justify="left", min_width=min(len(title), console.width))
    for i, c in enumerate(columns):
        cells = [r[i] for r in rows if r[i] is not None]
        numeric = sum(map(_numeric, cells)) > len(cells) / 2      # mostly numbers (a turned table mixes in a few words)
        t.add_column(Text(shown(c)), justify="right" if numeric else "left", overflow="fold",
                     min_width=_least(c, cells, numeric))
    for r in rows:
        t.add_row(*(Text(shown(_fmt(x))) for x in r))
    _fit(t)
    console.print(t)


def _fit(t: Table) -> None:
    """Narrow a table that would overflow the terminal by folding the columns with most room to spare, never below a
    column's least width. (rich's own collapse narrows the widest columns first, then widens those below their least
    width again, which can overflow by a few characters.)"""
    widths = [_natural(c) for c in t.columns]
    excess = sum(widths) + 3 * len(widths) + 1 - console.width
    if excess <= 0:
        return
    for _ in range(excess):
        slack = [w - (c.min_width or 1) for w, c in zip(widths, t.columns)]
        i = max(range(len(widths)), key=slack.__getitem__)
        if slack[i] <= 0:
            return              # it cannot fit: rich crops it (a turned table is chosen earlier where one fits)
        widths[i] -= 1
    for c, w in zip(t.columns, widths):
        c.width = w


def _natural(col) -> int:  # noqa: ANN001 (a rich Column)
    """A column's width with nothing folded: its widest header or cell line."""
    return max(len(line) for cell in (col.header, *col.cells) for line in str(cell).splitlines() or [""])


def _least(header: str, cells: list, numeric: bool) -> int:
    """A column's narrowest width: its header's longest word, and a numeric column's longest value."""
    words = max((len(w) for w in str(header).split()), default=1)
    return max(words, *(len(_fmt(x)) for x in cells)) if numeric and cells else words


def _least_width(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> int:
    widths = []
    for i, c in enumerate(columns):
        cells = [r[i] for r in rows if r[i] is not None]
        widths.append(3 + _least(c, cells, sum(map(_numeric, cells)) > len(cells) / 2))
    return 1 + sum(widths)


_AT_THE_END: list[str] = []


def at_the_end(line: str) -> None:
    """A line for stderr once the command has succeeded (after its results, where it is read; not before an
    error, which stays one line)."""
    if line not in _AT_THE_END:
        _AT_THE_END.append(line)


_DATA_ON_STDOUT: list[Console] = []        # the console stdout had, while a command writes its data there


def finish(succeeded: bool) -> None:
    """The end of a command: its lines for the end (if it succeeded), and stdout given back to tables."""
    global console
    for line in _AT_THE_END if succeeded else ():
        say(line, err=True)
    _AT_THE_END.clear()
    if _DATA_ON_STDOUT:
        console = _DATA_ON_STDOUT.pop()


def keep_stdout_for_data() -> None:
    """Send tables and lines to stderr until the command ends: stdout carries its data (``--out -``)."""
    global console
    _DATA_ON_STDOUT.append(console)
    console = err_console


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


def progress(transient: bool = False, disable: bool = False) -> Progress:
    """A progress bar on stderr (so stdout stays clean for JSON/JSONL); ``disable`` silences it (other ranks)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=err_console,
                    transient=transient, disable=disable)


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e3 else f"{x:,.1f}"
    return str(x)


def crash_log(err: BaseException) -> Path | None:
    """Write an unexpected error's full trace (with the command line) to a new file under the user's cache
    ($XDG_CACHE_HOME/avarc/logs, else the temp folder) and return its path; None if neither is writable."""
    text = f"avarc {' '.join(sys.argv[1:])}\n\n" + "".join(traceback.format_exception(err))
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "avarc" / "logs"
    for folder in (base, Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=time.strftime("crash-%Y%m%d-%H%M%S-"), suffix=".log", dir=folder)
            with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
                f.write(text)
            return Path(name)
        except OSError:
            continue
    return None
