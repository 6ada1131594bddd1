"""The class-incremental protocol on scikit-learn's digits: base 0–4, then add 5–9 without any image of 0–4.

    python scripts/class_incremental_digits.py --out runs/cil-digits.json          # trains the base if missing
    python scripts/class_incremental_digits.py --base runs/digits-0-4 --steps 1500

Task 1 = digits 0–4, task 2 = digits 5–9. Step 1 trains a demo model on the task-1 train split (the bundled
model's recipe, ``scripts/train_digits.py --classes 0-4``). Step 2 learns 5–9 as new class rows from the task-2
train split only (``avarc.tasks.incremental.add_classes``; no replay, every base weight frozen). Both steps are tested
on the test split among all classes seen so far (PyCIL conventions): accuracy per task after each step, average
incremental accuracy (mean over steps of the accuracy on all seen classes) and forgetting (task-1 accuracy after
step 1 minus after step 2). The jointly trained 10-class model (bundled ``digits``) is the upper bound.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import digits
import torch
import train_digits

from avarc import AvarcError
from avarc.cli import output
from avarc.io.loading import load_model_dir, resolve_model
from avarc.tasks.incremental import add_classes

TASK1, TASK2 = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
ALL = TASK1 + TASK2


def by_task(model, tests: dict[str, digits.Digits], seen: tuple[int, ...]) -> dict[str, float]:
    """Top-1 (all scales, clean tokens) on each task's test images among the ``seen`` classes (class i of the model
    is digit i), and on all of them together; each image is scored once."""
    acc = {name: digits.evaluate(model, data, seen, neighbours=0).top1 for name, data in tests.items()}
    acc["all_seen"] = sum(acc[n] * len(d) for n, d in tests.items()) / sum(len(d) for d in tests.values())
    return acc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=Path("runs/digits-0-4"),
                    help="base model directory (trained if missing)")
    ap.add_argument("--joint", default="digits",
                    help="jointly trained 10-class model (upper bound; default: bundled digits)")
    ap.add_argument("--out", type=Path, default=Path("runs/cil-digits.json"), help="JSON file with the numbers")
    ap.add_argument("--steps", type=int, default=600, help="add-class training steps (default 600)")
    ap.add_argument("--lr", type=float, default=0.1, help="add-class learning rate (default 0.1)")
    ap.add_argument("--augment-sigma", type=float, default=0.0, help="latent-noise augmentation σ (default 0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    try:
        return run(args)
    except AvarcError as e:
        output.err_console.print(f"error: {e}")
        return 2


def run(args) -> int:
    torch.set_num_threads(args.threads)
    seconds = {}
    start = time.perf_counter()
    if not (args.base / "meta.json").is_file():
        train_digits.train(args.base, args.seed, TASK1, args.threads)
        seconds["train_base"] = time.perf_counter() - start
    model = load_model_dir(args.base)
    if tuple(model.meta.get("classes", ())) != TASK1:
        raise AvarcError(f"{args.base}: not a digits 0-4 base model; "
                         "train one with scripts/train_digits.py --classes 0-4")
    test = digits.load_digits("test")
    t1, t2 = test.subset(TASK1), test.subset(TASK2)

    start = time.perf_counter()
    step1 = by_task(model, {"task1": t1}, TASK1)
    seconds["evaluate_step1"] = time.perf_counter() - start

    train2 = digits.load_digits("train").subset(TASK2)
    images = {str(d): digits.to_tensor(train2.images[train2.labels == d], model.spec.image_size) for d in TASK2}
    start = time.perf_counter()
    with output.progress() as bar:
        task = bar.add_task("add 5-9", total=args.steps, info="")
        added = add_classes(model, images, steps=args.steps, lr=args.lr, batch_size=64,
                            augment_sigma=args.augment_sigma, seed=args.seed, holdout=0.0,
                            copies=train_digits.POOL_COPIES, affine=train_digits.AUGMENT,
                            on_step=lambda s, total, loss: bar.update(task, completed=s, info=f"loss {loss:.3f}"))
    seconds["add_classes"] = time.perf_counter() - start

    start = time.perf_counter()
    step2 = by_task(model, {"task1": t1, "task2": t2}, ALL)
    seconds["evaluate_step2"] = time.perf_counter() - start

    joint = None
    try:
        jm = resolve_model(args.joint, device="cpu")
        joint = by_task(jm, {"task1": t1, "task2": t2}, ALL)
    except AvarcError as e:
        output.err_console.print(f"note: no joint upper bound ({e})")

    result = {
        "protocol": "digits 0-4 then 5-9, no replay, test split, top-1 all scales (clean tokens)",
        "test_images": {"task1": len(t1), "task2": len(t2)},
        "step1": step1, "step2": step2, "joint": joint,
        "average_incremental_accuracy": (step1["all_seen"] + step2["all_seen"]) / 2,
        "forgetting_task1": step1["task1"] - step2["task1"],
        "add_class": {k: v for k, v in added.extension.training.items() if k != "images"},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "threads": args.threads,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    pct = lambda x: None if x is None else f"{100 * x:.1f}"   # noqa: E731
    rows = [("after step 1 (0-4)", pct(step1["task1"]), None, pct(step1["all_seen"])),
            ("after step 2 (+5-9, no replay)", pct(step2["task1"]), pct(step2["task2"]), pct(step2["all_seen"]))]
    if joint:
        rows.append(("joint 10-class (upper bound)", pct(joint["task1"]), pct(joint["task2"]), pct(joint["all_seen"])))
    output.table("class-incremental digits (test split, top-1 %)", ["model", "task 1 %", "task 2 %", "all seen %"],
                 rows)
    output.console.print(f"average incremental accuracy {pct(result['average_incremental_accuracy'])} %, "
                         f"forgetting {pct(result['forgetting_task1'])} points; "
                         + ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items()) + f"; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
