"""The one error type users see: a one-line message that names the file or value and the fix."""
from __future__ import annotations

import os
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Iterable

FIX = "{fix}"


@dataclass(frozen=True)
class NeedsDownload:
    """The remedy "download this registry model" (into ``model_dir``, else the hub cache)."""

    name: str
    model_dir: str | os.PathLike | None = None


class AvarcError(Exception):
    """A user-facing error. ``option`` names the parameter the message is about (``scales``, ``b``, ``colormap`` …),
    so a front end can name it in its own terms: the CLI prints ``error: --scales: <message>`` and exits with 2.

    ``fix`` is a remedy a front end words its own way, where the message holds ``{fix}``: the name of a parameter
    to set (``"force"``: here "set force=True", in the CLI "pass --force"), or a :class:`NeedsDownload` (here
    ``Classifier.from_pretrained(...)`` without ``local_files_only``, in the CLI ``avarc download …``)."""

    def __init__(self, message: str, option: str | None = None, fix: str | NeedsDownload | None = None):
        self.template, self.option, self.fix = message, option, fix
        super().__init__(message.replace(FIX, library_fix(fix)) if fix is not None else message)


def library_fix(fix: str | NeedsDownload) -> str:
    """A remedy in the library's terms."""
    if isinstance(fix, str):
        return f"set {fix}=True"
    where = "" if fix.model_dir is None else f", model_dir={os.fspath(fix.model_dir)!r}"
    return f"download it with Classifier.from_pretrained({fix.name!r}{where}) (without local_files_only)"


def schema_problem(error, tags: tuple[str, ...] = ()) -> tuple[list[str | int], str]:  # noqa: ANN001 (pydantic's)
    """A schema library's validation error as its first problem: the place (``["stages", 0, "scores", 1]``; ``tags``:
    a discriminated union's branch names and the union's type names are left out) and what is wrong, in one line
    (naming the value found)."""
    first = error.errors(include_url=False)[0]
    kind = first["type"]
    loc = [x for x in first["loc"] if not (isinstance(x, str) and (x in tags or x in _TYPE_TAGS or "[" in x))]
    if kind == "missing":
        return loc, "missing"
    if kind == "extra_forbidden":
        return loc, "unknown field"
    msg = str(first["msg"]).replace("\n", " ").removeprefix("Value error, ")
    msg = msg[:1].lower() + msg[1:]
    if kind != "value_error" and not isinstance(first.get("input"), (dict, list)):
        msg += f", got {first.get('input')!r}"
    return loc, msg


_TYPE_TAGS = {"int", "str", "float", "bool", "list", "dict", "none", "constrained-str"}
def did_you_mean(given: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the known name closest to a mistyped one (difflib), else nothing."""
    close = get_close_matches(given.lower(), list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
