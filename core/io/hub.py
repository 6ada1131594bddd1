"""Fetching registry models from the Hugging Face hub into its cache or a plain directory, and finding them again.

Everything goes through ``huggingface_hub``, so its environment is honoured as it documents it: ``HF_HOME`` /
``HF_HUB_CACHE`` (where the cache is), ``HF_ENDPOINT`` (which server), ``HF_TOKEN`` (private or gated repos) and
``HF_HUB_OFFLINE`` (no request at all; only what is cached). A transfer cut mid-way is resumed with a Range request
by ``huggingface_hub`` itself. What it does not do is check the bytes against the hub's record, so a file that was
just fetched is hashed here and compared with the SHA-256 the hub publishes for LFS files (the linked ETag).
"""
from __future__ import annotations

import http.client
import os
import re
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import FIX, AvarcError, NeedsDownload

_SHA256 = re.compile(r"[0-9a-f]{64}")
PROBE_TIMEOUT_S = 3.0


class HubUnreachable(AvarcError):
    """The hub could not be reached at all: every later download would fail the same way, so callers stop."""


@dataclass(frozen=True)
class HubFile:
    """Where one model file lives on the hub; ``name`` is the registry name used in messages."""

    name: str
    repo_id: str
    filename: str


@dataclass(frozen=True)
class Download:
    """One registry file after ``download``: where it is and what happened to it."""

    name: str
    path: Path
    size: int
    status: str               # "downloaded" (fetched now), "present" (already here, nothing fetched) or "bundled"
    sha256: str | None = None  # the hub's SHA-256 the fetched bytes were checked against (None: nothing fetched)


def find_local(e: HubFile, model_dir: str | os.PathLike | None = None, revision: str | None = None) -> Path | None:
    """A model's file if it is already on this machine, in ``model_dir`` or else the HF cache. Never uses the network.

    In ``model_dir`` the file is looked for where ``download --dir`` puts it (its path in the repository) and, for
    files placed there by hand, under its bare name.
    """
    from huggingface_hub import try_to_load_from_cache

    if model_dir is not None:
        for path in (Path(model_dir) / e.filename, Path(model_dir) / Path(e.filename).name):
            if path.is_file():
                return path
        return None
    cached = try_to_load_from_cache(e.repo_id, e.filename, revision=revision)
    return Path(cached) if isinstance(cached, str) else None


def download(e: HubFile, model_dir: str | os.PathLike | None = None, revision: str | None = None,
             force: bool = False) -> Download:
    """Fetch one registry file (a no-op when it is already here), then check what was fetched against the hub.

    Without ``model_dir`` the file goes to the HF cache; with it, it becomes a plain file there.
    """
    from huggingface_hub import constants, hf_hub_download

    before = find_local(e, model_dir, revision)
    if constants.HF_HUB_OFFLINE:  # answered from disk alone, so not even huggingface_hub is asked to try the network
        if force or before is None:
            why = "downloading again needs the network" if force else "not downloaded yet"
            raise AvarcError(f"{e.name}: {why} but HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE to download it")
        return Download(e.name, before, before.stat().st_size, "present")
    before_id = _identity(before)
    if before is not None and not force and _unreachable_now():
        return Download(e.name, before, before.stat().st_size, "present")     # here; only the update check is lost
    _check_reachable(e)
    try:
        path = Path(hf_hub_download(e.repo_id, e.filename, revision=revision, force_download=force,
                                    local_dir=None if model_dir is None else Path(model_dir)))
    except OSError as err:  # huggingface_hub's errors (HTTP, not found, offline, disk): one line saying what to do
        raise _explain(e, revision, err) from None
    if _identity(path) == before_id:
        return Download(e.name, path, path.stat().st_size, "present")
    sha = _verify(e, path, revision, model_dir)
    return Download(e.name, path, path.stat().st_size, "downloaded", sha)


def _unreachable_now() -> bool:
    from huggingface_hub import constants

    return not _behind_proxy() and _unreachable(constants.ENDPOINT) is not None


def _behind_proxy() -> bool:
    return any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"))


def _check_reachable(e: HubFile) -> None:
    check_reachable(e.name, "the file is not here")


def check_reachable(what: str, missing: str) -> None:
    """One HTTP request to the endpoint, with a short timeout, before huggingface_hub's retries (which back off for
    about a minute per file): a refused connection, or a server that does not answer, is one line at once naming
    ``what`` and that ``missing`` is why the network was needed. Skipped behind a proxy, which we cannot probe."""
    from huggingface_hub import constants

    why = None if _behind_proxy() else _unreachable(constants.ENDPOINT)
    if why:
        raise HubUnreachable(f"{what}: cannot reach {constants.ENDPOINT} ({why}) and {missing}; check the connection "
                             "(or HF_ENDPOINT), or set HF_HUB_OFFLINE=1 to use cached files only")


@lru_cache(maxsize=None)
def _unreachable(endpoint: str) -> str | None:
    """Why the endpoint does not answer (no connection, or no HTTP answer within the timeout), or None when it
    answers at all (any status); asked once per process."""
    url = urlsplit(endpoint)
    if not url.hostname:
        return "not an http(s) address with a host, e.g. https://huggingface.co"
    kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    conn = kind(url.hostname, url.port, timeout=PROBE_TIMEOUT_S)
    try:
        conn.request("HEAD", "/")
        conn.getresponse()
    except (OSError, http.client.HTTPException) as err:
        if isinstance(err, TimeoutError) or isinstance(err, socket.timeout):
            return f"no answer within {PROBE_TIMEOUT_S:g} s"
        return getattr(err, "strerror", None) or type(err).__name__
    finally:
        conn.close()
    return None


def _verify(e: HubFile, path: Path, revision: str | None, model_dir: str | os.PathLike | None) -> str | None:
    """Compare a freshly fetched file with the hub's SHA-256 for it; remove it (blob and link too) if they differ."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    from ..models.checkpoints import file_sha256

    cached = model_dir is None
    try:
        meta = get_hf_file_metadata(hf_hub_url(e.repo_id, e.filename, revision=revision))
    except Exception as err:  # HTTP errors and the HTTP client's own connection errors alike
        _remove(path, cached)
        raise AvarcError(f"{e.name}: fetched {e.filename} but could not read the hub's checksum for it "
                         f"({_first_line(err)}); "
                         "the file was removed, run the command again") from None
    expected = (meta.etag or "").lower()
    if not _SHA256.fullmatch(expected):
        return None  # not an LFS file: the hub publishes no SHA-256 for it
    actual = file_sha256(path)
    if actual != expected:
        _remove(path, cached)
        raise AvarcError(f"{e.name}: {e.filename} does not match the hub's checksum (sha256 {actual[:12]}…, expected "
                         f"{expected[:12]}…); the corrupt file was removed, {FIX} again",
                         fix=NeedsDownload(e.name, model_dir))
    return actual


def _remove(path: Path, cached: bool) -> None:
    """Delete a file; in the HF cache also the blob its snapshot link points to, so nothing corrupt stays behind."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    if cached:
        blob.unlink(missing_ok=True)


def _identity(path: Path | None) -> tuple[int, int, int] | None:
    """What tells whether a file was rewritten (a cache link's target is followed)."""
    if path is None or not path.exists():
        return None
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def _explain(e: HubFile, revision: str | None, err: OSError) -> AvarcError:
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = revision or "main"
    if isinstance(err, LocalEntryNotFoundError):
        return AvarcError(f"{e.name}: cannot reach {constants.ENDPOINT} and the file is not cached; check the "
                          "connection (or HF_ENDPOINT) and run the command again")
    if isinstance(err, RepositoryNotFoundError):
        return AvarcError(f"{e.name}: repository {e.repo_id} not found or not accessible at {constants.ENDPOINT}; "
                          "for a private or gated repository set HF_TOKEN")
    if isinstance(err, RevisionNotFoundError):
        return AvarcError(f"{e.name}: revision {rev!r} not found in {e.repo_id}; name an existing branch, tag or "
                          "commit", option="revision")
    if isinstance(err, EntryNotFoundError):
        return AvarcError(f"{e.name}: {e.filename} not found in {e.repo_id} at revision {rev!r}")
    return AvarcError(f"{e.name}: download of {e.filename} failed ({_first_line(err)}); run the command again")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__
