"""The Typer application; every ``AvarcError`` becomes one line on stderr and exit code 2.

The command modules import nothing heavy at the top (torch loads inside a command, after typer has parsed the
arguments), so ``--help`` and ``--version`` answer at once."""
from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer

from avarc import __version__
from avarc.errors import AvarcError

from . import output
from .commands import add_class, bench, calibrate_ood, classify, download, explain, generate, report, tune
from .help import Command, Group

app = typer.Typer(name="avarc", help="VAR image models as efficient, explainable generative classifiers (A-VARC).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  cls=Group)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"avarc {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                         help="Print the version and exit.")] = None) -> None:
    """avarc: VAR image models as efficient, explainable generative classifiers (A-VARC / A-VARC+)."""


COMMANDS: list[tuple[str, Callable[..., Any], str]] = [
    ("download", download.download, "Download official weights (checked)."),
    ("classify", classify.classify, "Classify images and labelled folders."),
    ("explain", explain.explain, "Why: per-token log-likelihood-ratio heatmaps."),
    ("generate", generate.generate, "Draw class samples, as upstream VAR samples."),
    ("bench", bench.bench, "Speed, GFLOPs, memory, dtype agreement."),
    ("add-class", add_class.add_class, "Learn new classes from their own images."),
    ("tune", tune.tune, "The best schedule for a compute budget."),
    ("calibrate-ood", calibrate_ood.calibrate_ood, "Fit \"none of these\" thresholds; writes a profile."),
    ("report", report.report, "An HTML page for a labelled classify run."),
]
for name, fn, short in COMMANDS:
    app.command(name, short_help=short, cls=Command)(fn)

if TYPE_CHECKING:
    from typer._click.exceptions import UsageError  # typer vendors click (the installed typer is checked)
else:
    UsageError = typer.BadParameter.__mro__[1]   # click's UsageError, whether typer vendors click or not


def _torch_kept() -> AbstractContextManager[None]:
    """A command run in a process that already uses torch (a test, a notebook) leaves torch's settings as it found
    them; a fresh process has none to keep (torch is imported by the command)."""
    if "torch" not in sys.modules:
        return nullcontext()
    from avarc.engine.torch_state import torch_settings

    return torch_settings()


def main() -> None:
    """Run the app; a user error (ours or a usage error typer found) is one line on stderr and exit code 2. Anything
    else that escapes a command (a bug, a library failing on this host) is one line too, naming the log file that
    holds the full trace, and exit code 1: a command never ends in a traceback."""
    code = 1
    try:
        with _torch_kept():
            code = app(standalone_mode=False)
    except AvarcError as e:
        typer.secho(f"error: {output.one_line(output.message(e))}", err=True, fg="red")
        sys.exit(2)
    except UsageError as e:
        typer.secho(f"error: {output.one_line(e.format_message())}", err=True, fg="red")
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 (the last resort: every other path has said its own line)
        log = output.crash_log(e)
        where = f"full trace in {log}" if log else "the trace could not be written"
        first = (str(e).strip().splitlines() or [""])[0][:200]
        typer.secho(f"error: unexpected {type(e).__name__}: {first} ({where}; please report it)", err=True, fg="red")
        sys.exit(1)
    finally:
        output.finish(not code)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
