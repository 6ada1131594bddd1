"""Output files written safely: checked before a run starts, written whole or not at all.

Every output goes to a temporary file beside its target and is renamed over it (``os.replace``), so a kill mid-write
leaves the old file or the new one, never half of one. Paths are checked up front (a directory where a file is
needed, a path under a file, an unwritable folder) so a bad ``--out`` fails in one line before any work is done.
"""
from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from ..errors import FIX, AvarcError


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


def disk_error(err: OSError, safe: str, fix: str) -> AvarcError:
    """A write that failed (a full disk, a quota, an I/O error) as one line: what is safe, and what to do."""
    what = "disk full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else f"cannot write ({err.strerror})"
    return AvarcError(f"{what}: {safe}; free space and {fix}")


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
