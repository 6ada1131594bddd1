"""Ctrl-C and SIGTERM end a command the same way: as a KeyboardInterrupt that the command turns into its one line,
then exit code 130 (SIGINT) or 143 (SIGTERM), as shells report them."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

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
