"""Result records (one JSON line per image), the results file with ``--resume``, and the run's metrics.

Every record (a :class:`Record`) carries a ``run`` key, the run's identity (a :class:`RunIdentity`: every input of
the computation and a fingerprint of them), and ``file``, the image's resolved absolute path (a dataset row: its
split's resolved path and row), which is the key resuming matches on. Resuming never removes a record: a file of
another run, or not a results file, is refused untouched. A kill -9 can leave a torn last line; resuming cuts it
off, so no record is duplicated and none that was complete is lost. One run at a time holds the file's lock. Records
are written by :func:`record_line` (strict JSON, bytes-safe paths) and read back only through :func:`parse_record`,
which checks every field by the schema, so a damaged line is one error naming it. The file is this run's while it
writes: replaced or changed by another program, the run stops.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from filelock import Timeout

from ..errors import FIX, AvarcError
from .distributed import Dist
from .files import OutputLock, busy, disk_error, file_lock
from .records import IDENTITY, NotARecord, Record, RunIdentity, parse_line, parse_record, record_key, record_line

STDOUT = "-"          # ``--out -``: the records as JSON lines on stdout


@dataclass
class Resumed:
    """What ``--resume`` found: the records already done by this run (by image key), and whether a torn last line
    (a kill -9 mid-write) was cut off."""

    done: dict[str, Record] = field(default_factory=dict)
    torn: bool = False
    skipped: dict[str, str] = field(default_factory=dict)   # images whose records are all skipped → the last reason

    @property
    def retried(self) -> int:
        """Images classified again: all their records are skipped (the reason may have passed)."""
        return len(self.skipped)

    def repeats(self, record: Record) -> bool:
        """A retried image skipped again for the same reason: nothing new to write."""
        return record["status"] == "skipped" and self.skipped.get(record_key(record)) == record["error"]


def lock_results(path: str | os.PathLike) -> OutputLock:
    """Hold an exclusive lock on the results file for the whole run, so two processes can never append to one file; a
    second one is refused at once. The lock (a hidden file beside the real file) is keyed by the resolved path, so a
    symlink or another spelling of the same file takes the same lock, and its name is short (a 250-byte name works)."""
    path = Path(path)
    lock = file_lock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise busy(path, "out") from None
    return lock


def _differs(theirs: RunIdentity, ours: RunIdentity) -> str:
    """The identity fields that differ, a weight file's named: replaced under a run, it is the file to put back."""
    files = {"weights": f"the VAR weights of {ours.model}",
             "vae_weights": f"the VQ-VAE weights of {ours.vae_file or 'the model (its own vae.pth)'}"}
    diff = [f"{k} {getattr(theirs, k)!r} vs {getattr(ours, k)!r} now" + (f": {files[k]} are not the run's"
                                                                         if k in files else "")
            for k in IDENTITY if getattr(theirs, k) != getattr(ours, k)]
    return ", ".join(diff) or "other candidate classes or schedule"


def open_results(path: str | os.PathLike, resume: bool, run: RunIdentity) -> Resumed:
    """Prepare the results file: new (an existing file needs ``resume``), or resumed. Resuming never removes a
    record: a file that is not a results file, or holds records of another run, is refused unchanged; only a torn
    last line (one that does not parse) is cut off, and a whole last record without its newline gets one. Images
    whose records are all skipped are not done: they are tried again (a new record follows the old one unless the
    image is skipped again for the same reason; readers take the last record of an image)."""
    path = Path(path)
    if not path.exists():
        path.write_bytes(b"")
        return Resumed()
    if not resume:
        raise AvarcError(f"{path}: already exists; {FIX} to continue it, or choose another file", option="out",
                         fix="resume")
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and parse_line(data[end:]) is not None:     # a whole last record, only its newline missing
        with open(path, "ab") as f:
            f.write(b"\n")
        data, end = data + b"\n", len(data) + 1
    state, skipped = Resumed(torn=end < len(data)), {}
    for number, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = parse_record(line)
        except NotARecord as e:
            raise AvarcError(f"{path}: line {number} is not an avarc result record ({e}), so this is not a results "
                             "file; left it untouched; fix or remove that line, or choose another file",
                             option="out") from None
        if rec["run"].fingerprint != run.fingerprint:
            raise AvarcError(f"{path}: holds records of another run ({_differs(rec['run'], run)}); left it "
                             "untouched; resume with the same settings, or choose another file for this run",
                             option="out")
        if rec["status"] == "skipped":
            skipped[record_key(rec)] = rec["error"]
        else:
            state.done.setdefault(record_key(rec), rec)
    state.skipped = {k: e for k, e in skipped.items() if k not in state.done}
    if state.torn:
        if not data[end:].startswith(b'{"'):
            raise AvarcError(f"{path}: its last line is not an avarc result record, so this is not a results file; "
                             "left it untouched; choose another file", option="out")
        os.truncate(path, end)
    return state


class ResultsWriter:
    """Appends records as they arrive, one ``write`` per batch of whole lines, with Ctrl-C and SIGTERM held back
    until the batch is on disk (so an interrupt never tears a line). A full disk (or any write error) cuts the
    partial batch back off and is one error saying how many records are safe."""

    def __init__(self, path: str | os.PathLike, safe: int = 0):
        self.path, self.safe = Path(path), safe
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if str(path) != STDOUT else None
        self._end = os.fstat(self._fd).st_size if self._fd is not None else 0

    def _check_unchanged(self) -> None:
        """The file is still the one this run writes, as long as it left it: another program that replaced it (``sed
        -i``), truncated or appended to it would make the run's counts wrong and its next records land elsewhere."""
        assert self._fd is not None     # called by write only for a file (``-`` returned before)
        ours = os.fstat(self._fd)
        try:
            now = os.stat(self.path)
        except OSError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (ours.st_dev, ours.st_ino) or ours.st_size != self._end:
            raise AvarcError(f"{self.path}: changed under this run (replaced, truncated or written by another "
                             f"program); stopped writing, {self.safe} records were in it; check the file, then "
                             "continue with --resume", option="out")

    def write(self, records: Iterable[Record]) -> None:
        records = list(records)
        data = b"".join(map(record_line, records))
        if self._fd is None:                # ``-``: JSON lines on stdout, as they come
            binary = getattr(sys.stdout, "buffer", None)     # a host that replaced stdout (a notebook) takes text
            binary.write(data) if binary is not None else sys.stdout.write(data.decode("utf-8", "surrogateescape"))
            sys.stdout.flush()
            self.safe += len(records)
            return
        self._check_unchanged()
        held = _hold_signals()
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as e:
            os.ftruncate(self._fd, start)
            raise disk_error(e, f"{self.safe} records safe in {self.path}", "--resume") from None
        finally:
            _release_signals(held)
        self.safe += len(records)
        self._end = start + len(data)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


_HELD = {signal.SIGINT, signal.SIGTERM}


def _hold_signals() -> bool:
    if hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
        return True
    return False


def _release_signals(held: bool) -> None:
    if held:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)


@dataclass
class ResultsFile:
    """An open results file: the image keys already done (on every rank), what resuming found and the writer
    (rank 0 only)."""

    done: set[str]
    resumed: Resumed | None = None
    writer: ResultsWriter | None = None

    def write(self, records: Sequence[Record]) -> None:
        if self.writer is not None:
            self.writer.write(records)


@contextmanager
def results_file(path: str | os.PathLike | None, resume: bool, run: RunIdentity,
                 dist: Dist = Dist()) -> Iterator[ResultsFile]:
    """The results file of one run, locked by rank 0 for the whole block and opened new or resumed there (its errors
    reach every rank); without a path, nothing is written."""
    if path is None:
        yield ResultsFile(set())
        return
    if str(path) == STDOUT:
        if resume:
            raise AvarcError("cannot continue stdout (-); resume a results file", option="resume")
        yield ResultsFile(set(), writer=ResultsWriter(path) if dist.is_main else None)
        return
    held: dict = {}

    def prepare() -> list[str]:
        held["lock"] = lock_results(path)
        held["state"] = open_results(path, resume, run)
        return sorted(held["state"].done)

    try:
        done = set(dist.from_main(prepare))
        f = ResultsFile(done, held.get("state"), ResultsWriter(path, len(done)) if dist.is_main else None)
        try:
            yield f
        finally:
            if f.writer is not None:
                f.writer.close()
    finally:
        if "lock" in held:
            held["lock"].release()


