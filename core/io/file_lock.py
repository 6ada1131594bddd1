"""The one lock of an output file: ``flock`` on a hidden ``.avarc-HASH.lock`` beside it, removed when released, so a
run leaves no lock file behind. Removing a lock file is safe only with a check on the taker's side: the holder
unlinks the name while it still holds the lock, and a taker that locked a file whose name was meanwhile removed (or
re-created) lets go and tries again, so two holders can never lock different files of one name. Where ``flock``
does not exist (Windows), filelock's lock is used and its file stays.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from filelock import FileLock, Timeout

from .files import absolute

try:
    import fcntl
except ImportError:          # Windows
    fcntl = None  # type: ignore[assignment]


class OutputLock:
    """An exclusive lock of one file for a block (``with``) or from :meth:`acquire` to :meth:`release`."""

    def __init__(self, lock_file: Path):
        self.lock_file, self._fd = lock_file, None
        self._fallback = FileLock(lock_file) if fcntl is None else None

    def acquire(self, timeout: float = -1) -> OutputLock:
        """Take the lock, waiting up to ``timeout`` seconds (negative: for ever; 0: refused at once with
        filelock's ``Timeout``)."""
        if self._fallback is not None:
            self._fallback.acquire(timeout=timeout)
            return self
        deadline = time.monotonic() + timeout
        while True:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if 0 <= timeout and time.monotonic() >= deadline:
                    raise Timeout(str(self.lock_file)) from None
                time.sleep(0.05)
                continue
            if _same_file(fd, self.lock_file):
                self._fd = fd
                return self
            os.close(fd)              # its holder removed it between our open and our lock: try the name again

    def release(self) -> None:
        if self._fallback is not None:
            self._fallback.release()
            return
        if self._fd is not None:
            try:
                self.lock_file.unlink(missing_ok=True)     # while held: a waiter on this inode sees it gone
            finally:
                os.close(self._fd)                           # closing lets go of the flock
                self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        st, now = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def file_lock(path: str | os.PathLike) -> OutputLock:
    """The one lock of a file, keyed by its resolved path (a symlink or another spelling of it takes the same lock);
    a hidden ``.avarc-HASH.lock`` beside the real file, short whatever the file's name, gone after the run."""
    real = absolute(path)
    return OutputLock(real.with_name(f".avarc-{hashlib.sha256(os.fsencode(real)).hexdigest()[:16]}.lock"))
