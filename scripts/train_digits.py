"""Train the bundled ``digits`` model from scratch on scikit-learn's 8×8 handwritten digits (CPU, seeded).

    python scripts/train_digits.py --out core/weights/digits            # the bundled model (seed 0, all digits)
    python scripts/train_digits.py --out runs/digits-0-4 --classes 0-4  # a base model for class-incremental tests
    python scripts/train_digits.py --examples examples/digits           # the example PNGs (2 test images per digit)

First a multi-scale VQ-VAE learns tokens of the training images, then a class-conditional VAR learns the tokens
of the training images and of augmented copies (small shifts, rotations, zooms) with teacher forcing. The test
split is never trained on; its accuracy is measured at the end and written into meta.json.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import digits
import numpy as np
import torch

from avarc import AvarcError, ModelSpec, VARSpec, VQVAESpec, build_model
from avarc.cli import output
from avarc.io.loading import save_model_dir
from avarc.tasks.training import Augment, TrainConfig, token_pool, train_var, train_vqvae

IMAGE_SIZE = 8                       # the digits' own resolution: "resize" preprocessing keeps them pixel-exact
PATCH_NUMS = (1, 2, 3, 4)            # 30 tokens per image on a 4×4 latent
VAE = VQVAESpec(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, share_quant_resi=0,
                num_groups=8, using_sa=False, using_mid_sa=True)
VAR_DEPTH, VAR_WIDTH, VAR_HEADS = 4, 96, 2
AUGMENT = Augment(shift=0.5, rotate=10.0, scale=0.1)
VAE_TRAIN = dict(steps=800, lr=2e-3, batch_size=64, warmup=50, weight_decay=0.0)
VAR_TRAIN = dict(steps=1500, lr=2e-3, batch_size=64, warmup=75, weight_decay=0.05)
POOL_COPIES, LABEL_DROP = 20, 0.1


def parse_classes(text: str) -> tuple[int, ...]:
    """``0-9``, ``0-4`` or ``1,3,7`` → sorted unique digits."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise AvarcError(f"--classes {text!r}: use a range like 0-4 or a list like 1,3,7") from None
    if not out or min(out) < 0 or max(out) > 9:
        raise AvarcError(f"--classes {text!r}: digits must be in 0-9")
    return tuple(sorted(out))


def model_spec(classes: tuple[int, ...]) -> ModelSpec:
    var = VARSpec(depth=VAR_DEPTH, embed_dim=VAR_WIDTH, num_heads=VAR_HEADS, num_classes=len(classes),
                  patch_nums=PATCH_NUMS, vocab_size=VAE.vocab_size, z_channels=VAE.z_channels)
    return ModelSpec(vae=VAE, var=var, image_size=IMAGE_SIZE, preprocess="resize",
                     class_names=tuple(digits.CLASS_NAMES[c] for c in classes))


def run_with_progress(label: str, steps: int, train):
    """Call ``train(on_step)`` under a rich progress bar; return its result and the seconds it took."""
    start = time.perf_counter()
    with output.progress() as bar:
        task = bar.add_task(label, total=steps, info="")
        result = train(lambda step, total, loss: bar.update(task, completed=step, info=f"loss {loss:.3f}"))
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="model directory to write (var.pth, vae.pth, meta.json)")
    ap.add_argument("--examples", type=Path, help="also write 2 test-split images per digit as DIR/<digit>/<index>.png")
    ap.add_argument("--seed", type=int, default=0, help="seed of initialisation, batches, augmentation (default 0)")
    ap.add_argument("--classes", default="0-9", help="digits to train on, e.g. 0-4 or 1,3,7 (default 0-9)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: these tiny ops gain little from more, "
                         "and lose a lot on a busy machine)")
    args = ap.parse_args(argv)
    if args.out is None and args.examples is None:
        ap.error("give --out DIR (train a model) and/or --examples DIR")
    try:
        classes = parse_classes(args.classes)
        if args.examples is not None:
            written = write_examples(args.examples, classes)
            output.console.print(f"wrote {len(written)} example images to {args.examples}")
        return train(args.out, args.seed, classes, args.threads) if args.out is not None else 0
    except AvarcError as e:
        output.err_console.print(f"error: {e}")
        return 2


def write_examples(folder: Path, classes: tuple[int, ...], per_class: int = 2) -> list[Path]:
    """The first ``per_class`` test images of each digit, as 8-bit greyscale 8×8 PNGs named by dataset index."""
    from PIL import Image

    test_set = digits.load_digits("test")
    written = []
    for c in classes:
        for i in np.flatnonzero(test_set.labels == c)[:per_class]:
            path = folder / str(c) / f"{test_set.indices[i]}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(test_set.images[i]).save(path)
            written.append(path)
    return written


def classes_text(classes: tuple[int, ...]) -> str:
    """(0, 1, 2, 3, 4) → ``0-4``; anything else → ``1,3,7``."""
    if classes == tuple(range(classes[0], classes[-1] + 1)) and len(classes) > 1:
        return f"{classes[0]}-{classes[-1]}"
    return ",".join(map(str, classes))


def train(out: Path, seed: int, classes: tuple[int, ...], threads: int) -> int:
    cpu_start = time.process_time()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    train_set = digits.load_digits("train").subset(classes)
    test_set = digits.load_digits("test").subset(classes)
    images = digits.to_tensor(train_set.images, IMAGE_SIZE)
    labels = digits.class_index(train_set.labels, classes)

    model = build_model(model_spec(classes))
    model.var.init_weights()
    vae_cfg = TrainConfig(**VAE_TRAIN, seed=seed)
    vae_log, vae_s = run_with_progress("VQ-VAE", vae_cfg.steps,
                                       lambda cb: train_vqvae(model, images, vae_cfg, augment=AUGMENT, on_step=cb))
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed + 1)
    tokens, token_labels = token_pool(model, images, labels, POOL_COPIES, AUGMENT, gen)
    pool_s = time.perf_counter() - start
    var_cfg = TrainConfig(**VAR_TRAIN, seed=seed + 2)
    var_log, var_s = run_with_progress(
        "VAR", var_cfg.steps,
        lambda cb: train_var(model, tokens, token_labels, var_cfg, label_drop=LABEL_DROP, on_step=cb))
    start = time.perf_counter()
    acc = digits.evaluate(model, test_set, classes)
    eval_s = time.perf_counter() - start

    meta = {
        "description": "avarc demo: VQ-VAE + VAR trained from scratch on scikit-learn's 8x8 handwritten digits",
        "image_size": IMAGE_SIZE,
        "patch_nums": list(PATCH_NUMS),
        "preprocess": "resize",
        "seed": seed,
        "classes": list(classes),
        "default_profile": "digits",
        "data": {"source": "sklearn.datasets.load_digits (pixels: round(value*255/16) as 8-bit greyscale)",
                 "train_indices": [0, digits.TRAIN_END - 1], "test_indices": [digits.TRAIN_END, digits.NUM_IMAGES - 1],
                 "train_images": len(train_set), "test_images": len(test_set)},
        "training": {
            "command": f"python scripts/train_digits.py --out DIR --seed {seed} --classes {classes_text(classes)} "
                       f"--threads {threads}",
            "vqvae": {**VAE_TRAIN, "loss": "MSE + codebook + 0.25*commitment", "augment": vars(AUGMENT),
                      "final_loss": round(vae_log.mean(last=50), 4)},
            "var": {**VAR_TRAIN, "label_drop": LABEL_DROP, "pool": f"clean + {POOL_COPIES} augmented copies",
                    "pool_size": len(tokens), "final_loss": round(var_log.mean(last=50), 4)},
            "seconds": {"vqvae": round(vae_s, 1), "tokens": round(pool_s, 1), "var": round(var_s, 1),
                        "evaluate": round(eval_s, 1), "cpu_total": round(time.process_time() - cpu_start, 1)},
            "threads": threads, "torch": torch.__version__, "machine": platform.machine(),
        },
        "accuracy": {"test_images": acc.num_images, "top1": acc.top1, "top1_first_scales": acc.by_scales,
                     "top1_smoothed": acc.smoothed, "smoothing": {"samples": 1 + acc.neighbours, "sigma": acc.sigma}},
    }
    save_model_dir(model, out, **meta)
    output.table(f"test accuracy ({acc.num_images} images, digits {classes_text(classes)})", ["scales used", "top-1 %"],
                 [*[(s + 1, 100 * a) for s, a in enumerate(acc.by_scales)],
                  (f"all, {1 + acc.neighbours} samples σ {acc.sigma}", 100 * acc.smoothed)])
    output.console.print(f"wrote {out} in {vae_s + pool_s + var_s + eval_s:.0f} s "
                         f"(VQ-VAE {vae_s:.0f} s, tokens {pool_s:.0f} s, VAR {var_s:.0f} s, test {eval_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
