"""avarc.tasks.incremental: new classes as trained class-embedding rows; old classes' scores untouched to the bit."""
from __future__ import annotations

import pytest
import torch

import avarc
from avarc import AvarcError
from avarc.io.preprocess import preprocess_image
from avarc.tasks import incremental
from tests.conftest import ConformanceSet


@pytest.fixture(scope="module")
def conf() -> ConformanceSet:
    """The 256 px conformance model only (the 512 px set adds minutes and nothing new here)."""
    return ConformanceSet("official256")


def _images(conf, model, n=2) -> torch.Tensor:
    return torch.stack([preprocess_image(p, model.spec.image_size) for p in conf.images[:n]])


@pytest.fixture(scope="module")
def added(conf, tmp_path_factory):
    """A fresh conformance model (the shared one must stay unextended) with one class learnt from 2 images."""
    model = conf.load()
    x = _images(conf, model)
    tokens = model.tokenize(x)
    K = model.num_classes
    before = model.token_logp(tokens, list(range(K + 1)))          # base classes and null
    result = incremental.add_classes(model, {"newcls": x}, steps=40, lr=3e-2, batch_size=2, holdout=0.0)
    out = tmp_path_factory.mktemp(conf.name) / "ext1.pt"
    incremental.save_extension(result.extension, out)
    return model, tokens, before, result, out


def test_old_class_and_null_scores_bit_identical(added):
    model, tokens, before, result, _ = added
    K = model.spec.var.num_classes
    assert model.num_classes == K + 1 and model.null_class == K + 1
    after = model.token_logp(tokens, [*range(K), model.null_class])
    assert torch.equal(after, before)


def test_new_class_wins_on_its_own_images(added):
    model, tokens, _, result, _ = added
    scores = model.token_logp(tokens, list(range(model.num_classes))).sum(-1)   # B, K+1
    assert (scores.argmax(1) == model.spec.var.num_classes).all(), scores
    assert result.log.mean(last=5) < result.log.mean(first=5)


def test_extension_file_is_weights_only_and_reapplies(added, conf):
    model, tokens, _, result, path = added
    doc = torch.load(path, weights_only=True)
    assert doc["names"] == ["newcls"] and doc["offset"] == model.spec.var.num_classes
    assert doc["base_sha256"] == incremental.file_sha256(conf.var_path)
    fresh = conf.load()
    incremental.apply_extensions(fresh, [path])
    assert fresh.class_name(fresh.num_classes - 1) == "newcls"
    assert torch.equal(fresh.token_logp(tokens, list(range(fresh.num_classes + 1))),
                       model.token_logp(tokens, list(range(model.num_classes + 1))))


def test_stacking_requires_parent_in_order(added, conf, tmp_path):
    model, tokens, _, _, ext1 = added
    x = _images(conf, model, 3)[2:]
    before = model.token_logp(tokens, list(range(model.num_classes + 1)))
    r2 = incremental.add_classes(model, {"second": x}, steps=3, batch_size=1, holdout=0.0)
    ext2 = incremental.save_extension(r2.extension, tmp_path / "ext2.pt")
    assert r2.extension.parents == [{"sha256": incremental.load_extension(ext1).sha256, "names": ["newcls"]}]
    # ext1's row is restored bit for bit after training ext2, so every earlier score (null moved by one) is unchanged
    K1 = model.num_classes - 1
    assert torch.equal(model.token_logp(tokens, [*range(K1), model.null_class]), before)

    stacked = conf.load()
    incremental.apply_extensions(stacked, [ext1, ext2])
    assert [stacked.class_name(i) for i in range(stacked.num_classes)][-2:] == ["newcls", "second"]
    with pytest.raises(AvarcError, match=r"stacks on the extensions \[newcls\] but the model has \[none\]"):
        incremental.apply_extensions(conf.load(), [ext2])
    with pytest.raises(AvarcError, match="stacks on"):
        incremental.apply_extensions(conf.load(), [ext2, ext1])


def test_mismatched_base_refused(added, conf):
    *_, ext1 = added
    other = "shared512"
    model = avarc.load_model(conf.dir.parent / other / "var.pth", conf.dir.parent / other / "vae.pth")
    with pytest.raises(AvarcError) as e:
        incremental.apply_extensions(model, [ext1])
    msg = str(e.value)
    assert "was trained on sha256" in msg and "but the model is sha256" in msg and "\n" not in msg


def test_existing_name_and_empty_class_refused(added, conf):
    model, *_ = added
    x = _images(conf, model, 1)
    with pytest.raises(AvarcError, match="'newcls' already exists"):
        incremental.add_classes(model, {"newcls": x}, steps=1)
    with pytest.raises(AvarcError, match="no images"):
        incremental.add_classes(model, {"empty": x[:0]}, steps=1)


def test_not_an_extension_file(conf, tmp_path):
    with pytest.raises(AvarcError, match="not an extension file"):
        incremental.load_extension(conf.var_path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not torch")
    with pytest.raises(AvarcError, match="not an extension file"):
        incremental.load_extension(junk)


def test_holdout_split_never_empties_training():
    gen = torch.Generator().manual_seed(0)
    assert [len(s) for s in incremental.split_holdout(1, 0.5, gen)] == [1, 0]
    assert [len(s) for s in incremental.split_holdout(10, 0.2, gen)] == [8, 2]
    assert [len(s) for s in incremental.split_holdout(2, 0.9, gen)] == [1, 1]
