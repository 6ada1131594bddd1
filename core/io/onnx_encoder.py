"""The VQ-VAE encoder (+ quant_conv) exported to ONNX and run by onnxruntime instead of torch.

An export is ``<vae file>.onnx`` beside the VQ-VAE it came from, with a JSON record (``.onnx.json``) holding the
SHA-256 of the encoder weights it was made from; when those weights change (a retrained ``vae.pth``) the export is
stale and is made again. Where the VQ-VAE's folder is not writable, or is inside the installed package (the bundled
demo: files written there would outlive ``pip uninstall``), exports live in ``$XDG_CACHE_HOME/avarc/onnx/`` named by
that SHA-256. Only the encoder runs in onnxruntime: quantisation and the VAR stay in torch, so tokens can differ from
torch's only where a latent sits within float rounding of a codebook tie.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import sys
import uuid
import warnings
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

from ..choices import ENCODERS
from ..engine.model import Model
from ..errors import AvarcError
from ..models import checkpoints
from ..models.specs import infer_vae_spec
from ..models.vqvae import VQVAE
from .files import atomic_write

FORMAT = "avarc-onnx-encoder/1"
OPSET = 18
INSTALL_HINT = "pip install 'avarc[onnx]'"
BACKENDS = ENCODERS
PACKAGE_DIR = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    weights_sha256: str
    exported: bool  # True: written now (there was none, or it was stale); False: an up-to-date export was reused


def use_encoder(model: Model, backend: str, vae_file: str | os.PathLike | None = None) -> OnnxExport | None:
    """Make ``model.encode`` run in torch (the default) or in onnxruntime, exporting the encoder first if needed.

    ``vae_file`` is the VQ-VAE file the model was loaded from; the export is kept beside it.
    """
    check_backend(backend)
    if backend == "torch":
        model.set_encoder(None)
        return None
    export = ensure_export(model.vae, vae_file)
    model.set_encoder(OnnxEncoder(export.path, model.device))
    return export


def check_backend(backend: str) -> None:
    """An unknown backend, or ``onnx`` without onnxruntime installed, is an error (raised before any model loads)."""
    if backend not in BACKENDS:
        raise AvarcError(f"unknown encoder {backend!r}; use {' or '.join(BACKENDS)}")
    if backend == "onnx":
        _require("onnxruntime")


def ensure_export(vae: VQVAE, vae_file: str | os.PathLike | None = None) -> OnnxExport:
    """The ONNX export of this VQ-VAE's encoder: reused if its record names these weights, else (re-)exported."""
    sha = weights_sha256(vae)
    path = export_path(vae_file, sha)
    if _record(path).get("weights_sha256") == sha and path.is_file():
        return OnnxExport(path, sha, exported=False)
    _export(vae, path)
    record = {"format": FORMAT, "weights_sha256": sha, "source": None if vae_file is None else str(vae_file),
              "opset": OPSET, "torch": torch.__version__, "input": "image B,3,H,W in [-1, 1]",
              "output": "latent B,z,H/f,W/f (encoder + quant_conv)"}
    with atomic_write(_record_path(path), "w") as f:
        f.write(json.dumps(record, indent=2) + "\n")
    return OnnxExport(path, sha, exported=True)


def export_file(vae_file: str | os.PathLike) -> OnnxExport:
    """``ensure_export`` for a VQ-VAE checkpoint file (what ``avarc download --onnx`` does)."""
    sd = checkpoints.read_state_dict(vae_file, "vae")
    try:
        spec = infer_vae_spec(sd)
    except AvarcError as e:
        raise AvarcError(f"{vae_file}: {e}") from None
    with checkpoints.unfilled():
        vae = VQVAE(spec, (1,))
    checkpoints.load_into(vae, sd, vae_file, "VQ-VAE")
    return ensure_export(vae.eval(), vae_file)


def weights_sha256(vae: VQVAE) -> str:
    """SHA-256 over the names, shapes and fp32 values of the encoder and quant_conv weights (what the export holds)."""
    h = hashlib.sha256()
    for prefix, module in (("encoder.", vae.encoder), ("quant_conv.", vae.quant_conv)):
        for name, t in module.state_dict().items():
            h.update(f"{prefix}{name}:{tuple(t.shape)};".encode())
            # numpy's stubs give ndarray the buffer protocol (__buffer__) only from Python 3.12
            h.update(np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy()))  # type: ignore[arg-type]
    return h.hexdigest()


def export_path(vae_file: str | os.PathLike | None, weights_sha: str) -> Path:
    """Beside the VQ-VAE file when that folder is writable and not part of the installed package, else the cache."""
    if vae_file is not None:
        vae_file = Path(vae_file)
        folder = vae_file.parent.resolve()
        if os.access(folder, os.W_OK) and not folder.is_relative_to(PACKAGE_DIR):
            return vae_file.with_name(vae_file.stem + ".onnx")
    return cache_dir() / f"{weights_sha[:16]}.onnx"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "avarc" / "onnx"


class OnnxEncoder:
    """``images → latent`` in onnxruntime, on CUDA when the model is on a GPU and the CUDA provider is installed."""

    def __init__(self, path: Path, device: torch.device, chunk: int = 16):
        ort = _require("onnxruntime")
        providers: list = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            # use_tf32 0: TF32 convolutions would move latents and flip tokens (see quantizer.exact_fp32)
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0, "use_tf32": 0}))
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise AvarcError(f"{path}: onnxruntime cannot load this export ({str(e).strip()[:160]}); delete it "
                             "and it will be exported again") from None
        self.path, self.chunk = path, chunk
        if device.type == "cuda" and self.providers[0] != "CUDAExecutionProvider":
            logging.getLogger("avarc").warning(
                f"the ONNX encoder runs on onnxruntime's {self.providers[0]} (its CUDA provider is not available: "
                "pip install onnxruntime-gpu), so every batch goes GPU → CPU → GPU; --encoder torch stays on the GPU")

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """B, 3, R, R in [-1, 1] → B, z, R/f, R/f fp32 latent on the images' device."""
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        out = [self.session.run(None, {"image": x[i:i + self.chunk]})[0] for i in range(0, len(x), self.chunk)]
        return torch.from_numpy(np.concatenate(out)).to(images.device)


class _Encode(nn.Module):
    """The graph that is exported: ``VQVAE.encode`` = quant_conv(encoder(image)), on a CPU copy of the weights with
    every GroupNorm replaced by :class:`_GroupNorm`."""

    def __init__(self, vae: VQVAE):
        super().__init__()
        self.encoder, self.quant_conv = copy.deepcopy(vae.encoder).cpu(), copy.deepcopy(vae.quant_conv).cpu()
        for name, module in list(self.named_modules()):
            if isinstance(module, nn.GroupNorm):
                parent, _, attr = name.rpartition(".")
                setattr(self.get_submodule(parent), attr, _GroupNorm(module))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(image))


class _GroupNorm(nn.Module):
    """GroupNorm whose statistics are reduced over W first, then over the rest of the group.

    onnxruntime sums a reduction axis in one float32 pass; over a group of 256×256 activations that costs up to ~1e-3
    in the latent. Two short reductions keep the export as accurate as torch (same values, same parameters).
    """

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.groups, self.eps, self.weight, self.bias = norm.num_groups, norm.eps, norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        g = x.reshape(B, self.groups, -1, W)                                   # B, G, C/G·H, W
        d = g - g.mean(-1, keepdim=True).mean(-2, keepdim=True)
        var = (d * d).mean(-1, keepdim=True).mean(-2, keepdim=True)
        y = (d * torch.rsqrt(var + self.eps)).reshape(B, C, H, W)
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def _export(vae: VQVAE, path: Path) -> None:
    """Export with batch, height and width dynamic (one file serves 256- and 512-px models), written atomically."""
    _require("onnx")
    _require("onnxscript")
    graph = _Encode(vae)
    side = 16 * vae.spec.downsample
    sample = torch.zeros(2, 3, side, side)
    dynamic = {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx_log.setLevel(logging.ERROR)  # the exporter logs about optional torchvision ops
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph.eval(), (sample,), str(tmp), input_names=["image"], output_names=["latent"],
                              dynamic_shapes=(dynamic,), opset_version=OPSET, dynamo=True, external_data=False,
                              verbose=False)
        os.replace(tmp, path)
    except OSError as e:       # no permission, a file where a folder should be, a read-only or full disk
        raise AvarcError(f"{path.parent}: cannot write the ONNX export there ({e.strerror}); set XDG_CACHE_HOME to a "
                         "writable folder, or use --encoder torch") from None
    finally:
        onnx_log.setLevel(level)
        with suppress(OSError):          # nothing to remove where the folder could not be made
            tmp.unlink(missing_ok=True)


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _record(path: Path) -> dict:
    try:
        record = json.loads(_record_path(path).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and record.get("format") == FORMAT else {}


def _require(module: str):
    import importlib

    try:
        if module == "onnxruntime" and module not in sys.modules:
            with _quiet_stderr():         # its import logs (in colour) when it cannot save a telemetry id
                return importlib.import_module(module)
        return importlib.import_module(module)
    except ImportError:
        raise AvarcError(f"the ONNX encoder needs {module}, which is not installed; {INSTALL_HINT}") from None


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the block (native code writes there, past Python's sys.stderr)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
