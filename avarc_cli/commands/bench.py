"""``avarc bench``: how fast the engine classifies, how much compute that is, and how close to the hardware."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from core import AvarcError
from core.runs.bench import BenchResult, compare, flops_only, random_model
from core.io.data import ClassSpace, collect
from core.tasks.incremental import apply_extensions
from core.engine.model import Model
from core.engine.runtime import resolve_compile, resolve_device, resolve_dtype
from core.io.onnx_encoder import use_encoder
from core.io.preprocess import preprocess_image
from core.io.profiles import default_profile_name, load_profile
from core.io.loading import resolve_model
from core.models.specs import official_spec
from core.engine.runtime import set_threads

from .. import output
from ..options import (BatchSizeOpt, DeviceOpt, EncoderOpt, ExtensionOpt, ModelDirOpt, SeedOpt, ThreadsOpt, TrustPickleOpt,
                       VaeOpt)


def bench(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Registry name, model directory or VAR file (default: digits, or --random-weights).")] = None,
    vae: VaeOpt = None,
    extension: ExtensionOpt = None,
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Official geometry of --depth with random weights (no download needed).")] = False,
    depth: Annotated[int, typer.Option("--depth", help="Depth of the official geometry for --random-weights / --flops-only (16, 20, 24, 30, 36).")] = 16,
    profiles: Annotated[Optional[list[str]], typer.Option("--profile", "-p", help="Profile(s) to measure (repeatable; default: the model's own).")] = None,
    classes: Annotated[Optional[int], typer.Option("--classes", min=1, help="Number of candidate classes (the first N; default: all, at most 100).")] = None,
    images: Annotated[int, typer.Option("--images", min=1, help="Images per timed run.")] = 1,
    data: Annotated[Optional[list[Path]], typer.Option("--data", help="Real images to use (files/folders) instead of seeded random pixels.")] = None,
    device: DeviceOpt = "auto",
    dtypes: Annotated[Optional[list[str]], typer.Option("--dtype", help="Dtype(s) to measure (repeatable): auto, fp32, bf16, fp16.")] = None,
    batch_size: BatchSizeOpt = None,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs first.")] = 1,
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="Timed runs (median, min, max reported).")] = 3,
    encoder: EncoderOpt = "torch",
    plain: Annotated[bool, typer.Option("--plain", help="Also time the unoptimised path (no reuse across stages) and report agreement with it.")] = False,
    flops_only_: Annotated[bool, typer.Option("--flops-only", help="Only count GFLOPs per image (paper convention and executed); runs nothing.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    compile_: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="Fuse the engine's elementwise work with torch.compile (default: on CUDA with Triton, off on CPUs; the first run compiles, later ones reuse the cache).")] = None,
    model_dir: ModelDirOpt = None,
    trust_pickle: TrustPickleOpt = False,
) -> None:
    """\b
    avarc bench --flops-only --classes 100 -p varc -p a-varc-plus
    avarc bench --random-weights --classes 20 -p a-varc-plus --dtype bf16 --plain
    avarc bench -m digits -p digits --images 16 --dtype fp32 --dtype bf16 --json

    Seconds per image (median/min/max after warm-up, device-synchronised), images/s, time share per stage and for the encoder, GFLOPs per image as the paper counts them and as the engine executes them after reusing earlier stages, achieved TFLOP/s (attention included) and its share of this device's measured matmul peak (large square GEMMs, best of several runs), peak memory; for bf16/fp16: top-1 agreement with fp32, the error of the first stage's class scores against fp32, and how many images the precision guard re-scored in fp32 and at what share of the time.
    """
    if extension and (random_weights or model is None and flops_only_):
        raise AvarcError("--extension needs the base model it was trained on; pass it with --model")
    if flops_only_:
        spec, k = official_spec(f"d{depth}"), None
        if model is not None:
            fm = resolve_model(model, vae, "cpu", model_dir=model_dir, trust_pickle=trust_pickle)
            apply_extensions(fm, extension)
            spec, k = fm.spec, fm.num_classes
        names = profiles or ["varc", "a-varc-plus", "smooth-top10"]
        n = classes or min(k or spec.var.num_classes, 100)
        _render([flops_only(spec, load_profile(p), n) for p in names], json_, f"{n} classes", flops=True)
        return

    dev = resolve_device(device)
    if random_weights:
        m = random_model(depth, dev, seed)
        label = f"random-weights d{depth}"
    else:
        m = resolve_model(model or "digits", vae, dev, model_dir=model_dir, trust_pickle=trust_pickle)
        apply_extensions(m, extension)
        label = model or "digits"
    use_encoder(m, encoder)
    n_threads = set_threads(m.spec.var, threads)
    m.compile = resolve_compile(compile_, dev)
    n = min(classes or min(m.num_classes, 100), m.num_classes)
    x = _inputs(m, data, images, seed)
    wanted = [resolve_dtype(d, dev) for d in (dtypes or ["auto"])]
    title = f"{label}, {n} classes, {x.shape[0]} image(s), {n_threads} threads" + (", compiled" if m.compile else "")
    results: list[BenchResult] = []
    try:
        compare(m, [load_profile(p) for p in profiles or [default_profile_name(m)]], x, list(range(n)), wanted,
                warmup, repeat, batch_size, seed, plain, results)
    except BaseException:
        if results:      # what was measured before the failure or Ctrl-C is kept
            _render(results, json_, title + " (incomplete: a later run failed)")
        raise
    _render(results, json_, title)


def _inputs(m: Model, data: Optional[list[Path]], n: int, seed: int) -> torch.Tensor:
    """The first n images of --data (preprocessed for the model), or n seeded random images."""
    size = m.spec.image_size
    if data:
        items = collect(data, ClassSpace(m), labels="none").items[:n]
        if not items:
            raise AvarcError(f"{data[0]}: no images found; pass image files or folders to --data")
        return torch.stack([preprocess_image(it.path, size, m.spec.preprocess) for it in items])
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _render(results: list[BenchResult], as_json: bool, title: str, flops: bool = False) -> None:
    if as_json:
        output.emit_json({"results": [r.to_json() for r in results]})
        return
    if flops:
        output.table(f"GFLOPs per image ({title})", ["profile", "paper", "executed", "attention"],
                     [(r.profile, r.gflops_per_image, r.gflops_executed, r.attention_gflops_per_image) for r in results])
        return
    device = results[0].device if results else "-"
    g3 = lambda x: None if x is None else f"{x:.3g}"  # noqa: E731
    pct = lambda x: None if x is None else f"{100 * x:.0f}%"  # noqa: E731
    output.table(f"Speed: {title}, {device}", ["profile", "dtype", "s/image", "img/s", "TFLOP/s", "% peak", "peak MB"],
                 [(r.profile, r.dtype, g3(r.s_per_image["median"]), g3(r.images_per_s), g3(r.tflops),
                   f"{r.peak_pct:.0f}", f"{r.peak_mem_mb:.0f}") for r in results])
    output.table("Work per image: GFLOPs (paper convention, executed after reuse), time share of encoder and stages, "
                 "launches (aten ops) per forward, host syncs per scoring step",
                 ["profile", "dtype", "GFLOPs", "executed", "attention", "enc %", "stages %", "launches/fwd",
                  "syncs/step"],
                 [(r.profile, r.dtype, g3(r.gflops_per_image), g3(r.gflops_executed), g3(r.attention_gflops_per_image),
                   f"{100 * (r.encoder_share or 0):.0f}", " ".join(f"{100 * x:.0f}" for x in r.stage_share or []),
                   g3(r.launches_per_forward), g3(r.host_syncs_per_step)) for r in results])
    if any(r.agreement_fp32 is not None for r in results):
        output.table("Precision: top-1 agreement with fp32 (plain: with the optimised path), first-stage score error "
                     "vs fp32 (nats), precision guard (images re-scored in fp32, time share)",
                     ["profile", "dtype", "agree", "err RMS", "err max", "guarded", "guard time"],
                     [(r.profile, r.dtype, pct(r.agreement_fp32), g3(r.score_err_rms), g3(r.score_err_max),
                       pct(r.guard_images), pct(r.guard_share)) for r in results])
