"""Our models against the upstream VAR code: tests/data/conformance/{official256,shared512}/golden.npz, on every
available device (tokens exact everywhere; log-probs within LOGP_TOL of the CPU golden)."""
import pytest
import torch

from avarc.engine.tokenizer import neighbour_tokens
from avarc.io.preprocess import preprocess_image
from tests.conftest import LOGP_TOL


def test_latent_matches_golden(conf, engine_model):
    size = conf.meta["image_size"]
    images = torch.stack([preprocess_image(p, size) for p in conf.images])
    latent = engine_model.encode(images).cpu()
    assert torch.allclose(latent, conf.golden["latent"], atol=1e-4)
    assert torch.equal(engine_model.tokenize(images).cpu(), conf.golden["tokens"])


def test_tokens_match_golden_exactly(conf, engine_model):
    assert torch.equal(engine_model.tokenize_latent(conf.golden["latent"]).cpu(), conf.golden["tokens"])


@pytest.mark.parametrize("one_call", [None, True])
def test_logp_all_classes_and_null(conf, engine_model, one_call):
    """The device's own attention plan, and the one-call plan a GPU runs (on a CPU too, to hold it to the goldens)."""
    K = conf.meta["num_classes"] + 1
    engine_model.var.one_attention_call = one_call
    try:
        lp = engine_model.token_logp(conf.golden["tokens"], list(range(K)))
    finally:
        engine_model.var.one_attention_call = None
    assert lp.shape == conf.golden["logp"].shape and lp.dtype == torch.float32
    assert (lp - conf.golden["logp"]).abs().max() < LOGP_TOL[engine_model.device.type]


def test_neighbours_for_given_noise(conf, engine_model):
    g, dev = conf.golden, engine_model.device
    nb = neighbour_tokens(engine_model.vae, g["latent"].to(dev), g["noise"].to(dev),
                          conf.meta["smoothing"]["sigma"]).cpu()
    assert torch.equal(nb, g["neighbor_tokens"])
    B, N, L = nb.shape
    lp = engine_model.token_logp(nb.reshape(B * N, L), list(range(conf.meta["num_classes"] + 1))).view(B, N, -1, L)
    assert (lp - g["neighbor_logp"]).abs().max() < LOGP_TOL[dev.type]


def test_truncated_forward_is_prefix_of_full(conf, engine_model):
    g, ends = conf.golden, engine_model.spec.var.scale_ends()
    tol = LOGP_TOL[engine_model.device.type]
    tokens, classes = g["tokens"][:2], [0, 3, conf.meta["null_class"]]
    full = engine_model.token_logp(tokens, classes)
    for s in (1, 2, 5, len(ends) - 1):
        part = engine_model.token_logp(tokens, classes, num_scales=s)
        assert part.shape[-1] == ends[s - 1]
        assert (part - g["logp"][:2, classes, : ends[s - 1]]).abs().max() < tol
        assert (part - full[..., : ends[s - 1]]).abs().max() < tol
