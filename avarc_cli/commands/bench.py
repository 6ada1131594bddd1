"""``avarc bench``: how fast the engine classifies, how much compute that is, and how close to the hardware."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from ..options import DtypesOpt, JsonOpt, ModelOptions, SeedOpt, model_options, opt


@model_options("dtype")
def bench(
    opts: ModelOptions,
    model: Annotated[Optional[str], opt("--model", "-m", metavar="NAME",
                                        help="Registry name, folder or VAR file (default: digits).")] = None,
    random_weights: Annotated[bool, opt("--random-weights", help="Official --depth geometry, random weights.")] = False,
    depth: Annotated[int, opt("--depth", metavar="N", help="Official depth: 16, 20, 24, 30, 36.",
                              show_default=True)] = 16,
    profiles: Annotated[Optional[list[str]], opt("--profile", "-p", metavar="NAME", help="Profile(s) to measure "
                                                 "(repeatable; default: the model's).")] = None,
    num_classes: Annotated[Optional[int], opt("--num-classes", min=1, metavar="N",
                                              help="Candidate classes: the first N (default: all, ≤ 100).")] = None,
    dtypes: DtypesOpt = None,
    images: Annotated[int, opt("--images", min=1, metavar="N", help="Images per timed run.", show_default=True)] = 1,
    data: Annotated[Optional[list[Path]], opt("--data", metavar="PATH",
                                              help="Real images (files/folders), not random pixels.")] = None,
    warmup: Annotated[int, opt("--warmup", min=0, metavar="N", help="Untimed runs first.", show_default=True)] = 1,
    repeat: Annotated[int, opt("--repeat", min=1, metavar="N", help="Timed runs.", show_default=True)] = 3,
    plain: Annotated[bool, opt("--plain", help="Also time the path without reuse across stages.")] = False,
    flops_only_: Annotated[bool, opt("--flops-only", help="Only count GFLOPs per image; runs nothing.")] = False,
    json_: JsonOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """\b
    avarc bench --flops-only --num-classes 100 -p varc -p a-varc-plus
    avarc bench --random-weights --num-classes 20 --dtype bf16 --plain
    avarc bench -m digits -p digits --images 16 --dtype fp32 --dtype bf16 --json

    Seconds per image, GFLOPs per image (paper convention and executed), achieved TFLOP/s against this device's
    measured matmul peak, the process's peak memory, and for bf16/fp16 the agreement with fp32 (README, Performance).
    """

    from avarc.engine.runtime import resolve_dtype
    from avarc.errors import AvarcError
    from avarc.io.profiles import load_profile
    from avarc.models.specs import official_spec
    from avarc.runs.bench import compare, flops_only, random_model

    from .. import output
    from ..render import bench_tables

    if opts.extension and (random_weights or model is None and flops_only_):
        raise AvarcError("--extension needs the base model it was trained on; pass it with --model")
    if flops_only_:
        spec, k = official_spec(f"d{depth}"), None
        if model is not None:
            clf = opts.load(model, device="cpu", cuda_graphs=False)     # counted, not run
            spec, k = clf.spec, clf.model.num_classes
        n = num_classes or min(k or spec.var.num_classes, 100)
        names = profiles or ["varc", "a-varc-plus", "smooth-top10"]
        bench_tables([flops_only(spec, load_profile(p), n) for p in names], json_, f"{n} classes", flops=True)
        return
    if random_weights:
        from avarc import Classifier
        from avarc.engine.runtime import resolve_device
        clf = Classifier.from_pretrained(random_model(depth, resolve_device(opts.device), seed), device=opts.device,
                                         threads=opts.threads, compile=opts.compile, encoder=opts.encoder,
                                         cuda_graphs=opts.cuda_graphs)
    else:
        clf = opts.load(model or "digits")
    label = f"random-weights d{depth}" if random_weights else model or "digits"
    n = min(num_classes or min(clf.model.num_classes, 100), clf.model.num_classes)
    x = _inputs(clf, data, images, seed)
    wanted = [resolve_dtype(d, clf.device) for d in (dtypes or ["auto"])]
    title = (f"{label}, {n} classes, {x.shape[0]} image(s), {clf.threads} threads"
             + (", compiled" if clf.model.compile else "") + (", CUDA graphs" if clf.model.graphs else ""))
    results: list = []
    measured = [load_profile(p) for p in profiles] if profiles else [clf.profile]
    try:
        with output.err_console.status(f"measuring {len(measured)} profile(s) × {len(wanted)} dtype(s) on {label}…"), \
                clf.settings():
            compare(clf.model, measured, x, list(range(n)), wanted, warmup, repeat, opts.batch_size, seed, plain,
                    results)
    except BaseException:
        if results:      # what was measured before the failure or Ctrl-C is kept
            bench_tables(results, json_, title + " (incomplete: a later run failed)")
        raise
    bench_tables(results, json_, title)


def _inputs(clf, data: Optional[list[Path]], n: int, seed: int):  # noqa: ANN001, ANN202 (a Classifier → a tensor)
    """The first n images of --data (preprocessed for the model), or n seeded random images."""
    import torch

    from avarc.errors import AvarcError
    from avarc.io.data import collect
    if data:
        paths = [it.path for it in collect(data, clf.space, "none").items]
        if not paths:
            raise AvarcError(f"{data[0]}: no images found; pass image files or folders to --data")
        return torch.stack([clf.preprocess(p) for p in paths[:n]])
    size = clf.spec.image_size
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
