"""``--help`` that reads at 80 columns: usage, the examples, one paragraph, then one option per entry with its help
wrapped beside it (never inside a word, never at a hyphen) and no type column."""
from __future__ import annotations

import shutil
import textwrap
import typing
from typing import Any

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


def _option(param: Any, ctx: Any) -> tuple[str, str]:
    names = ", ".join(sorted(param.opts, key=len))
    if param.secondary_opts:
        names += ", " + ", ".join(param.secondary_opts)
    if not param.is_flag:
        choices = _choices(param)
        if choices:
            names += " " + "|".join(choices)
        else:
            names += " " + (param.metavar or param.name.upper())
    text = getattr(param, "help", None) or ""
    default = param.default if param.show_default else None
    if default not in (None, False, ()) and not callable(default):
        text += f" [default: {default}]"
    return names, text


def _choices(param: Any) -> list[str]:
    """The values of a ``Literal`` option (typer keeps the annotation; older typer a click ``Choice`` type)."""
    kind = getattr(param, "type_descriptor", None)
    if kind is not None and typing.get_origin(kind.annotation) is typing.Literal:
        return [str(v) for v in typing.get_args(kind.annotation)]
    return [str(v) for v in getattr(getattr(param, "type", None), "choices", ())]


def _is_option(param: Any) -> typing.TypeGuard[click.Option]:
    return param.param_type_name == "option"


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


def _width(ctx: Any) -> int:
    return min(ctx.terminal_width or shutil.get_terminal_size().columns, ctx.max_content_width or 100)


class Command(typer.core.TyperCommand):
    def format_help(self, ctx: Any, formatter: Any) -> None:
        width = _width(ctx)
        args = " ".join(p.metavar or p.name.upper() for p in self.params if p.param_type_name == "argument")
        lines = _wrap(f"Usage: {ctx.command_path} [OPTIONS]{' ' + args if args else ''}", width, "", "  ") + [""]
        lines += _docstring(self.help or "", width)
        arguments = [(p.metavar or p.name.upper(), p.help) for p in self.params
                     if isinstance(p, typer.core.TyperArgument) and p.help]
        lines += ["Arguments:", *_entries(arguments, width), ""] if arguments else []
        lines.append("Options:")
        rows = [_option(p, ctx) for p in self.get_params(ctx) if _is_option(p) and not p.hidden]
        lines += _entries(rows, width)
        formatter.write("\n".join(lines) + "\n")


class Group(typer.core.TyperGroup):
    def format_help(self, ctx: Any, formatter: Any) -> None:
        width = _width(ctx)
        lines = [f"Usage: {ctx.command_path} COMMAND [ARGS]...", ""]
        lines += _wrap(self.help or "", width, "  ", "  ")
        lines += ["", f"Commands ({ctx.command_path} COMMAND --help for one):"]
        rows = [(n, self.commands[n].short_help or "") for n in self.list_commands(ctx)]
        lines += _entries([(n, t) for n, t in rows], width)
        lines += ["", "Options:"]
        lines += _entries([_option(p, ctx) for p in self.get_params(ctx) if _is_option(p)], width)
        formatter.write("\n".join(lines) + "\n")
