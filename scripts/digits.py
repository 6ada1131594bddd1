"""scikit-learn's 1,797 handwritten 8×8 digits, the data the bundled ``digits`` model is trained and tested on.

Pixels are stored as 8-bit greyscale (value·255/16 rounded) so that a PNG of an image holds exactly what the
model was trained on. The split is by index and fixed: train = 0…1437, test = 1438…1796 (never trained on).
scikit-learn is needed only here, for training and tests, so it is imported lazily.

    python scripts/digits.py --split data/digits   # data/digits/{tune,test,calibrate,check}/<digit>/*.png

writes labelled class folders for the README's flows: ``tune/`` holds 40 training images per digit (seen in
training, so tune's accuracies there are optimistic, but enough images per class to choose a schedule) and
``test/`` the whole test split (359 images never trained on), where classify measures honestly. For
out-of-distribution thresholds the test split is also halved: ``calibrate/`` (digits 1438–1617), where
``calibrate-ood`` sets thresholds on images the model never trained on, and ``check/`` (1618–1796), where they
are applied to images the calibration never saw.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avarc import AvarcError
from avarc.engine.model import Model
from avarc.engine.tokenizer import draw_noise, neighbour_tokens

NUM_IMAGES = 1797
TRAIN_END = 1438   # train = [0, TRAIN_END), test = [TRAIN_END, NUM_IMAGES)
SPLITS = {"train": range(0, TRAIN_END), "test": range(TRAIN_END, NUM_IMAGES)}
CLASS_NAMES = tuple(str(d) for d in range(10))
CALIBRATE_END = 1618   # calibrate = [TRAIN_END, CALIBRATE_END), check = [CALIBRATE_END, NUM_IMAGES): the test split


@dataclass(frozen=True)
class Digits:
    """N, 8, 8 uint8 images, their N digit labels and their N indices in the full dataset."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, classes: tuple[int, ...]) -> "Digits":
        """Only the images of the given digits (labels stay digits; see :func:`class_index`)."""
        keep = np.isin(self.labels, classes)
        return Digits(self.images[keep], self.labels[keep], self.indices[keep])


def to_uint8(values: np.ndarray) -> np.ndarray:
    """scikit-learn's 0…16 intensities → 0…255, rounded half away from zero."""
    return np.floor(np.asarray(values, dtype=np.float64) * 255.0 / 16.0 + 0.5).astype(np.uint8)


def load_digits(split: str = "all") -> Digits:
    """The ``train``, ``test`` or ``all`` split as uint8 images."""
    if split not in (*SPLITS, "all"):
        raise AvarcError(f"unknown digits split {split!r}; use train, test or all")
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise AvarcError("the digits data needs scikit-learn; pip install 'avarc[dev]'") from None
    ds = sk_load_digits()
    images, labels = to_uint8(ds.images), np.asarray(ds.target, dtype=np.int64)
    if images.shape != (NUM_IMAGES, 8, 8):
        raise AvarcError(f"scikit-learn's digits have shape {images.shape}, expected ({NUM_IMAGES}, 8, 8)")
    idx = np.arange(NUM_IMAGES) if split == "all" else np.asarray(SPLITS[split])
    return Digits(images[idx], labels[idx], idx)


def class_index(labels: np.ndarray, classes: tuple[int, ...]) -> torch.Tensor:
    """Digit labels → the model's class indices when it knows only ``classes`` (position in that tuple)."""
    lookup = np.full(10, -1, dtype=np.int64)
    lookup[list(classes)] = np.arange(len(classes))
    out = lookup[np.asarray(labels)]
    if (out < 0).any():
        raise AvarcError(f"labels {sorted(set(np.asarray(labels)[out < 0].tolist()))} are not among classes {classes}")
    return torch.from_numpy(out)


def to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    """N, 8, 8 uint8 → N, 3, size, size float32 in [-1, 1], prepared exactly as ``preprocess='resize'`` does it."""
    from PIL import Image

    from avarc.io.preprocess import pixels_to_tensor, preprocess_pil

    return torch.stack([pixels_to_tensor(preprocess_pil(Image.fromarray(im), size, "resize")) for im in images])


@dataclass(frozen=True)
class Accuracy:
    """Top-1 accuracy of a digits model: ``by_scales[s-1]`` uses only the first s scales (the last entry is all
    scales, one sample); ``smoothed`` averages the summed log-likelihood over the clean tokens and
    ``neighbours`` latent-noise neighbours (all scales)."""

    by_scales: list[float]
    smoothed: float
    neighbours: int
    sigma: float
    num_images: int

    @property
    def top1(self) -> float:
        return self.by_scales[-1]


@torch.no_grad()
def evaluate(model: Model, data: Digits, classes: tuple[int, ...] = tuple(range(10)), neighbours: int = 2,
             sigma: float = 0.1, seed: int = 0) -> Accuracy:
    """Generative classification of ``data`` among ``classes`` (the model's class i is digit ``classes[i]``): the
    prediction is the class with the highest summed token log-likelihood."""
    y = class_index(data.labels, classes)
    latent = model.encode(to_tensor(data.images, model.spec.image_size))
    clean = model.tokenize_latent(latent)
    ids = range(len(classes))
    logp = model.token_logp(clean, ids)                              # B, K, L
    ends = model.spec.var.scale_ends()
    upto = logp.cumsum(-1)[:, :, [e - 1 for e in ends]]              # B, K, S: log p(first s scales | class)
    by_scales = (upto.argmax(1) == y[:, None]).float().mean(0).tolist()
    total = upto[:, :, -1]
    if neighbours:
        noise = draw_noise(latent, neighbours, torch.Generator().manual_seed(seed))
        near = neighbour_tokens(model.vae, latent, noise, sigma)      # B, N, L
        total = total + sum(model.token_logp(near[:, j], ids).sum(-1) for j in range(neighbours))
    smoothed = (total.argmax(1) == y).float().mean().item()
    return Accuracy(by_scales, smoothed, neighbours, sigma, len(y))


def write_split(out: Path, tune_per_class: int = 40, seed: int = 0) -> dict[str, int]:
    """``out/tune/<digit>/<index>.png`` (a seeded sample of the train split per digit), ``out/test/<digit>/`` (the
    whole test split) and its two halves ``out/calibrate/`` and ``out/check/``; refuses to write into folders that
    already exist. Returns the images per part."""
    from PIL import Image

    parts = {name: out / name for name in ("tune", "test", "calibrate", "check")}
    taken = [p for p in parts.values() if p.exists()]
    if taken:
        raise AvarcError(f"{taken[0]}: already exists; choose another folder (nothing is overwritten)")
    train, test = load_digits("train"), load_digits("test")
    rng = np.random.default_rng(seed)
    pick = np.concatenate([rng.permutation(np.flatnonzero(train.labels == d))[:tune_per_class] for d in range(10)])
    half = np.flatnonzero(test.indices < CALIBRATE_END)
    counts = {}
    for name, data, idx in (("tune", train, np.sort(pick)), ("test", test, np.arange(len(test))),
                            ("calibrate", test, half), ("check", test, np.flatnonzero(test.indices >= CALIBRATE_END))):
        for i in idx:
            path = parts[name] / str(data.labels[i]) / f"{data.indices[i]}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(data.images[i]).save(path)
        counts[name] = len(idx)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the digits as labelled class folders (PNG).")
    parser.add_argument("--split", type=Path, required=True, metavar="DIR",
                        help="writes DIR/tune, DIR/test and its halves DIR/calibrate, DIR/check")
    parser.add_argument("--tune-per-class", type=int, default=40, metavar="N", help="training images per digit")
    args = parser.parse_args()
    try:
        counts = write_split(args.split, args.tune_per_class)
    except AvarcError as e:
        raise SystemExit(f"error: {e}") from None
    print(", ".join(f"wrote {n} images to {args.split / name}" if i == 0 else f"{n} to {args.split / name}"
                    for i, (name, n) in enumerate(counts.items())))


if __name__ == "__main__":
    main()
