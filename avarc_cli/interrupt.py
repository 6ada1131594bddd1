"""Ctrl-C and SIGTERM end a command the same way: as a KeyboardInterrupt that the command turns into its one line,
then exit code 130 (SIGINT) or 143 (SIGTERM), as shells report them."""
from __future__ import annotations

import signal
import threading

_received: list[int] = []


def _raise(signum: int, frame) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """Route SIGINT and SIGTERM through KeyboardInterrupt (only the main thread can install handlers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _raise)
        signal.signal(signal.SIGTERM, _raise)


def interrupt_code() -> int:
    return 128 + (_received[-1] if _received else signal.SIGINT)
