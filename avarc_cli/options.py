"""Options shared by several commands, defined once (model, vae, device, dtype, profile, extension, seed, …).

Options with a fixed set of values are ``Literal`` types, so ``--help`` lists them and typer refuses anything else.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

Dtype = Literal["auto", "fp32", "bf16", "fp16"]
Labels = Literal["auto", "folders", "none"]
Encoder = Literal["torch", "onnx"]
DEVICE_KINDS = "auto, cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _device(value: str) -> str:
    if not _DEVICE.fullmatch(value):
        raise typer.BadParameter(f"{value!r} is not a device; use {DEVICE_KINDS}")
    return value


def _patch_nums(value: Optional[str]) -> Optional[tuple[int, ...]]:
    if value is None:
        return None
    try:
        return tuple(int(p) for p in value.split(","))
    except ValueError:
        raise typer.BadParameter(f"{value!r}: give the scales as comma-separated integers, e.g. 1,2,3,4") from None


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Registry name (digits, d16, d20-cca, …), a model directory, or a VAR checkpoint file.")]
VaeOpt = Annotated[Optional[str], typer.Option("--vae", help="VQ-VAE checkpoint file or registry name (default: the model's paired VQ-VAE, or vae.pth beside the VAR file).")]
PatchNumsOpt = Annotated[Optional[str], typer.Option("--patch-nums", metavar="P1,P2,…", callback=_patch_nums, help="Scales of a bare VAR file (e.g. 1,2,3,4) when they cannot be read off it unambiguously.")]
ModelDirOpt = Annotated[Optional[Path], typer.Option("--model-dir", help="Directory of plain checkpoint files (from `avarc download --dir`) instead of the hub cache.")]
DeviceOpt = Annotated[str, typer.Option("--device", metavar="[auto|cpu|cuda|cuda:N|mps]", callback=_device, help="Where to run (auto: cuda, then mps, else cpu).")]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="VAR compute dtype (auto: bf16 where the hardware runs it fast, else fp32); tokenisation is always fp32.")]
ProfileOpt = Annotated[Optional[str], typer.Option("--profile", "-p", help="Schedule: a shipped profile name or a YAML file (see `avarc classify --list-profiles`).")]
ExtensionOpt = Annotated[Optional[list[Path]], typer.Option("--extension", "-e", help="Class extension file from `avarc add-class` (repeatable).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for the likelihood-smoothing noise (drawn per image from seed and path).")]
BatchSizeOpt = Annotated[Optional[int], typer.Option("--batch-size", "-b", min=1, help="(sequence, class) pairs per forward; default: sized to a memory budget.")]
EncoderOpt = Annotated[Encoder, typer.Option("--encoder", help="VQ-VAE encoder backend (onnx needs `pip install avarc\\[onnx]`).")]
TrustPickleOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow checkpoints that need code execution to unpickle (only for files you trust).")]
LabelsOpt = Annotated[Labels, typer.Option("--labels", help="Where true labels come from: auto (class sub-folders if every folder name is a class), folders, or none.")]
ClassesOpt = Annotated[Optional[str], typer.Option("--classes", help="Restrict the candidate classes: comma-separated indices, synsets or class names.")]
SubsetOpt = Annotated[Optional[str], typer.Option("--subset", help="Restrict candidates (and labelled images) to a synset list: imagenet100, imageneta100, imagenetr100 or a file.")]
InputsArg = Annotated[Optional[list[Path]], typer.Argument(help="Image files and/or folders (searched recursively).", show_default=False)]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads (default: 1 for tiny models, else the cores not busy with other work; see README, Threads).")]
FromListOpt = Annotated[Optional[Path], typer.Option("--from-list", help="Also read image paths from this text file, one a line (relative paths: from the file's folder).", show_default=False)]
SplitOpt = Annotated[Optional[str], typer.Option("--split", help="Split of a Hugging Face dataset input (default: its only split).", show_default=False)]
ImageColumnOpt = Annotated[Optional[str], typer.Option("--image-column", help="Column of a dataset input that holds the images (default: its Image feature).", show_default=False)]
LabelColumnOpt = Annotated[Optional[str], typer.Option("--label-column", help="Column of a dataset input that holds the labels (default: its ClassLabel feature).", show_default=False)]
BorderOpt = Annotated[int, typer.Option("--border", min=0, help="--dataset objectnet: pixels cropped off each side first (the release's frame), as public ObjectNet evaluations do.")]
