"""The ``avarc`` command line: thin Typer commands over the library (``avarc``)."""
from __future__ import annotations

import os
import signal
import sys

# Large CPU tensors on transparent huge pages (torch's own allocator switch, read at its first allocation, so set
# before torch is imported): each forward's activations are fresh allocations, and faulting them in 4 KiB pages
# took twice as long as in 2 MiB ones (a 96 MB buffer: 32 against 16 ms on the 2-core EPYC). A user's value wins,
# read as torch reads it (0 or 1; yes/no, true/false and on/off are taken for them, since torch would only warn with
# its own source path and ignore the value); anything else is one warning line and the default.
_THP = os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1").strip().lower()
if _THP not in ("0", "1"):
    _flag = {"yes": "1", "true": "1", "on": "1", "no": "0", "false": "0", "off": "0"}.get(_THP)
    if _flag is None:
        sys.stderr.write(f"warning: THP_MEM_ALLOC_ENABLE={os.environ['THP_MEM_ALLOC_ENABLE']!r} is not 0 or 1; "
                         "using 1\n")
    os.environ["THP_MEM_ALLOC_ENABLE"] = _flag or "1"


def main() -> None:
    """Entry point. Ctrl-C / SIGTERM while torch and the commands are still importing (seconds on a busy machine)
    end the process at once with 130 / 143: nothing has been written yet, and an interrupted import would otherwise
    print a traceback (or leave numpy half-imported)."""
    quiet = {s: signal.signal(s, lambda signum, frame: os._exit(128 + signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    from .app import main as run

    for s, handler in quiet.items():
        signal.signal(s, handler)
    run()
