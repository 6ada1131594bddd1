"""The ONNX encoder (core/onnx_encoder.py) against torch and tests/data/conformance/official256/golden.npz (the
export does not depend on the geometry: one file serves 256- and 512-px inputs, so the cheaper set proves it).

Each conformance VQ-VAE is copied to a temporary folder and loaded with ``encoder="onnx"``, which exports it beside
the copy; onnxruntime's latents must match the golden ones to 1e-4 and give the same tokens and classes as torch.
"""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from avarc import AvarcError, preprocess_image
from avarc.io.loading import resolve_model
from avarc.io.onnx_encoder import PACKAGE_DIR, OnnxEncoder, cache_dir, export_path, use_encoder, weights_sha256
from avarc.models.checkpoints import read_state_dict
from tests.conftest import AT_256, ConformanceSet


@pytest.fixture(scope="module")
def onnx_model(conf, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"onnx-{conf.name}")
    shutil.copy(conf.vae_path, folder / "vae.pth")
    shutil.copy(conf.var_path, folder / "var.pth")
    return resolve_model(folder / "var.pth", vae=folder / "vae.pth", encoder="onnx")


def _images(conf: ConformanceSet) -> torch.Tensor:
    return torch.stack([preprocess_image(p, conf.meta["image_size"]) for p in conf.images])


@AT_256
def test_onnx_latent_and_tokens_match_torch(conf, conf_model, onnx_model):
    assert isinstance(onnx_model.encoder, OnnxEncoder) and onnx_model.encoder.providers == ["CPUExecutionProvider"]
    assert onnx_model.encoder.path == onnx_model.var_file.with_name("vae.onnx")
    images = _images(conf)
    latent = onnx_model.encode(images)
    assert (latent - conf.golden["latent"]).abs().max() < 1e-4
    tokens, torch_tokens = onnx_model.tokenize_latent(latent), conf_model.tokenize(images)
    agree = (tokens == torch_tokens).float().mean().item()
    print(f"{conf.name}: ONNX vs torch latent max |Δ| {(latent - conf_model.encode(images)).abs().max():.2e}, "
          f"tokens equal on {agree:.4%} of {tokens.numel()}")
    assert agree >= 0.999
    other = torch.nn.functional.interpolate(images[:2], size=(512, 384), mode="bilinear")  # height, width dynamic
    assert (onnx_model.encode(other) - conf_model.encode(other)).abs().max() < 1e-4


@AT_256
def test_classes_with_onnx_encoder_equal_the_upstream_ones(conf, onnx_model):
    images, classes = _images(conf)[:2], list(range(conf.meta["num_classes"]))
    by_onnx = onnx_model.token_logp(onnx_model.tokenize(images), classes).sum(-1)    # log p(x | class)
    upstream = conf.golden["logp"][:2, : len(classes)].sum(-1)
    assert torch.equal(by_onnx.argmax(-1), upstream.argmax(-1))
    assert (by_onnx - upstream).abs().max() < 0.1


@AT_256
def test_stale_export_is_detected_and_made_again(conf, onnx_model):
    folder = onnx_model.var_file.parent
    model = resolve_model(folder / "var.pth", vae=folder / "vae.pth")
    stamp = (folder / "vae.onnx").stat().st_mtime_ns
    again = use_encoder(model, "onnx", folder / "vae.pth")   # the fixture's export, reused
    assert (not again.exported and again.path == folder / "vae.onnx"
            and (folder / "vae.onnx").stat().st_mtime_ns == stamp)
    record = json.loads((folder / "vae.onnx.json").read_text())
    assert record["weights_sha256"] == again.weights_sha256 == weights_sha256(model.vae)

    sd = read_state_dict(folder / "vae.pth", "vae")   # the VQ-VAE is retrained: its file changes
    sd["encoder.conv_in.weight"] *= 1.5
    torch.save(sd, folder / "vae.pth")
    retrained = resolve_model(folder / "var.pth", vae=folder / "vae.pth", encoder="onnx")
    record = json.loads((folder / "vae.onnx.json").read_text())
    assert record["weights_sha256"] == weights_sha256(retrained.vae) != again.weights_sha256
    images = _images(conf)[:2]
    assert (retrained.encode(images) - retrained.vae.encode(images)).abs().max() < 1e-4
    assert (retrained.encode(images) - conf.golden["latent"][:2]).abs().max() > 1e-2

    use_encoder(retrained, "torch")
    assert retrained.encoder is None


def test_exports_of_packaged_models_go_to_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    sha = "ab" * 32
    in_cache = tmp_path / "avarc" / "onnx" / f"{sha[:16]}.onnx"
    assert export_path(PACKAGE_DIR / "data" / "vae.pth", sha) == in_cache == cache_dir() / f"{sha[:16]}.onnx"
    assert export_path(None, sha) == in_cache
    (tmp_path / "mine").mkdir()
    assert export_path(tmp_path / "mine" / "vae_x.pth", sha) == tmp_path / "mine" / "vae_x.onnx"


def test_without_onnxruntime_the_error_says_how_to_install(monkeypatch):
    conf = ConformanceSet("official256")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)       # what `import onnxruntime` meets where it is absent
    with pytest.raises(AvarcError) as e:
        resolve_model(conf.var_path, vae=conf.vae_path, encoder="onnx")
    assert str(e.value) == "the ONNX encoder needs onnxruntime, which is not installed; pip install 'avarc[onnx]'"


def test_unknown_encoder_is_a_user_error(conf_model):
    with pytest.raises(AvarcError, match="unknown encoder 'tensorrt'; use torch or onnx"):
        use_encoder(conf_model, "tensorrt")
