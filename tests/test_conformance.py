"""Our models against the upstream VAR code: tests/data/conformance/{official256,shared512}/golden.npz."""
import torch

from core.preprocess import preprocess_image
from core.tokenizer import neighbour_tokens

LOGP_TOL = 1e-4


def test_latent_matches_golden(conf, conf_model):
    size = conf.meta["image_size"]
    images = torch.stack([preprocess_image(p, size) for p in conf.images])
    latent = conf_model.encode(images)
    assert torch.allclose(latent, conf.golden["latent"], atol=1e-4)
    assert torch.equal(conf_model.tokenize(images), conf.golden["tokens"])


def test_tokens_match_golden_exactly(conf, conf_model):
    assert torch.equal(conf_model.tokenize_latent(conf.golden["latent"]), conf.golden["tokens"])


def test_logp_all_classes_and_null(conf, conf_model):
    K = conf.meta["num_classes"] + 1
    lp = conf_model.token_logp(conf.golden["tokens"], list(range(K)))
    assert lp.shape == conf.golden["logp"].shape and lp.dtype == torch.float32
    assert (lp - conf.golden["logp"]).abs().max() < LOGP_TOL


def test_neighbours_for_given_noise(conf, conf_model):
    g = conf.golden
    nb = neighbour_tokens(conf_model.vae, g["latent"], g["noise"], conf.meta["smoothing"]["sigma"])
    assert torch.equal(nb, g["neighbor_tokens"])
    B, N, L = nb.shape
    lp = conf_model.token_logp(nb.reshape(B * N, L), list(range(conf.meta["num_classes"] + 1))).view(B, N, -1, L)
    assert (lp - g["neighbor_logp"]).abs().max() < LOGP_TOL


def test_truncated_forward_is_prefix_of_full(conf, conf_model):
    g, ends = conf.golden, conf_model.spec.var.scale_ends()
    tokens, classes = g["tokens"][:2], [0, 3, conf.meta["null_class"]]
    full = conf_model.token_logp(tokens, classes)
    for s in (1, 2, 5, len(ends) - 1):
        part = conf_model.token_logp(tokens, classes, num_scales=s)
        assert part.shape[-1] == ends[s - 1]
        assert (part - g["logp"][:2, classes, : ends[s - 1]]).abs().max() < LOGP_TOL
        assert (part - full[..., : ends[s - 1]]).abs().max() < 1e-4
