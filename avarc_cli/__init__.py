"""The ``avarc`` command line: thin Typer commands over ``core``."""
from __future__ import annotations

import os
import signal


def main() -> None:
    """Entry point. Ctrl-C / SIGTERM while torch and the commands are still importing (seconds on a busy machine)
    end the process at once with 130 / 143: nothing has been written yet, and an interrupted import would otherwise
    print a traceback (or leave numpy half-imported)."""
    quiet = {s: signal.signal(s, lambda signum, frame: os._exit(128 + signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    from .app import main as run

    for s, handler in quiet.items():
        signal.signal(s, handler)
    run()
