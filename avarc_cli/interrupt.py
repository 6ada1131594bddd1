"""Ctrl-C and SIGTERM end a command the same way: as a KeyboardInterrupt that the command turns into its one line
(what was written, where), then exit code 130 (SIGINT) or 143 (SIGTERM), as shells report them."""
from __future__ import annotations

import shlex
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import typer

from . import output

_received: list[int] = []


def _raise(signum: int, frame) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Route SIGINT and SIGTERM through KeyboardInterrupt while the block runs (only the main thread can install
    handlers); the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def interrupt_code() -> int:
    return 128 + (_received[-1] if _received else signal.SIGINT)


@contextmanager
def interruptible(said: Callable[[], str | None]) -> Iterator[None]:
    """Run the block under :func:`stop_on_signals`; Ctrl-C or SIGTERM ends the command with ``said()``'s one line
    (None: say nothing, as on other ranks) and exit code 130 or 143 instead of a traceback or click's "Aborted!"."""
    try:
        with stop_on_signals():
            yield
    except KeyboardInterrupt:
        text = said()
        if text:
            output.say(text, err=True)
        raise typer.Exit(interrupt_code()) from None


def results_safe(out: Path | None, safe: int | None) -> str:
    """classify's line after an interrupt: what is safe where, and how to go on."""
    if safe is None:
        return "interrupted before any image was classified; no new record was written"
    if out is None:
        return "interrupted: nothing was saved (no --out file)"
    args = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
    return f"interrupted: {safe} records safe in {out}; continue with: avarc {shlex.join(args)}"
