"""The one table of known models: name → where its files are, the architecture they build, how images are
prepared for it, the profile it is classified with and its class names. A table only: building a model from it
is ``core.io.loading``'s.

``download``, ``--list``, ``--model NAME`` in every command, ``bench`` and :class:`core.Classifier` all read it.
Hub files are found in the HF cache or in a directory filled by ``avarc download --dir``; bundled models are
files of this package and never go through the hub code.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import FIX, AvarcError, NeedsDownload, did_you_mean
from ..models.specs import ModelSpec, official_spec, spec_from_dict
from .data import imagenet_classes
from .hub import Download, HubFile, download, find_local

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "weights"
VAR_REPO = "FoundationVision/var"
CCA_REPO = "ChenDRAG/CCA_VAR"


@dataclass(frozen=True)
class ModelEntry:
    """Everything known about one model. ``hub`` is None for a model bundled in the package (a model directory
    under ``BUNDLED_DIR``); ``spec`` is None for the VQ-VAE alone."""

    name: str
    description: str
    hub: HubFile | None = None
    spec: ModelSpec | None = None
    vae: str | None = None                  # registry name of the paired VQ-VAE
    default_profile: str | None = None
    size_bytes: int | None = None           # approximate download size

    @property
    def bundled(self) -> bool:
        return self.hub is None

    @property
    def is_vae(self) -> bool:
        return self.spec is None

    @property
    def preprocess(self) -> str | None:
        return None if self.spec is None else self.spec.preprocess

    @property
    def class_names(self) -> tuple[str, ...]:
        """Its classes in index order (ImageNet-1k names for the official models)."""
        if self.spec is None:
            return ()
        if self.spec.class_names:
            return self.spec.class_names
        return tuple(name for _, name in imagenet_classes())


def _bundled(name: str, description: str) -> ModelEntry:
    meta = json.loads((BUNDLED_DIR / name / "meta.json").read_text())
    return ModelEntry(name, description, spec=spec_from_dict(meta["spec"]), default_profile=meta.get("default_profile"))


_VAR_SIZES = {16: 1_241_000_000, 20: 2_404_000_000, 24: 4_134_000_000, 30: 8_040_000_000, 36: 9_416_000_000}

REGISTRY: dict[str, ModelEntry] = {
    "vae": ModelEntry("vae", "official multi-scale VQ-VAE (ch160, 4096 codes, z32) shared by every official VAR",
                      HubFile("vae", VAR_REPO, "vae_ch160v4096z32.pth"), size_bytes=437_000_000),
    **{f"d{d}": ModelEntry(f"d{d}", f"official VAR-d{d} ({'512' if d == 36 else '256'} px ImageNet, class-conditional)",
                           HubFile(f"d{d}", VAR_REPO, f"var_d{d}.pth"), official_spec(f"d{d}"), "vae", "a-varc-plus",
                           _VAR_SIZES[d]) for d in _VAR_SIZES},
    **{f"d{d}-cca": ModelEntry(f"d{d}-cca", f"VAR-d{d} fine-tuned with CCA (guidance-free), used by A-VARC+",
                               HubFile(f"d{d}-cca", CCA_REPO, f"CCA_VAR_Guidance_Free/VAR_d{d}_CCA.pth"),
                               official_spec(f"d{d}"), "vae", "a-varc-plus", _VAR_SIZES[d])
       for d in (16, 20, 24, 30)},
    "digits": _bundled("digits", "bundled demo: tiny VAR trained on scikit-learn's 8x8 handwritten digits "
                       "(10 classes)"),
}


def entry(name: str) -> ModelEntry:
    try:
        return REGISTRY[name.lower()]
    except KeyError:
        raise AvarcError(f"unknown model {name!r}{did_you_mean(name, REGISTRY)}; known models: {', '.join(REGISTRY)} "
                         "(or pass a checkpoint path)") from None


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
    if e.hub is None:   # bundled (tested on the field, so the type checker knows hub is set below)
        path = BUNDLED_DIR / e.name
        if not (path / "meta.json").is_file():
            raise AvarcError(f"bundled model {e.name!r} is missing from this installation ({path}); reinstall avarc")
        return path
    found = find_local(e.hub, model_dir)
    if found is None:
        where = "the Hugging Face cache" if model_dir is None else str(model_dir)
        raise AvarcError(f"model {e.name!r} is not in {where}; {FIX}", fix=NeedsDownload(e.name, model_dir))
    return found


def fetch(e: ModelEntry, model_dir: str | os.PathLike | None = None, revision: str | None = None,
          force: bool = False) -> Download:
    """Make a registry model available here: a bundled one already is; a hub file is downloaded and verified."""
    if e.hub is None:   # bundled
        path = local_path(e)
        return Download(e.name, path, disk_size(path), "bundled")
    return download(e.hub, model_dir, revision, force)


def disk_size(path: Path) -> int:
    """Bytes of a file, or of the files directly in a folder (a model directory)."""
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else path.stat().st_size


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


def is_registry_name(model: str | os.PathLike) -> bool:
    """A registry name that is not also a path here (a file or folder named ``d16`` wins)."""
    return str(model).lower() in REGISTRY and not Path(model).exists()


