"""Options shared by several commands, defined once (model, vae, device, dtype, profile, extension, seed, …)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Registry name (digits, d16, d20-cca, …), a model directory, or a VAR checkpoint file.")]
VaeOpt = Annotated[Optional[str], typer.Option("--vae", help="VQ-VAE checkpoint file or registry name (default: the model's paired VQ-VAE, or vae.pth beside the VAR file).")]
ModelDirOpt = Annotated[Optional[Path], typer.Option("--model-dir", help="Directory of plain checkpoint files (from `avarc download --dir`) instead of the hub cache.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="VAR compute dtype: auto, fp32, bf16 or fp16 (tokenisation is always fp32).")]
ProfileOpt = Annotated[Optional[str], typer.Option("--profile", "-p", help="Schedule: a shipped profile name or a YAML file (see `avarc classify --list-profiles`).")]
ExtensionOpt = Annotated[Optional[list[Path]], typer.Option("--extension", "-e", help="Class extension file from `avarc add-class` (repeatable).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for the likelihood-smoothing noise (drawn per image from seed and path).")]
BatchSizeOpt = Annotated[Optional[int], typer.Option("--batch-size", "-b", min=1, help="(sequence, class) pairs per forward; default: sized to a memory budget.")]
EncoderOpt = Annotated[str, typer.Option("--encoder", help="VQ-VAE encoder backend: torch or onnx (needs `pip install avarc\\[onnx]`).")]
TrustPickleOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow checkpoints that need code execution to unpickle (only for files you trust).")]
ClassesOpt = Annotated[Optional[str], typer.Option("--classes", help="Restrict the candidate classes: comma-separated indices, synsets or class names.")]
SubsetOpt = Annotated[Optional[str], typer.Option("--subset", help="Restrict candidates (and labelled images) to a synset list: imagenet100, imageneta100, imagenetr100 or a file.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads (default: 1 for tiny models, else the cores not busy with other work; see README, Threads).")]
