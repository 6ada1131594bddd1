"""Loading official-format files in every wrapping we meet, and the one-line errors when a file is wrong."""
import warnings

import pytest
import torch

import avarc
from avarc import AvarcError
from avarc.models.checkpoints import read_state_dict
from tests.conftest import CONFORMANCE

VAR = CONFORMANCE / "official256" / "var.pth"
VAE = CONFORMANCE / "official256" / "vae.pth"


@pytest.fixture(scope="module")
def var_sd():
    return torch.load(VAR, weights_only=True)


@pytest.fixture(scope="module")
def reference():
    return avarc.load_model(VAR, VAE).var.state_dict()


def save(tmp_path, obj, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


BF16 = "nested-prefixed-bf16"


@pytest.mark.parametrize("wrap", [
    lambda sd: {"trainer": {"var_wo_ddp": sd, "var_opt": {"step": torch.tensor(3)}}, "args": {"depth": 2}},
    lambda sd: {"var_wo_ddp": sd},
    lambda sd: {"state_dict": sd},
    lambda sd: {"model": sd},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},
    lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
    lambda sd: {"model": {f"module._orig_mod.{k}": v.to(torch.bfloat16) if v.is_floating_point() else v
                          for k, v in sd.items()}},
], ids=["trainer", "var_wo_ddp", "state_dict", "model", "module", "orig_mod", BF16])
def test_wrapped_checkpoints_load(tmp_path, request, var_sd, reference, wrap):
    model = avarc.load_model(save(tmp_path, wrap(var_sd)), VAE)
    bf16 = request.node.callspec.id == BF16
    for k, v in model.var.state_dict().items():
        assert v.dtype == torch.float32
        assert torch.equal(v, reference[k].to(torch.bfloat16).float() if bf16 else reference[k]), k


def test_fp16_weights_are_cast_exactly(var_sd):
    sd = read_state_dict(VAR, "var")
    assert sd["head.weight"].dtype == torch.float32
    assert torch.equal(sd["head.weight"], var_sd["head.weight"].float())


def one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_missing_and_unexpected_keys(tmp_path, var_sd):
    sd = dict(var_sd)
    del sd["head.bias"]
    sd["blocks.0.attn.extra"] = torch.zeros(3)
    with pytest.raises(AvarcError) as e:
        avarc.load_model(save(tmp_path, sd), VAE)
    one_line(e, "ckpt.pth", "missing 1 keys: head.bias", "unexpected 1 keys: blocks.0.attn.extra")


def test_shape_mismatch_names_both_shapes(tmp_path, var_sd):
    sd = dict(var_sd)
    sd["blocks.1.ffn.fc2.bias"] = torch.zeros(64)
    with pytest.raises(AvarcError) as e:
        avarc.load_model(save(tmp_path, sd), VAE)
    one_line(e, "ckpt.pth", "blocks.1.ffn.fc2.bias", "(64,)", "(128,)")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_needing_code_is_refused_unless_trusted(tmp_path, var_sd):
    path = save(tmp_path, {"model": var_sd, "extra": Evil()})
    with pytest.raises(AvarcError) as e:
        avarc.load_model(path, VAE)
    one_line(e, "ckpt.pth", "refusing to unpickle", "allow full unpickling")
    assert e.value.option == "trust_pickle"           # the CLI names its flag: --trust-pickle
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model = avarc.load_model(path, VAE, trust_pickle=True)
    assert model.spec.var.depth == 2 and any("arbitrary code" in str(x.message) for x in w)


def test_missing_empty_and_corrupt_files(tmp_path):
    with pytest.raises(AvarcError) as e:
        avarc.load_model(tmp_path / "nope.pth", VAE)
    one_line(e, "nope.pth", "no such checkpoint file")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(AvarcError) as e:
        avarc.load_model(tmp_path / "empty.pth", VAE)
    one_line(e, "empty.pth", "empty file")
    (tmp_path / "cut.pth").write_bytes(VAR.read_bytes()[:5000])
    with pytest.raises(AvarcError) as e:
        avarc.load_model(tmp_path / "cut.pth", VAE)
    one_line(e, "cut.pth", "not a readable PyTorch checkpoint")


def test_vae_and_var_swapped(tmp_path):
    with pytest.raises(AvarcError) as e:
        avarc.load_model(VAE, VAR)
    one_line(e, "vae.pth", "not a VAR state dict")


def test_mismatched_vae_codebook():
    with pytest.raises(AvarcError) as e:
        avarc.load_model(VAR, CONFORMANCE / "shared512" / "vae.pth")
    one_line(e, "codebook", "1024x32", "4096x32")
