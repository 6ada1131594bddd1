"""The options shared by commands, defined once. :class:`ModelOptions` holds every option that decides how the
model is built; :func:`model_options` adds its fields to a command's signature and hands the command one
``ModelOptions`` whose :meth:`~ModelOptions.load` is the one ``Classifier.from_pretrained`` call. Adding a model
option is one edit: a field here.

Nothing here imports torch: typer parses the arguments (and answers ``--help``) before any model code loads.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import typer

from avarc.choices import COLORMAPS, DTYPES, ENCODERS, INITS, LABELS, METRICS_STARTS, OOD_SCORES

if typing.TYPE_CHECKING:
    from avarc.engine.profile import Profile

Dtype = Literal[DTYPES]  # type: ignore[valid-type]
Labels = Literal[LABELS]  # type: ignore[valid-type]
Encoder = Literal[ENCODERS]  # type: ignore[valid-type]
Init = Literal[INITS]  # type: ignore[valid-type]
Colormap = Literal[COLORMAPS]  # type: ignore[valid-type]
MetricsStart = Literal[METRICS_STARTS]  # type: ignore[valid-type]
OodScore = Literal[OOD_SCORES]  # type: ignore[valid-type]
DEMO_MODEL = "digits"          # what every command runs without --model
CONTEXT = "_ctx"               # the click context a shared option group reads (which options were given)
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _device(value: str) -> str:
    if not _DEVICE.fullmatch(value):
        raise typer.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    return value


def stage_range(value: str | tuple[int, int]) -> tuple[int, int]:
    """``--stages N`` or ``A..B`` → the stage counts (lo, hi) to search."""
    if isinstance(value, tuple):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*(?:\.\.\s*(\d+)\s*)?", value)
    if not m:
        raise typer.BadParameter(f"--stages {value!r}: give a count like 2 or a range like 1..3")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if not 1 <= lo <= hi:
        raise typer.BadParameter(f"--stages {value!r}: counts must be ≥ 1 and the range increasing")
    return lo, hi


def _patch_nums(value: Optional[str]) -> Optional[tuple[int, ...]]:
    if value is None:
        return None
    try:
        return tuple(int(p) for p in value.split(","))
    except ValueError:
        raise typer.BadParameter(f"{value!r}: give the scales as comma-separated integers, e.g. 1,2,3,4") from None


def _dtypes(values: Optional[list[str]]) -> Optional[list[str]]:
    bad = [v for v in values or [] if v not in DTYPES]
    if bad:
        raise typer.BadParameter(f"{bad[0]!r} is not a dtype; use {', '.join(DTYPES)}")
    return values


def opt(*names: str, help: str, **kw: Any) -> typer.models.OptionInfo:  # noqa: A002 (typer's own keyword)
    """A typer option with no default shown unless asked: the help text says what a missing value means."""
    return typer.Option(*names, help=help, show_default=kw.pop("show_default", False), **kw)


ModelOpt = Annotated[str, opt("--model", "-m", metavar="NAME", show_default=True,
                              help="Registry name, folder or VAR file (digits: the bundled demo).")]
ProfileOpt = Annotated[Optional[str], opt("--profile", "-p", metavar="NAME",
                                          help="Shipped schedule name or YAML file.")]
SeedOpt = Annotated[int, opt("--seed", help="Seed of the likelihood-smoothing noise.", show_default=True)]
ClassesOpt = Annotated[Optional[str], opt("--classes", metavar="A,B,…",
                                          help="Candidate classes only: indices, synsets or names.")]
LabelsOpt = Annotated[Labels, opt("--labels", show_default=True,
                                  help="Labels from class sub-folders (auto: if all are).")]
SubsetOpt = Annotated[Optional[str], opt("--subset", metavar="LIST",
                                         help="Synsets: imagenet100, imageneta100, … or a file.")]
InputsArg = Annotated[Optional[list[Path]], typer.Argument(metavar="INPUTS...", show_default=False,
                                                           help="Image files and/or folders (searched recursively).")]
DtypesOpt = Annotated[Optional[list[str]], opt("--dtype", metavar="|".join(DTYPES), callback=_dtypes,
                                               help="Dtype(s) to measure (repeatable).")]
ForceOpt = Annotated[bool, opt("--force", help="Overwrite output files that exist.")]
JsonOpt = Annotated[bool, opt("--json", help="Print one JSON document instead of tables.")]


@dataclasses.dataclass
class ModelOptions:
    """How the model is built; each field is one option of every command that loads a model."""

    vae: Annotated[Optional[str], opt("--vae", metavar="FILE", help="VQ-VAE file or name (default: the paired one).")]
    extension: Annotated[Optional[list[Path]], opt("--extension", "-e", metavar="FILE",
                                                   help="Class extension from `avarc add-class` (repeatable).")]
    device: Annotated[str, opt("--device", metavar="DEV", callback=_device, show_default=True,
                               help="auto, cpu, cuda, cuda:N or mps.")]
    dtype: Annotated[Dtype, opt("--dtype", show_default=True, help="Compute dtype (auto: bf16 where fast).")]
    batch_size: Annotated[Optional[int], opt("--batch-size", "-b", min=1, metavar="N",
                                             help="Pairs per forward (default: fits memory).")]
    threads: Annotated[Optional[int], opt("--threads", min=1, metavar="N",
                                          help="CPU threads (default: the usable cores).")]
    compile: Annotated[Optional[bool], opt("--compile/--no-compile",
                                           help="torch.compile the engine (default: on CUDA).")]
    cuda_graphs: Annotated[bool, opt("--cuda-graphs", help="Replay small forwards as CUDA graphs (CUDA only).")]
    encoder: Annotated[Encoder, opt("--encoder", show_default=True,
                                    help="Encoder backend (onnx: avarc[onnx]).")]
    model_dir: Annotated[Optional[Path], opt("--model-dir", metavar="DIR",
                                             help="Files from `avarc download --dir`, not the cache.")]
    patch_nums: Annotated[Optional[str], opt("--patch-nums", metavar="1,2,…", callback=_patch_nums,
                                             help="Scales of a bare VAR file, if not readable off it.")]
    trust_pickle: Annotated[bool, opt("--trust-pickle", help="Let checkpoints run code to unpickle (trusted only).")]

    DEFAULTS: typing.ClassVar[dict[str, Any]] = {"device": "auto", "dtype": "auto", "encoder": "torch",
                                                 "trust_pickle": False, "cuda_graphs": False}
    given: typing.ClassVar[frozenset[str]] = frozenset()    # the command's parameters given on its command line

    def load(self, model: str, profile: str | Profile | None = None,
             **override: Any):  # noqa: ANN201 (a avarc.Classifier)
        """The one ``Classifier.from_pretrained`` call of every command (``override``: a command's own choice)."""
        from avarc import Classifier

        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extension"}
        kw.update(override)
        if model == DEMO_MODEL and "model" not in self.given:
            from . import output

            output.at_the_end(f"model: the bundled demo model {DEMO_MODEL} (8×8 handwritten digits, 10 classes); "
                              "choose another with -m NAME (`avarc download --list` names them)")
        with _loading(model):
            return Classifier.from_pretrained(model, extensions=self.extension or (), profile=profile, **kw)


    def files(self, model: str | None, profile: str | None = None) -> list[Path]:
        """The files this model is read from (weights, VQ-VAE, extensions, profile; a model folder's files), which a
        command's outputs must never replace."""
        named = [Path(p) for p in (model, self.vae, profile, *(self.extension or ())) if p is not None]
        return [f for p in named for f in (sorted(p.iterdir()) if p.is_dir() else [p]) if f.exists()]


def _loading(model: str):  # noqa: ANN202
    from . import output

    return output.err_console.status(f"loading {model}…")


@dataclasses.dataclass
class InputOptions:
    """Where inputs come from besides image files and folders; each field is one option of every command that
    reads images (a list file, a dataset's split and columns, ObjectNet's border)."""

    from_list: Annotated[Optional[Path], opt("--from-list", metavar="FILE",
                                             help="Also read image paths from this file, one a line.")]
    split: Annotated[Optional[str], opt("--split", help="Split of a dataset input (default: its only split).")]
    image_column: Annotated[Optional[str], opt("--image-column", metavar="NAME",
                                               help="Dataset column of the images (default: Image).")]
    label_column: Annotated[Optional[str], opt("--label-column", metavar="NAME",
                                               help="Dataset column of labels (default: ClassLabel).")]
    border: Annotated[int, opt("--border", min=0, metavar="PX", show_default=True,
                               help="ObjectNet: pixels cropped off each side.")]
    per_class: Annotated[Optional[int], opt("--per-class", metavar="N", min=1,
                                            help="Only the first N images of each class (fixed order).")]

    DEFAULTS: typing.ClassVar[dict[str, Any]] = {"border": 2}

    def inputs(self, given: list[Path] | None) -> list:
        """The command's inputs with ``--from-list``'s paths after them, each checked to exist (before a model
        loads)."""
        from avarc.io.data import check_inputs, read_list

        inputs: list[str | Path] = [*(given or []), *(read_list(self.from_list) if self.from_list is not None else [])]
        check_inputs(inputs)
        return inputs

    def files(self) -> list[Path]:
        """The file these options read besides the images (``--from-list``'s), which outputs must never replace."""
        return [self.from_list] if self.from_list is not None else []

    def data(self):  # noqa: ANN201 (a avarc.io.data.DataOptions)
        from avarc.io.data import DataOptions

        return DataOptions(self.split, self.image_column, self.label_column, self.border, self.per_class)


class OptionGroup(typing.Protocol):
    """A dataclass of options several commands share, with its fields' defaults."""

    __dataclass_fields__: typing.ClassVar[dict[str, Any]]
    DEFAULTS: typing.ClassVar[dict[str, Any]]


def _shared(group: type[OptionGroup], name: str,
            skip: tuple[str, ...]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the fields of ``group`` (a dataclass of options, less ``skip``) as options, handed to the
    command as one ``name`` argument."""
    fields = [f for f in dataclasses.fields(group) if f.name not in skip]
    hints = typing.get_type_hints(group, include_extras=True)

    def wrap(command: Callable[..., Any]) -> Callable[..., Any]:
        own = inspect.signature(command, eval_str=True)
        params = [p for p in own.parameters.values() if p.name != name]
        params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                                     default=group.DEFAULTS.get(f.name)) for f in fields]
        inner = CONTEXT in own.parameters        # another group wrapped the command first and reads it too
        if not inner:
            params.append(inspect.Parameter(CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))

        @functools.wraps(command)
        def run(**kw: Any) -> Any:
            values = {f.name: group.DEFAULTS.get(f.name) for f in dataclasses.fields(group)}
            values.update({f.name: kw.pop(f.name) for f in fields})
            options = group(**values)
            ctx = kw.get(CONTEXT) if inner else kw.pop(CONTEXT, None)
            if ctx is not None:        # which parameters the user typed (a default is not a choice)
                # an attribute of every group (ModelOptions reads it), not one of its options: set, not declared
                setattr(options, "given",
                        frozenset(p for p in ctx.params if ctx.get_parameter_source(p).name != "DEFAULT"))
            return command(**{name: options}, **kw)

        del run.__wrapped__          # typer reads the signature below, not the command's own
        run.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return wrap


def model_options(*skip: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The :class:`ModelOptions` fields (less ``skip``) as options; the command gets one ``opts`` argument."""
    return _shared(ModelOptions, "opts", skip)


def input_options(*skip: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The :class:`InputOptions` fields (less ``skip``) as options; the command gets one ``source`` argument."""
    return _shared(InputOptions, "source", skip)
