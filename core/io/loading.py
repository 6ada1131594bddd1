"""The one way models are built from files: a registry name, a model directory or a VAR checkpoint (with its VQ-VAE)
→ a ready :class:`~core.engine.model.Model` on its device, its encoder backend chosen.

A model argument is a registry name, a model directory (``var.pth`` + ``vae.pth`` + ``meta.json``, like the
bundled ``digits``), or a VAR checkpoint file (its VQ-VAE from ``vae``, a ``vae.pth`` beside it, or the downloaded
official ``vae``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..engine.model import Model, build_model
from ..engine.runtime import resolve_device
from ..errors import AvarcError, did_you_mean
from ..models import checkpoints
from ..models.specs import ModelSpec, infer_vae_spec, infer_var_spec, spec_from_dict, spec_to_dict
from .onnx_encoder import check_backend, use_encoder
from .registry import REGISTRY, entry, is_registry_name, local_path


def load_model(var: str | os.PathLike, vae: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, image_size: int | None = None, preprocess: str = "official",
               class_names: tuple[str, ...] = (), patch_nums: tuple[int, ...] | None = None,
               trust_pickle: bool = False) -> Model:
    """Load checkpoint files; the architecture is read off the state dicts."""
    var_sd = checkpoints.read_state_dict(var, "var", trust_pickle)
    vae_sd = checkpoints.read_state_dict(vae, "vae", trust_pickle)
    try:
        var_spec = infer_var_spec(var_sd, patch_nums)
    except AvarcError as e:
        raise AvarcError(f"{var}: {e}") from None
    try:
        vae_spec = infer_vae_spec(vae_sd)
    except AvarcError as e:
        raise AvarcError(f"{vae}: {e}") from None
    if vae_spec.vocab_size != var_spec.vocab_size or vae_spec.z_channels != var_spec.z_channels:
        raise AvarcError(f"{vae}: VQ-VAE codebook {vae_spec.vocab_size}x{vae_spec.z_channels} does not match the VAR "
                         f"in {var} ({var_spec.vocab_size}x{var_spec.z_channels}); pass the VQ-VAE it was trained with")
    size = image_size or var_spec.patch_nums[-1] * vae_spec.downsample
    spec = ModelSpec(vae=vae_spec, var=var_spec, image_size=size, preprocess=preprocess, class_names=tuple(class_names))
    with checkpoints.unfilled():
        model = build_model(spec)
    checkpoints.load_into(model.var, var_sd, var, "VAR")
    checkpoints.load_into(model.vae, vae_sd, vae, "VQ-VAE")
    model.var_file, model.vae_file = Path(var), Path(vae)
    return _finish(model, device, dtype)


MODEL_DIR_FORMAT = "avarc-model/1"


def _finish(model: Model, device: str | torch.device, dtype: torch.dtype) -> Model:
    dev = resolve_device(device)
    model.vae.to(dev)
    model.var.to(dev)
    model.device, model.dtype = dev, dtype
    return model


def save_model_dir(model: Model, path: str | os.PathLike, **meta) -> Path:
    """Write ``var.pth``, ``vae.pth`` (plain state dicts) and ``meta.json`` (spec + any metadata) to a directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.var.state_dict().items()}, path / "var.pth")
    torch.save({k: v.detach().cpu() for k, v in model.vae.state_dict().items()}, path / "vae.pth")
    doc = {"format": MODEL_DIR_FORMAT, "spec": spec_to_dict(model.spec), **{**model.meta, **meta}}
    (path / "meta.json").write_text(json.dumps(doc, indent=2) + "\n")
    return path


def load_model_dir(path: str | os.PathLike, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> Model:
    """Load a model directory written by :func:`save_model_dir` (the bundled demo is one)."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise AvarcError(f"{path}: not a model directory (no meta.json); give a VAR checkpoint file and its VQ-VAE "
                         "instead")
    try:
        meta = json.loads(meta_file.read_text())
        spec = spec_from_dict(meta["spec"])
    except (ValueError, KeyError, TypeError) as e:
        raise AvarcError(f"{meta_file}: invalid model metadata ({e})") from None
    with checkpoints.unfilled():
        model = build_model(spec)
    for module, name, what in ((model.var, "var.pth", "VAR"), (model.vae, "vae.pth", "VQ-VAE")):
        kind = "var" if what == "VAR" else "vae"
        checkpoints.load_into(module, checkpoints.read_state_dict(path / name, kind), path / name, what)
    model.meta = {k: v for k, v in meta.items() if k not in ("format", "spec")}
    model.var_file, model.vae_file = path / "var.pth", path / "vae.pth"
    return _finish(model, device, dtype)


def resolve_model(model: str | os.PathLike, vae: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, model_dir: str | os.PathLike | None = None,
                  trust_pickle: bool = False, encoder: str = "torch",
                  patch_nums: tuple[int, ...] | None = None, compile: bool = False) -> Model:  # noqa: A002
    """A model argument (registry name, model directory or VAR file) → loaded Model, its encoder run by ``encoder``
    (``torch`` or ``onnx``; an ONNX export is made beside the VQ-VAE file on first use). ``patch_nums`` states the
    scales of a bare VAR file when they cannot be read off it; ``compile`` fuses the engine with torch.compile."""
    check_backend(encoder)
    path = Path(model)
    if is_registry_name(model):
        e = entry(str(model))
        if e.spec is None:   # a VQ-VAE
            raise AvarcError(f"{e.name!r} is a VQ-VAE, not a VAR; give it as the VQ-VAE and a VAR as the model",
                             option="model")
        path = local_path(e, model_dir)
        vae = vae or e.vae
        patch_nums = patch_nums or e.spec.var.patch_nums
    elif not path.exists():
        raise AvarcError(f"{model}: no such model file or directory{did_you_mean(str(model), REGISTRY)}; known names: "
                         f"{', '.join(REGISTRY)}", option="model")
    if path.is_dir() and vae is not None:
        raise AvarcError(f"{vae}: the model {model} is a directory with its own VQ-VAE (vae.pth); drop this VQ-VAE, "
                         "or give the directory's var.pth to pair it with another", option="vae")
    if path.is_file() and _in_model_dir(path, vae):
        path = path.parent      # its meta.json says what a state dict cannot (GroupNorm groups, preprocessing, names)
    if path.is_dir():
        loaded, vae_path = load_model_dir(path, device=device, dtype=dtype), path / "vae.pth"
    else:
        vae_path = _resolve_vae(vae, path, model_dir)
        loaded = load_model(path, vae_path, device=device, dtype=dtype, trust_pickle=trust_pickle,
                            patch_nums=patch_nums)
    return finish(loaded, encoder, vae_path, compile)


def finish(model: Model, encoder: str = "torch", vae_file: str | os.PathLike | None = None,
           compile: bool = False) -> Model:  # noqa: A002
    """The decisions made once the weights are loaded: the encoder backend and torch.compile of the engine."""
    use_encoder(model, encoder, vae_file)
    model.compile = compile
    return model


def _in_model_dir(var_file: Path, vae: str | os.PathLike | None) -> bool:
    """The ``var.pth`` of a model directory, given with no VQ-VAE or with the directory's own."""
    folder = var_file.parent
    if var_file.name != "var.pth" or not (folder / "vae.pth").is_file():
        return False
    try:
        own = json.loads((folder / "meta.json").read_text()).get("format") == MODEL_DIR_FORMAT
    except (OSError, ValueError, AttributeError):
        return False
    return own and (vae is None or (Path(vae).exists() and Path(vae).resolve() == (folder / "vae.pth").resolve()))


def _resolve_vae(vae: str | os.PathLike | None, var_path: Path, model_dir) -> Path:
    if vae is not None:
        if Path(vae).exists():
            return Path(vae)
        if str(vae).lower() in REGISTRY:
            return local_path(entry(str(vae)), model_dir)
        raise AvarcError(f"{vae}: no such VQ-VAE file", option="vae")
    beside = var_path.with_name("vae.pth")
    if beside.is_file():
        return beside
    return local_path(REGISTRY["vae"], model_dir)
