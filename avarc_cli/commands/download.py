"""`avarc download`: official weights from the Hugging Face hub into its cache (or a plain directory)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.filesize import decimal

from core import AvarcError
from core.io.hub import Download
from core.io.onnx_encoder import export_file
from core.io.registry import REGISTRY, availability, fetch, with_vaes

from .. import output

DEFAULT_NAMES = ["vae", "d16"]


def download(
    names: Annotated[Optional[list[str]], typer.Argument(help=f"Registry names (default: {' '.join(DEFAULT_NAMES)}); a VAR brings its VQ-VAE. Known: {', '.join(REGISTRY)}.", show_default=False)] = None,
    dir_: Annotated[Optional[Path], typer.Option("--dir", help="Put plain files in this directory (use it later with --model-dir) instead of the HF cache.")] = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch, tag or commit of the hub repository (default: main).")] = None,
    onnx: Annotated[bool, typer.Option("--onnx", help="Also export each VQ-VAE's encoder to ONNX (for --encoder onnx; needs `pip install avarc\\[onnx]`).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Download again even if the files are already here.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the known models, their sizes and whether they are here; download nothing.")] = False,
) -> None:
    """\b
    avarc download                      # official VQ-VAE and VAR-d16 → HF cache
    avarc download d30-cca              # CCA fine-tune (and its VQ-VAE), A-VARC+
    avarc download vae d16 --dir ./w --onnx   # plain files + the ONNX encoder
    avarc download --list               # what exists, how big, what is here
    HF_HUB_OFFLINE=1 avarc download     # look in the cache only: no network

    Downloads official checkpoints with huggingface_hub: HF_HOME / HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE apply. A cut transfer is resumed; every fetched file is checked against the hub's SHA-256 and removed if it does not match. Files already here are not fetched again.
    """
    if list_:
        _list(dir_)
        return
    entries = with_vaes(names or DEFAULT_NAMES)
    results: list[Download] = []
    failures: list[str] = []
    for e in entries:
        try:
            results.append(fetch(e, dir_, revision, force))
        except AvarcError as err:
            failures.append(output.message(err))
            output.say(f"failed {output.message(err)}", err=True)
    if results:
        output.table("Models", ["model", "status", "size", "checked sha256", "path"],
                     [(r.name, r.status, decimal(r.size), r.sha256[:12] + "…" if r.sha256 else None, r.path) for r in results])
    if onnx:
        _export_encoders(results, failures)
    if failures:
        raise AvarcError(failures[0] if len(failures) == 1 else f"{len(failures)} steps failed; first: {failures[0]}")


def _export_encoders(results: list[Download], failures: list[str]) -> None:
    rows = []
    for r in results:
        if r.status != "bundled" and not REGISTRY[r.name].is_vae:
            continue
        vae_file = r.path / "vae.pth" if r.status == "bundled" else r.path
        with output.err_console.status(f"exporting the {r.name} encoder to ONNX…"):
            try:
                ex = export_file(vae_file)
            except AvarcError as err:
                failures.append(output.message(err))
                output.say(f"failed {output.message(err)}", err=True)
                continue
        rows.append((r.name, "exported" if ex.exported else "up to date", ex.weights_sha256[:12] + "…", ex.path))
    if rows:
        output.table("ONNX encoders", ["model", "status", "weights sha256", "path"], rows)


def _list(model_dir: Path | None) -> None:
    rows = []
    for a in availability(model_dir):
        e = a.entry
        rows.append((e.name, a.size_bytes and decimal(a.size_bytes), e.description, a.path or ("missing" if e.bundled else "not downloaded")))
    where = "the HF cache" if model_dir is None else str(model_dir)
    output.table(f"Known models (looked up in {where})", ["name", "size", "for", "local"], rows)

