"""``avarc bench``: how fast the engine classifies, how much compute that is, and how close to the hardware."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from core import AvarcError
from core.bench import BenchResult, flops_only, random_model, run
from core.data import ClassSpace, collect
from core.incremental import apply_extensions
from core.model import Model, resolve_device, resolve_dtype
from core.onnx_encoder import use_encoder
from core.preprocess import preprocess_image
from core.profiles import default_profile_name, load_profile
from core.registry import resolve_model
from core.specs import official_spec

from .. import output
from ..options import BatchSizeOpt, DeviceOpt, EncoderOpt, ExtensionOpt, ModelDirOpt, SeedOpt, TrustPickleOpt, VaeOpt


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
    model_dir: ModelDirOpt = None,
    trust_pickle: TrustPickleOpt = False,
) -> None:
    """\b
    avarc bench --flops-only --classes 100 -p varc -p a-varc-plus
    avarc bench --random-weights --classes 20 -p a-varc-plus --dtype bf16 --plain
    avarc bench -m digits -p digits --images 16 --dtype fp32 --dtype bf16 --json

    Seconds per image (median/min/max after warm-up, device-synchronised), images/s, time share per stage and for the encoder, GFLOPs per image as the paper counts them and as the engine executes them after reusing earlier stages, achieved TFLOP/s (attention included) and its share of this device's measured matmul peak, peak memory, and top-1 agreement with fp32 for other dtypes.
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
    n = min(classes or min(m.num_classes, 100), m.num_classes)
    candidates = list(range(n))
    x = _inputs(m, data, images, seed)
    names = profiles or [default_profile_name(m)]
    wanted = [resolve_dtype(d, dev) for d in (dtypes or ["auto"])]
    results: list[BenchResult] = []
    for name in names:
        prof = load_profile(name)
        by_dtype: dict[torch.dtype, BenchResult] = {}
        for dt in wanted:
            m.dtype = dt
            by_dtype[dt] = run(m, prof, x, candidates, warmup, repeat, batch_size, seed)
        if any(dt != torch.float32 for dt in wanted):
            if torch.float32 not in by_dtype:
                m.dtype = torch.float32
                by_dtype[torch.float32] = run(m, prof, x, candidates, 0, 1, batch_size, seed)
            ref = by_dtype[torch.float32].preds
            for dt in wanted:
                r = by_dtype[dt]
                r.agreement_fp32 = sum(a == b for a, b in zip(r.preds, ref)) / len(ref)
        results += [by_dtype[dt] for dt in wanted]
        if plain:
            for dt in wanted:
                m.dtype = dt
                p = run(m, prof, x, candidates, warmup, repeat, batch_size, seed, reuse=False)
                p.profile = f"{name} (plain)"
                p.agreement_fp32 = sum(a == b for a, b in zip(p.preds, by_dtype[dt].preds)) / len(p.preds)
                results.append(p)
    _render(results, json_, f"{label}, {n} classes, {x.shape[0]} image(s), {torch.get_num_threads()} threads")


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
        output.table(f"GFLOPs per image ({title})", ["profile", "GFLOPs (paper)", "GFLOPs executed", "attention GFLOPs"],
                     [(r.profile, r.gflops_per_image, r.gflops_executed, r.attention_gflops_per_image) for r in results])
        return
    rows = []
    for r in results:
        s = r.s_per_image
        share = " / ".join(f"{100 * x:.0f}" for x in (r.stage_share or []))
        rows.append((r.profile, r.dtype, f"{s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f})", r.images_per_s,
                     f"{100 * (r.encoder_share or 0):.0f}% | {share}", r.gflops_per_image, r.gflops_executed, r.tflops,
                     r.peak_pct, r.peak_mem_mb, r.agreement_fp32))
    output.table(f"avarc bench: {title}, device {results[0].device if results else '-'}",
                 ["profile", "dtype", "s/image (min–max)", "images/s", "time % enc | stages", "GFLOPs paper",
                  "GFLOPs executed", "TFLOP/s", "% of peak", "peak MB", "agree fp32"], rows)
