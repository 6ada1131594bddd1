"""The one error type users see: a one-line message that names the file or value and the fix."""
from __future__ import annotations


class AvarcError(Exception):
    """A user-facing error. ``option`` names the parameter the message is about (``scales``, ``b``, ``colormap`` …),
    so a front end can name it in its own terms: the CLI prints ``error: --scales: <message>`` and exits with 2."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option
