"""The ``avarc`` command line: thin Typer commands over the library (``avarc``)."""
from __future__ import annotations

import os
import signal

# Large CPU tensors on transparent huge pages (torch's own allocator switch, read at its first allocation, so set
# before torch is imported): each forward's activations are fresh allocations, and faulting them in 4 KiB pages
# took twice as long as in 2 MiB ones (a 96 MB buffer: 32 against 16 ms on the 2-core EPYC). A user's value wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main() -> None:
    """Entry point. Ctrl-C / SIGTERM while torch and the commands are still importing (seconds on a busy machine)
    end the process at once with 130 / 143: nothing has been written yet, and an interrupted import would otherwise
    print a traceback (or leave numpy half-imported)."""
    quiet = {s: signal.signal(s, lambda signum, frame: os._exit(128 + signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    from .app import main as run

    for s, handler in quiet.items():
        signal.signal(s, handler)
    run()
