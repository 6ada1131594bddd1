"""`avarc download`: official weights from the Hugging Face hub into its cache (or a plain directory)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..options import opt

DEFAULT_NAMES = ["vae", "d16"]


def download(
    names: Annotated[Optional[list[str]], typer.Argument(metavar="NAMES...", show_default=False, help=(
        f"Registry names (default: {' '.join(DEFAULT_NAMES)}; --list shows them); a VAR brings its VQ-VAE."))] = None,
    dir_: Annotated[Optional[Path], opt("--dir", metavar="DIR", help="Plain files here (for --model-dir), not the "
                                        "HF cache.")] = None,
    revision: Annotated[Optional[str], opt("--revision", metavar="REV", help="Branch, tag or commit (default: "
                                           "main).")] = None,
    onnx: Annotated[bool, opt("--onnx", help="Also export each VQ-VAE encoder to ONNX (--encoder onnx).")] = False,
    force: Annotated[bool, opt("--force", help="Download again even if the files are here.")] = False,
    list_: Annotated[bool, opt("--list", help="List the known models, sizes and what is here.")] = False,
) -> None:
    """\b
    avarc download                      # official VQ-VAE and VAR-d16 → HF cache
    avarc download d30-cca              # CCA fine-tune (and its VQ-VAE), A-VARC+
    avarc download vae d16 --dir ./w --onnx   # plain files + the ONNX encoder
    avarc download --list               # what exists, how big, what is here
    HF_HUB_OFFLINE=1 avarc download     # look in the cache only: no network

    huggingface_hub's HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE apply. A cut transfer
    resumes; every fetched file is checked against the hub's SHA-256. An unreachable hub fails at once.
    """
    from rich.filesize import decimal

    from avarc.errors import AvarcError
    from avarc.io.hub import Download, HubUnreachable
    from avarc.io.registry import fetch, with_vaes

    from .. import output

    if list_:
        _list(dir_)
        return
    results: list[Download] = []
    failures: list[str] = []
    for e in with_vaes(names or DEFAULT_NAMES):
        try:
            results.append(fetch(e, dir_, revision, force))
        except HubUnreachable:
            raise                      # one line: every other file would fail the same way
        except AvarcError as err:
            failures.append(output.message(err))
            output.say(f"failed {output.message(err)}", err=True)
    if results:
        output.table("Models", ["model", "status", "size", "checked sha256", "path"],
                     [(r.name, r.status, decimal(r.size), r.sha256[:12] + "…" if r.sha256 else None, r.path)
                      for r in results])
    if onnx:
        _export_encoders(results, failures)
    if failures:
        raise AvarcError(failures[0] if len(failures) == 1 else f"{len(failures)} steps failed; first: {failures[0]}")


def _export_encoders(results: list, failures: list[str]) -> None:
    from avarc.errors import AvarcError
    from avarc.io.onnx_encoder import export_file
    from avarc.io.registry import REGISTRY

    from .. import output

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
    from rich.filesize import decimal

    from avarc.io.registry import availability

    from .. import output

    rows = [(a.entry.name, a.size_bytes and decimal(a.size_bytes), a.entry.description,
             a.path or ("missing" if a.entry.bundled else "not downloaded")) for a in availability(model_dir)]
    where = "the HF cache" if model_dir is None else str(model_dir)
    output.table(f"Known models (looked up in {where})", ["name", "size", "for", "local"], rows)
