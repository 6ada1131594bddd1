"""The Typer application; every ``AvarcError`` becomes one line on stderr and exit code 2."""
from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from core import AvarcError, __version__

from . import output

app = typer.Typer(
    name="avarc",
    help="Classify, explain and extend image classes with Visual AutoRegressive (VAR) models as generative classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"avarc {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    """avarc: VAR image models as efficient, explainable generative classifiers (A-VARC / A-VARC+)."""


from avarc_cli.commands import download  # noqa: E402  (commands are registered once the app exists)

app.command("download", short_help="Download official weights from the Hugging Face hub (cache, offline, verified).")(download.download)

from avarc_cli.commands import classify  # noqa: E402

app.command("classify", short_help="Classify images and labelled folders with a staged A-VARC schedule (JSONL, accuracy table).")(classify.classify)

from avarc_cli.commands import explain  # noqa: E402

app.command("explain", short_help="Explain predictions: token-wise log-likelihood-ratio heatmaps (PNG panels) and raw maps (NPZ).")(explain.explain)

from avarc_cli.commands import bench  # noqa: E402

app.command("bench", short_help="Measure speed, GFLOPs, achieved TFLOP/s vs the device peak, memory and dtype agreement.")(bench.bench)

from avarc_cli.commands import add_class  # noqa: E402

app.command("add-class", short_help="Learn new classes from their own images (no replay, old classes unchanged); writes an extension file.")(add_class.add_class)

from avarc_cli.commands import tune  # noqa: E402

app.command("tune", short_help="Find the best schedule for a model and a compute budget from one scoring pass; writes a profile.")(tune.tune)

from avarc_cli.commands import calibrate_ood  # noqa: E402

app.command("calibrate-ood", short_help="Fit abstention (\"none of these\") thresholds on in-distribution images; writes a profile.")(calibrate_ood.calibrate_ood)

from avarc_cli.commands import report  # noqa: E402

app.command("report", short_help="One self-contained HTML page (plots embedded) for a labelled classify run.")(report.report)


UsageError = typer.BadParameter.__mro__[1]   # click's UsageError, whether typer vendors click or not


def main() -> None:
    """Run the app; a user error (ours or a usage error typer found) is one line on stderr and exit code 2. Anything
    else that escapes a command (a bug, a library failing on this host) is one line too, naming the log file that
    holds the full trace, and exit code 1: a command never ends in a traceback."""
    try:
        code = app(standalone_mode=False)
    except AvarcError as e:
        typer.secho(f"error: {output.message(e)}", err=True, fg="red")
        sys.exit(2)
    except UsageError as e:
        typer.secho(f"error: {e.format_message()}", err=True, fg="red")
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 (the last resort: every other path has said its own line)
        log = output.crash_log(e)
        where = f"full trace in {log}" if log else "the trace could not be written"
        first = (str(e).strip().splitlines() or [""])[0][:200]
        typer.secho(f"error: unexpected {type(e).__name__}: {first} ({where}; please report it)", err=True, fg="red")
        sys.exit(1)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
