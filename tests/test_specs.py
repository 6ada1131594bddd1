"""Official presets against tests/data/conformance/official_manifest.json (names and shapes of the real files)."""
import json

import pytest
import torch

from avarc import build_model, infer_vae_spec, infer_var_spec, official_spec
from avarc.models.checkpoints import load_into, unwrap
from tests.conftest import CONFORMANCE

MANIFEST = json.loads((CONFORMANCE / "official_manifest.json").read_text())
DEPTHS = (16, 20, 24, 30, 36)


def meta_state_dict(entry: dict, with_buffers: bool = True) -> dict:
    items = dict(entry["params"])
    if with_buffers:
        items.update(entry["buffers"])
    return {k: torch.empty(v, device="meta") for k, v in items.items()}


@pytest.mark.parametrize("depth", DEPTHS)
def test_var_preset_matches_manifest(depth):
    entry = MANIFEST[f"var_d{depth}.pth"]
    model = build_model(official_spec(f"d{depth}"), device="meta")
    params = {k: list(v.shape) for k, v in model.var.named_parameters()}
    assert params == entry["params"]
    assert sum(v.numel() for v in model.var.parameters()) == entry["num_params"]
    spec = model.spec.var
    assert list(spec.patch_nums) == entry["patch_nums"] and spec.shared_aln == entry["shared_aln"]
    assert model.spec.image_size == entry["image_size"]


def test_vae_preset_matches_manifest():
    entry = MANIFEST["vae_ch160v4096z32.pth"]
    model = build_model(official_spec("vae"), device="meta")
    assert {k: list(v.shape) for k, v in model.vae.named_parameters()} == entry["params"]


@pytest.mark.parametrize("depth", DEPTHS)
def test_manifest_state_dict_loads_strict_and_infers_spec(depth):
    var_sd = unwrap(meta_state_dict(MANIFEST[f"var_d{depth}.pth"]), "var")   # derived buffers dropped here
    vae_sd = unwrap(meta_state_dict(MANIFEST["vae_ch160v4096z32.pth"]), "vae")
    spec = official_spec(f"d{depth}")
    assert infer_var_spec(var_sd) == spec.var
    assert infer_vae_spec(vae_sd) == spec.vae
    model = build_model(spec, device="meta")
    load_into(model.var, var_sd, f"var_d{depth}.pth", "VAR")
    load_into(model.vae, vae_sd, "vae.pth", "VQ-VAE")


def test_cca_names_share_base_architecture():
    assert official_spec("d20-cca") == official_spec("d20")
