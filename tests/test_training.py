"""avarc.tasks.training: a tiny VQ-VAE + VAR trained for a few steps on real digits learns, reproducibly, on any
classes."""
from __future__ import annotations

import math

import pytest
import torch

import avarc
from avarc.tasks.training import Augment, TrainConfig, lr_at, random_affine, token_pool, train_var, train_vqvae
from scripts import digits

VAE = avarc.VQVAESpec(vocab_size=16, z_channels=4, ch=8, ch_mult=(1, 2), num_res_blocks=1, share_quant_resi=0,
                     num_groups=4, using_sa=False, using_mid_sa=False)


def tiny_model(num_classes: int, seed: int = 0) -> avarc.Model:
    var = avarc.VARSpec(depth=1, embed_dim=32, num_heads=1, num_classes=num_classes, patch_nums=(1, 2, 4),
                       vocab_size=16, z_channels=4)
    torch.manual_seed(seed)
    model = avarc.build_model(avarc.ModelSpec(vae=VAE, var=var, image_size=8, preprocess="resize"))
    model.var.init_weights()
    return model


@pytest.fixture(scope="module")
def train_set() -> digits.Digits:
    data = digits.load_digits("train")
    return digits.Digits(data.images[:200], data.labels[:200], data.indices[:200])


@pytest.fixture(scope="module")
def trained(train_set):
    """A tiny model after 60 VQ-VAE steps and 60 VAR steps, with both loss logs."""
    model = tiny_model(10)
    images = digits.to_tensor(train_set.images, 8)
    vae_log = train_vqvae(model, images, TrainConfig(steps=60, lr=3e-3, batch_size=32, weight_decay=0.0),
                          augment=Augment(shift=0.5))
    tokens = model.tokenize(images)
    var_log = train_var(model, tokens, torch.from_numpy(train_set.labels),
                        TrainConfig(steps=60, lr=3e-3, batch_size=32))
    return model, tokens, vae_log, var_log


def test_vqvae_loss_falls_and_codebook_is_used(trained):
    model, tokens, vae_log, _ = trained
    assert len(vae_log.losses) == 60
    assert vae_log.mean(last=10) < 0.6 * vae_log.mean(first=10)
    assert tokens.unique().numel() >= 12          # re-seeding keeps (almost) all 16 codes in use


def test_var_loss_falls_below_uniform(trained):
    model, _, _, var_log = trained
    assert var_log.losses[0] == pytest.approx(math.log(16), abs=0.1)   # the official init starts near uniform
    assert var_log.mean(last=10) < var_log.mean(first=10) - 0.3


def test_training_leaves_model_frozen_in_eval_mode(trained):
    model = trained[0]
    assert not model.var.training and not model.vae.training
    assert not any(p.requires_grad for p in [*model.var.parameters(), *model.vae.parameters()])


def test_same_seed_same_weights(train_set):
    images = digits.to_tensor(train_set.images[:64], 8)
    runs = []
    for _ in range(2):
        model = tiny_model(10)
        log = train_vqvae(model, images, TrainConfig(steps=5, lr=3e-3, batch_size=16), augment=Augment(1, 10, 0.1))
        runs.append((log.losses, model.vae.quantize.embedding.weight.clone()))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_subset_of_classes(train_set):
    """A base model on digits 0–4 only: class indices are positions in the subset, other digits are refused."""
    classes = (0, 1, 2, 3, 4)
    base = train_set.subset(classes)
    assert set(base.labels.tolist()) == set(classes)
    model = tiny_model(len(classes))
    labels = digits.class_index(base.labels, classes)
    tokens = model.tokenize(digits.to_tensor(base.images, 8))
    log = train_var(model, tokens, labels, TrainConfig(steps=30, lr=3e-3, batch_size=32))
    assert log.mean(last=5) < log.mean(first=5)
    with pytest.raises(avarc.AvarcError, match="class indices"):
        train_var(model, tokens, labels + 5, TrainConfig(steps=1, lr=1e-3))
    with pytest.raises(avarc.AvarcError, match="not among classes"):
        digits.class_index(train_set.labels, classes)


def test_only_the_given_parameters_change(trained, train_set):
    """Class-incremental use: append rows for new classes and train only them; every base weight stays bit-identical
    and the new classes' tokens become more likely under their own rows."""
    model, tokens, _, _ = trained
    before = {k: v.clone() for k, v in model.var.state_dict().items()}
    model.var.add_classes(model.var.class_emb.weight[:2].clone())           # new ids 10, 11; null moves to 12
    try:
        labels = torch.from_numpy(train_set.labels % 2 + 10)
        first = model.token_logp(tokens[:50], [10, 11])[torch.arange(50), labels[:50] - 10].sum(-1).mean()
        train_var(model, tokens, labels, TrainConfig(steps=30, lr=1e-2, batch_size=32, weight_decay=0.0),
                  params=[("extra_class_emb", model.var.extra_class_emb)], label_drop=0.0)
        after = model.token_logp(tokens[:50], [10, 11])[torch.arange(50), labels[:50] - 10].sum(-1).mean()
        assert after > first
        assert all(torch.equal(before[k], v) for k, v in model.var.state_dict().items() if k in before)
    finally:
        model.var.extra_class_emb = None


def test_token_pool_adds_augmented_copies(trained, train_set):
    model, tokens, _, _ = trained
    images = digits.to_tensor(train_set.images[:20], 8)
    pool, labels = token_pool(model, images, torch.arange(20), 2, Augment(0.5, 10, 0.1),
                              torch.Generator().manual_seed(0))
    assert pool.shape == (60, tokens.shape[1]) and torch.equal(labels, torch.arange(20).repeat(3))
    assert torch.equal(pool[:20], tokens[:20])          # the clean tokens come first, unchanged
    assert not torch.equal(pool[20:40], pool[:20])


def test_affine_identity_and_fill():
    x = digits.to_tensor(digits.load_digits("test").images[:4], 8)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(random_affine(x, gen), x)
    moved = random_affine(torch.ones(16, 3, 8, 8), gen, shift=2.0, rotate=30.0)
    assert moved.min() == pytest.approx(-1.0) and moved.max() == pytest.approx(1.0)   # what comes in is black
    assert not torch.equal(moved[0], moved[1])           # each image gets its own distortion


def test_warmup_then_cosine():
    cfg = TrainConfig(steps=110, lr=1.0, warmup=10, final_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
