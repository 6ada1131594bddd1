"""The one table of known models (name → where the weights live, what builds them, what they are for).

``download``, ``--list``, ``--model NAME`` in every command and ``bench`` all read it. A model argument is a
registry name, a model directory (``var.pth`` + ``vae.pth`` + ``meta.json``, like the bundled ``digits``), or a
VAR checkpoint file (its VQ-VAE from ``--vae``, a ``vae.pth`` beside it, or the downloaded official ``vae``).
Registry files are found in the HF cache, or in the ``--model-dir`` that ``avarc download --dir`` filled.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AvarcError
from .hub import disk_size, find_local
from .model import Model, load_model, load_model_dir
from .onnx_encoder import check_backend, use_encoder

BUNDLED_DIR = Path(__file__).parent / "weights"
VAR_REPO = "FoundationVision/var"
CCA_REPO = "ChenDRAG/CCA_VAR"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    repo_id: str | None = None     # hub repository (None: bundled in the package)
    filename: str | None = None    # path of the file inside the repository
    vae: str | None = None         # registry name of the paired VQ-VAE
    size_bytes: int | None = None  # approximate download size

    @property
    def bundled(self) -> bool:
        return self.repo_id is None

    @property
    def is_vae(self) -> bool:
        return self.vae is None and not self.bundled


_VAR_SIZES = {16: 1_241_000_000, 20: 2_404_000_000, 24: 4_134_000_000, 30: 8_040_000_000, 36: 9_416_000_000}

REGISTRY: dict[str, ModelEntry] = {
    "vae": ModelEntry("vae", "official multi-scale VQ-VAE (ch160, 4096 codes, z32) shared by every official VAR",
                      VAR_REPO, "vae_ch160v4096z32.pth", size_bytes=437_000_000),
    **{f"d{d}": ModelEntry(f"d{d}", f"official VAR-d{d} ({'512' if d == 36 else '256'} px ImageNet, class-conditional)",
                           VAR_REPO, f"var_d{d}.pth", vae="vae", size_bytes=_VAR_SIZES[d]) for d in _VAR_SIZES},
    **{f"d{d}-cca": ModelEntry(f"d{d}-cca", f"VAR-d{d} fine-tuned with CCA (guidance-free), used by A-VARC+",
                               CCA_REPO, f"CCA_VAR_Guidance_Free/VAR_d{d}_CCA.pth", vae="vae", size_bytes=_VAR_SIZES[d])
       for d in (16, 20, 24, 30)},
    "digits": ModelEntry("digits", "bundled demo: tiny VAR trained on scikit-learn's 8x8 handwritten digits (10 classes)"),
}


def entry(name: str) -> ModelEntry:
    try:
        return REGISTRY[name.lower()]
    except KeyError:
        raise AvarcError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)} (or pass a checkpoint path)") from None


def with_vaes(names: list[str]) -> list[ModelEntry]:
    """Registry entries for names, each VAR preceded by its paired VQ-VAE (once): what using them needs."""
    out: list[ModelEntry] = []
    for name in names:
        e = entry(name)
        for needed in (REGISTRY[e.vae], e) if e.vae else (e,):
            if needed not in out:
                out.append(needed)
    return out


def local_path(e: ModelEntry, model_dir: str | os.PathLike | None = None) -> Path:
    """Where a registry model is on this machine, or an error that says which download to run."""
    if e.bundled:
        path = BUNDLED_DIR / e.name
        if not (path / "meta.json").is_file():
            raise AvarcError(f"bundled model {e.name!r} is missing from this installation ({path}); reinstall avarc")
        return path
    found = find_local(e, model_dir)
    if found is None:
        where = "the Hugging Face cache" if model_dir is None else str(model_dir)
        dir_opt = "" if model_dir is None else f" --dir {model_dir}"
        raise AvarcError(f"model {e.name!r} is not in {where}; run `avarc download {e.name}{dir_opt}`")
    return found


@dataclass(frozen=True)
class Availability:
    entry: ModelEntry
    path: Path | None  # where it is on this machine; None: not downloaded

    @property
    def size_bytes(self) -> int | None:
        """The download size, or for a bundled model what its files take on disk."""
        if self.entry.bundled and self.path is not None:
            return disk_size(self.path)
        return self.entry.size_bytes


def availability(model_dir: str | os.PathLike | None = None) -> list[Availability]:
    """Every registry model and whether (and where) it is on this machine. No network."""
    out = []
    for e in REGISTRY.values():
        try:
            out.append(Availability(e, local_path(e, model_dir)))
        except AvarcError:
            out.append(Availability(e, None))
    return out


def resolve_model(model: str | os.PathLike, vae: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, model_dir: str | os.PathLike | None = None,
                  trust_pickle: bool = False, encoder: str = "torch") -> Model:
    """A model argument (registry name, model directory or VAR file) → loaded Model, its encoder run by ``encoder``
    (``torch`` or ``onnx``; an ONNX export is made beside the VQ-VAE file on first use)."""
    check_backend(encoder)
    path = Path(model)
    if str(model).lower() in REGISTRY and not path.exists():
        e = entry(str(model))
        if e.is_vae:
            raise AvarcError(f"{e.name!r} is a VQ-VAE; pass it as --vae and a VAR as --model")
        path = local_path(e, model_dir)
        vae = vae or e.vae
    elif not path.exists():
        raise AvarcError(f"{model}: no such model file or directory; known names: {', '.join(REGISTRY)}")
    if path.is_dir() and vae is not None:
        raise AvarcError(f"--vae {vae}: the model {model} is a directory with its own VQ-VAE (vae.pth); drop --vae, "
                         "or pass the VAR file (--model DIR/var.pth) to pair it with another VQ-VAE")
    if path.is_dir():
        loaded, vae_path = load_model_dir(path, device=device, dtype=dtype), path / "vae.pth"
    else:
        vae_path = _resolve_vae(vae, path, model_dir)
        loaded = load_model(path, vae_path, device=device, dtype=dtype, trust_pickle=trust_pickle)
    use_encoder(loaded, encoder, vae_path)
    return loaded


def _resolve_vae(vae: str | os.PathLike | None, var_path: Path, model_dir) -> Path:
    if vae is not None:
        if Path(vae).exists():
            return Path(vae)
        if str(vae).lower() in REGISTRY:
            return local_path(entry(str(vae)), model_dir)
        raise AvarcError(f"{vae}: no such VQ-VAE file")
    beside = var_path.with_name("vae.pth")
    if beside.is_file():
        return beside
    return local_path(REGISTRY["vae"], model_dir)
