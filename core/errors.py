"""The one error type users see: a one-line message that names the file and the fix."""


class AvarcError(Exception):
    """A user-facing error. The CLI prints ``str(err)`` on one line and exits with code 2."""
