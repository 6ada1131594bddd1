"""Out-of-distribution sets for the bundled digits model, and the measurements the README quotes.

Three sets of 8×8 8-bit greyscale images in the style of scikit-learn's digits (bright strokes on black, the full
0…255 range): ``letters`` (A–Z and a–z rendered from the font shipped with Pillow, cropped to their ink, slightly
rotated and thickened), ``patches`` (crops of ``sklearn.datasets.load_sample_images`` downscaled to 8×8, contrast
stretched) and ``noise`` (uniform).

    python scripts/ood_digits.py --out ood/                # write ood/{letters,patches,noise}/*.png
    python scripts/ood_digits.py --measure all             # AUROC per score and set, abstention, explanation AUCs
"""
from __future__ import annotations

import argparse
import string
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZE = 8
PER_SET = 200
FIT = (1438, 1618)       # test digits the abstention threshold is fitted on
HELD = (1618, 1797)      # test digits it is judged on


def _to_digit_style(grey: np.ndarray) -> Image.Image:
    """A greyscale array (bright = ink) → 8×8 uint8 stretched to 0…255, as the digits are stored."""
    img = Image.fromarray(grey.astype(np.uint8)).resize((SIZE, SIZE), Image.Resampling.BOX)
    a = np.asarray(img, np.float64)
    a = (a - a.min()) / max(a.max() - a.min(), 1e-9) * 255.0
    return Image.fromarray(np.floor(a + 0.5).astype(np.uint8))


def letters(n: int = PER_SET, seed: int = 0) -> list[Image.Image]:
    """Letters from Pillow's bundled font, each cropped to its ink and padded square, as the digits are."""
    rng = np.random.default_rng(seed)
    font = ImageFont.load_default(size=48)
    chars = string.ascii_uppercase + string.ascii_lowercase
    out = []
    for i in range(n):
        canvas = Image.new("L", (96, 96))
        ImageDraw.Draw(canvas).text((20, 10), chars[i % len(chars)], fill=255, font=font,
                                    stroke_width=int(rng.integers(1, 4)), stroke_fill=255)
        canvas = canvas.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR)
        box = canvas.getbbox()
        ink = np.asarray(canvas.crop(box))
        side = max(ink.shape) + 8
        square = np.zeros((side, side))
        top, left = (side - ink.shape[0]) // 2, (side - ink.shape[1]) // 2
        square[top:top + ink.shape[0], left:left + ink.shape[1]] = ink
        out.append(_to_digit_style(square))
    return out


def patches(n: int = PER_SET, seed: int = 0) -> list[Image.Image]:
    """Random square crops (32–160 pixels) of scikit-learn's two sample photographs, in greyscale."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [np.asarray(Image.fromarray(im).convert("L"), np.float64) for im in load_sample_images().images]
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(32, 161))
        y, x = int(rng.integers(0, photo.shape[0] - side)), int(rng.integers(0, photo.shape[1] - side))
        out.append(_to_digit_style(photo[y:y + side, x:x + side]))
    return out


def noise(n: int = PER_SET, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)) for _ in range(n)]


def ood_sets(seed: int = 0) -> dict[str, list[Image.Image]]:
    return {"letters": letters(seed=seed), "patches": patches(seed=seed), "noise": noise(seed=seed)}


def digit_images(start: int, end: int) -> tuple[list[Image.Image], list[int]]:
    from scripts.digits import load_digits

    d = load_digits("all")
    return [Image.fromarray(d.images[i]) for i in range(start, end)], d.labels[start:end].tolist()


def save(root: Path) -> None:
    for name, images in ood_sets().items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            im.save(root / name / f"{name}{i:03d}.png")


def measure_ood() -> None:
    """The README's AUROC and abstention tables, on the bundled model with its default profile (fp32, CPU)."""
    from avarc import Classifier
    from avarc.engine.profile import OodRule
    from avarc.tasks.ood import DEFAULT_OOD_SCORE, OOD_SCORES, auroc, fit_thresholds

    clf = Classifier.from_pretrained("digits", device="cpu", dtype="fp32", threads=1)
    sets = ood_sets()
    digits, labels = digit_images(FIT[0], HELD[1])
    scored = {"digits": clf.classify(digits, labels=labels)}
    for name, images in sets.items():
        scored[name] = clf.classify(images)
    print("| score | " + " | ".join(sets) + " |\n|---|" + "---|" * len(sets))
    for s in OOD_SCORES:
        inside = [p.ood[s] for p in scored["digits"]]
        print(f"| {s} | " + " | ".join(f"{auroc(inside, [p.ood[s] for p in scored[n]]):.4f}" for n in sets) + " |")
    bounds = [p.ood["log_px"][1] - p.ood["log_px"][0] for ps in scored.values() for p in ps]
    print(f"\nwidest log p(x) bound: {max(bounds):.3g} nats")

    n_fit = FIT[1] - FIT[0]
    fit = [p.ood for p in scored["digits"][:n_fit]]
    rule = OodRule(DEFAULT_OOD_SCORE, 0.95, tuple(fit_thresholds(fit, 0.95).items()))
    print(f"\nthresholds fitted on digits {FIT[0]}–{FIT[1] - 1} at 95% coverage: {dict(rule.thresholds)}")
    print("| score | coverage on digits 1618–1796 | top-1 kept (all) | " + " | ".join(f"{n} abstained" for n in sets)
          + " |\n|---|---|---|" + "---|" * len(sets))
    for s in OOD_SCORES:
        t = rule.threshold(s)
        held = scored["digits"][n_fit:]
        kept = [p for p in held if p.ood[s] >= t]
        acc_kept = np.mean([p.pred == p.label for p in kept])
        acc_all = np.mean([p.pred == p.label for p in held])
        print(f"| {s} | {len(kept) / len(held):.1%} | {acc_kept:.2%} ({acc_all:.2%}) | "
              + " | ".join(f"{np.mean([p.ood[s] < t for p in scored[n]]):.1%}" for n in sets) + " |")


def measure_explanations(count: int, shard: tuple[int, int] = (0, 1)) -> None:
    """Insertion/deletion AUC of the explanations of ``count`` test digits (evenly spread), true class vs null; with
    ``shard`` (k, n) only every n-th of them from the k-th, each image's AUCs printed (images are independent)."""
    from avarc import Classifier
    from avarc.tasks.explain_metrics import image_metrics, summarise

    clf = Classifier.from_pretrained("digits", device="cpu", dtype="fp32", threads=1)
    digits, labels = digit_images(FIT[0], HELD[1])
    idx = np.linspace(0, len(digits) - 1, min(count, len(digits))).round().astype(int).tolist()[shard[0]::shard[1]]
    expls = clf.explain([digits[i] for i in idx], labels=[labels[i] for i in idx])
    results = [image_metrics(clf.model, ex, clf.profile) for ex in expls]
    for i, r in zip(idx, results):
        print(f"image {FIT[0] + i}: {r.insertion:.6f} {r.deletion:.6f} "
              f"{r.random_insertion:.6f} {r.random_deletion:.6f}")
    print(f"\nexplanation metrics on {len(results)} test digits (mean ± s.e., std):")
    for k, (m, se) in summarise(results).items():
        print(f"  {k}: {m:.4f} ± {se:.4f} (std {np.std([getattr(r, k) for r in results], ddof=1):.4f})")
    print(f"  images with insertion above random: {np.mean([r.insertion > r.random_insertion for r in results]):.1%}, "
          f"deletion below random: {np.mean([r.deletion < r.random_deletion for r in results]):.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the sets as PNG folders here")
    ap.add_argument("--measure", choices=("ood", "explain", "all"), help="print the README's tables")
    ap.add_argument("--metrics-images", type=int, default=359, help="test digits for the explanation metrics")
    ap.add_argument("--shard", default="0/1", help="K/N: measure every N-th of those images from the K-th")
    args = ap.parse_args()
    if args.out:
        save(args.out)
    if args.measure in ("ood", "all"):
        measure_ood()
    if args.measure in ("explain", "all"):
        k, n = (int(v) for v in args.shard.split("/"))
        measure_explanations(args.metrics_images, (k, n))


if __name__ == "__main__":
    main()
