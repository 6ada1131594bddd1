"""Output files written safely: checked before a run starts, written whole or not at all.

Every output goes to a temporary file beside its target and is renamed over it (``os.replace``), so a kill mid-write
leaves the old file or the new one, never half of one. Paths are checked up front (a directory where a file is
needed, a path under a file, an unwritable folder) so a bad ``--out`` fails in one line before any work is done.
The output guard (:func:`hold_outputs`, :func:`hold_folder`) is the one place that also refuses an output that is
one of the run's inputs and locks every output while it is written. The lock of a file (:func:`file_lock`) is
``flock`` on a hidden ``.avarc-HASH.lock`` beside it, removed when released, so a run leaves no lock file behind:
the holder unlinks the name while it still holds the lock, and a taker that locked a file whose name was meanwhile
removed (or re-created) lets go and tries again, so two holders never lock different files of one name.
"""
from __future__ import annotations

import errno
import hashlib
import os
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Iterable, Iterator

from filelock import FileLock, Timeout

from ..errors import FIX, AvarcError

try:
    import fcntl
except ImportError:          # Windows: filelock's lock (its file stays), for folders too
    fcntl = None  # type: ignore[assignment]


def absolute(path: str | os.PathLike) -> Path:
    """The resolved absolute path; a symlink loop (which ``resolve`` cannot follow) keeps its absolute spelling."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def _writable_folder(folder: Path, path: Path, option: str | None) -> None:
    """``folder`` (which will hold ``path``) exists or can be made, and a file can really be created in it (a probe,
    since permission bits say nothing for root or on /proc and read-only mounts)."""
    probe = folder
    while not probe.exists() and probe != probe.parent and not probe.is_symlink():
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise AvarcError(f"{path}: {probe} is a file, not a folder; choose a path in a folder", option=option)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".avarc-probe.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise AvarcError(f"{path}: cannot write in {probe} ({e.strerror}); choose a writable folder",
                         option=option) from None


def check_output_file(path: str | os.PathLike, option: str | None = None, force: bool | None = None) -> Path:
    """``path`` (the value of parameter ``option``, which errors name) can be written as a file. ``force=False``
    refuses an existing file; ``None`` allows it (append)."""
    path = Path(path)
    if path.is_dir():
        raise AvarcError(f"{path}: is a folder; give a file name", option=option)
    if path.exists() and not path.is_file():
        raise AvarcError(f"{path}: not a regular file; give a file name", option=option)
    _writable_folder(path.parent, path, option)
    if force is False and path.exists():
        raise refuse_existing(path, option)
    return path


def check_output_files(paths: dict[str, str | os.PathLike | None], force: bool | None = None) -> None:
    """Several output files of one run (``{option: path}``, None: not asked for): each writable (``force`` as in
    :func:`check_output_file`), no two the same."""
    seen: dict[Path, str] = {}
    for option, path in paths.items():
        if path is None:
            continue
        check_output_file(path, option, force)
        if absolute(path) in seen:
            raise AvarcError(f"{path}: is the same file as the {seen[absolute(path)]} output; give each output its own "
                             "file", option=option)
        seen[absolute(path)] = option


class OutputLock:
    """An exclusive lock of one file for a block (``with``) or from :meth:`acquire` to :meth:`release`."""

    def __init__(self, lock_file: Path):
        self.lock_file = lock_file
        self._fd: int | None = None
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


def busy(path: str | os.PathLike, option: str | None = None) -> AvarcError:
    return AvarcError(f"{path}: another avarc run is writing this file; wait for it to finish, or choose another file",
                      option=option)


def _inode(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def refuse_inputs(outputs: Iterable[tuple[str | None, str | os.PathLike | None]],
                  inputs: Iterable[str | os.PathLike]) -> None:
    """No output (``(option, path)`` pairs) is one of the run's inputs: the same path, or the same file through a
    symlink or a hard link. Refused with or without ``--force``: an input is never the run's to replace. Only outputs
    that already exist can be inputs, so new outputs cost nothing; existing ones are compared with every input."""
    existing = [(option, Path(p)) for option, p in outputs if p is not None and os.path.lexists(p)]
    if not existing:
        return
    by_path = {absolute(p): (option, p) for option, p in existing}
    by_inode = {_inode(p): (option, p) for option, p in existing if _inode(p) is not None}
    for src in inputs:
        hit = by_path.get(absolute(src)) or by_inode.get(_inode(src))
        if hit is not None:
            same = "" if str(src) == str(hit[1]) else f" (the same file as {src})"
            raise AvarcError(f"{hit[1]}: is an input of this run{same}; never written over, even with --force; "
                             "choose another file", option=hit[0])


def with_contents(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Each path, and every file under the folders among them: a command's inputs as :func:`refuse_inputs` compares
    them before the images are collected (a folder's images are inputs; its other files too, as far as it knows)."""
    return [f for p in map(Path, paths) for f in [p, *(p.rglob("*") if p.is_dir() else ())]]


@contextmanager
def hold_outputs(outputs: dict[str, str | os.PathLike | None], inputs: Iterable[str | os.PathLike] = (),
                 force: bool | None = None) -> Iterator[None]:
    """The output guard of a command writing files: none is an input (:func:`refuse_inputs`, first, so an input is
    never answered with "pass --force"), each can be written (``force`` as in :func:`check_output_file`), and each is
    locked for the block, so a second run writing the same file is refused at once instead of both finishing with
    one result."""
    refuse_inputs(outputs.items(), inputs)
    check_output_files(outputs, force)
    with ExitStack() as held:
        for option, path in outputs.items():
            if path is None:
                continue
            folder = Path(path).parent
            made = [f for f in [folder, *folder.parents] if not os.path.lexists(f)]    # deepest first
            folder.mkdir(parents=True, exist_ok=True)      # checked writable above; the lock sits there
            held.callback(_remove_empty, made)             # a run that failed leaves no folder behind
            held.enter_context(_held(file_lock(path), busy(path, option)))
        yield


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders (deepest first) the guard made for outputs that were never written."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:                 # not empty: an output is there
            return


@contextmanager
def _held(lock: OutputLock, refused: AvarcError) -> Iterator[None]:
    """``lock`` held for the block, or ``refused`` at once when another process holds it."""
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise refused from None
    try:
        yield
    finally:
        lock.release()


@contextmanager
def hold_folder(path: str | os.PathLike, option: str | None = None) -> Iterator[None]:
    """Lock the output folder ``path`` (made by :func:`make_output_dir`) for the block: a second run writing into it
    is refused at once. The lock is on the folder itself (``flock``), so nothing is added to it; without ``flock``
    (Windows) it is filelock's lock file beside the folder, as :func:`file_lock` takes for a file."""
    refused = AvarcError(f"{path}: another avarc run is writing into this folder; wait for it to finish, or choose "
                         "another folder", option=option)
    if fcntl is None:
        with _held(file_lock(path), refused):
            yield
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise refused from None
        yield
    finally:
        os.close(fd)


def make_output_dir(path: str | os.PathLike, option: str | None = None) -> Path:
    """Create the output folder ``path`` (and its parents), or fail in one line."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AvarcError(f"{path}: is a file, not a folder; give a folder name", option=option)
    _writable_folder(path, path, option)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AvarcError(f"{path}: cannot create the folder ({e.strerror}); choose another folder",
                         option=option) from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class DiskFull(AvarcError):
    """A write that failed for want of space (or another I/O error): a command may reword what is safe."""


def disk_error(err: OSError, safe: str, fix: str) -> DiskFull:
    """A write that failed (a full disk, a quota, an I/O error) as one line: what is safe, and what to do."""
    what = "disk full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else f"cannot write ({err.strerror})"
    return DiskFull(f"{what}: {safe}; free space and {fix}")


def refuse_existing(path: Path, option: str | None = None) -> AvarcError:
    return AvarcError(f"{path}: already exists; {FIX} to overwrite it, or choose another file", option=option,
                      fix="force")


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", exclusive: bool = False,
                 option: str | None = None) -> Iterator[IO]:
    """Write ``path`` through a temporary file in the same folder, flushed to disk and renamed over the target only
    when the block completes; on any error (or a signal) the target is untouched and the temporary file removed.
    ``exclusive``: the target is created only if it does not exist at that moment (a hard link, which fails on an
    existing name), so of two runs racing to one name one is refused, never silently overwritten. The temporary
    name is short, so a target name of 255 bytes works. A full disk is one error naming the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".avarc-", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())   # not mkstemp's 0600
        text = "b" not in mode
        with os.fdopen(fd, mode, encoding="utf-8" if text else None, newline="" if text else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise refuse_existing(path, option) from None
            except OSError:                         # no hard links here (FAT, some FUSE): check, then rename
                if os.path.lexists(path):
                    raise refuse_existing(path, option) from None
                os.replace(tmp, path)
            Path(tmp).unlink(missing_ok=True)
        else:
            os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_error(e, f"{path} was not written", "run again") from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str, option: str | None = None, force: bool = False) -> Path:
    """A whole text file written atomically; an existing one is refused unless ``force`` (errors name ``option``),
    also when another process creates it meanwhile."""
    path = check_output_file(path, option, force)
    with atomic_write(path, "w", exclusive=not force, option=option) as f:
        f.write(text)
    return path
