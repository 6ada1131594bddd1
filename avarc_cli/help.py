"""``--help`` that reads at 80 columns: usage, the examples, one paragraph, then one option per entry with its help
wrapped beside it (never inside a word, never at a hyphen) and no type column."""
from __future__ import annotations

import shutil
import textwrap

import click
import typer.core

COLUMN = 26          # where option help starts; longer option names put their help on the next line


def _wrap(text: str, width: int, first: str, rest: str) -> list[str]:
    return textwrap.wrap(text, width, initial_indent=first, subsequent_indent=rest, break_long_words=False,
                         break_on_hyphens=False) or [first.rstrip()]


def _docstring(text: str, width: int) -> list[str]:
    """Paragraphs wrapped; a paragraph that starts with ``\\b`` (the examples) is kept line for line."""
    lines: list[str] = []
    for para in _paragraphs(text):
        if para.startswith("\b"):
            lines += ["  " + ln.strip() for ln in para[1:].strip("\n").splitlines()]
        else:
            lines += _wrap(" ".join(para.split()), width, "  ", "  ")
        lines.append("")
    return lines


def _paragraphs(text: str) -> list[str]:
    """A docstring's paragraphs (blank-line separated)."""
    return [p for p in textwrap.dedent(text).strip().split("\n\n") if p.strip()]


def _option(param: click.Parameter, ctx: click.Context) -> tuple[str, str]:
    names = ", ".join(sorted(param.opts, key=len))
    if isinstance(param, click.Option) and param.secondary_opts:
        names += ", " + ", ".join(param.secondary_opts)
    if isinstance(param, click.Option) and not param.is_flag:
        if isinstance(param.type, click.Choice):
            names += " " + "|".join(map(str, param.type.choices))
        else:
            names += " " + (param.metavar or param.name.upper())
    text = getattr(param, "help", None) or ""
    default = param.default if isinstance(param, click.Option) and param.show_default else None
    if default not in (None, False, ()) and not callable(default):
        text += f" [default: {default}]"
    return names, text


def _entries(rows: list[tuple[str, str]], width: int) -> list[str]:
    lines: list[str] = []
    for names, text in rows:
        head = f"  {names}"
        if len(head) < COLUMN - 1:
            lines += _wrap(text, width, head.ljust(COLUMN), " " * COLUMN)
        else:
            lines.append(head)
            lines += _wrap(text, width, " " * COLUMN, " " * COLUMN) if text else []
    return lines


def _width(ctx: click.Context) -> int:
    return min(ctx.terminal_width or shutil.get_terminal_size().columns, ctx.max_content_width or 100)


class Command(typer.core.TyperCommand):
    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        width = _width(ctx)
        args = " ".join(p.make_metavar(ctx) for p in self.params if isinstance(p, click.Argument))
        lines = [f"Usage: {ctx.command_path} {args + ' ' if args else ''}[OPTIONS]", ""]
        lines += _docstring(self.help or "", width)
        lines.append("Options:")
        rows = [_option(p, ctx) for p in self.get_params(ctx) if isinstance(p, click.Option) and not p.hidden]
        lines += _entries(rows, width)
        formatter.write("\n".join(lines) + "\n")


class Group(typer.core.TyperGroup):
    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        width = _width(ctx)
        lines = [f"Usage: {ctx.command_path} COMMAND [ARGS]... (avarc COMMAND --help for one command)", ""]
        lines += _wrap(self.help or "", width, "  ", "  ") + ["", "Commands:"]
        rows = [(n, self.commands[n].short_help or "") for n in self.list_commands(ctx)]
        lines += _entries([(n, t) for n, t in rows], width)
        lines += ["", "Options:"]
        lines += _entries([_option(p, ctx) for p in self.get_params(ctx) if isinstance(p, click.Option)], width)
        formatter.write("\n".join(lines) + "\n")
