"""Benchmarking the classification engine: seconds per image, compute, achieved throughput, memory, agreement.

Timings are taken after warm-up, over repeats, with device synchronisation; compute is counted in the paper's
convention and as executed (see ``flops.py``); the achieved rate is compared with the device's measured matmul peak
for the same dtype, so a number says how close to the hardware limit the engine runs.
"""
from __future__ import annotations

import math
import resource
import statistics
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Annotated, Sequence

import torch
from pydantic import Field, TypeAdapter
from typing_extensions import TypedDict

from ..engine.counters import engine_counters
from ..engine.flops import encoder_macs, schedule_macs
from ..engine.model import Model, build_model
from ..engine.profile import Profile
from ..engine.runtime import dtype_name
from ..engine.schedule import run_stages, sample_tokens
from ..engine.scoring import Scorer
from ..engine.torch_state import torch_settings
from ..models.specs import ModelSpec, official_spec


@dataclass
class BenchResult:
    profile: str
    dtype: str
    device: str
    s_per_image: dict[str, float] | None
    images_per_s: float | None
    gflops_per_image: float
    gflops_executed: float | None
    attention_gflops_per_image: float
    tflops: float | None
    peak_pct: float | None
    peak_mem_mb: float | None
    agreement_fp32: float | None
    stage_share: list[float] | None = None     # fraction of time per stage
    encoder_share: float | None = None
    score_err_rms: float | None = None         # first-stage class scores vs fp32's, nats (reduced precision only)
    score_err_max: float | None = None
    guard_images: float | None = None          # share of images the precision guard re-scored in fp32
    guard_share: float | None = None           # share of the time spent on it
    guard_flips: float | None = None           # share of images whose decisions the guard changed
    launches_per_forward: float | None = None  # non-view aten ops of one full-length forward (≈ kernel launches)
    host_syncs_per_step: float | None = None   # ops in one scoring step that wait for the device
    threads: int | None = None                 # CPU threads it ran on
    compiled: dict[str, int] | None = None     # compiled engine: graphs, recompiles, fallbacks of this row's runs
    preds: Annotated[list[int], Field(exclude=True)] = field(default_factory=list, repr=False)
    scores: Annotated[list[list[float]], Field(exclude=True)] = field(default_factory=list, repr=False)  # 1st stage

    def to_json(self) -> dict:
        """One row of ``bench --json`` (:data:`BENCH_JSON`), every number finite or null."""
        return BENCH_ROW.dump_python(self, mode="json")


class BenchJson(TypedDict):
    """What ``avarc bench --json`` prints: one row per (profile, dtype) measured."""

    schema: int
    results: list[BenchResult]


BENCH_ROW = TypeAdapter(BenchResult)
BENCH_JSON = TypeAdapter(BenchJson)
BENCH_SCHEMA = 1


def bench_json(results: Sequence[BenchResult]) -> dict:
    return BENCH_JSON.dump_python({"schema": BENCH_SCHEMA, "results": list(results)}, mode="json")


def random_model(depth: int, device: str | torch.device = "cpu", seed: int = 0) -> Model:
    """The official geometry of VAR-d{depth} (+ its VQ-VAE) with random weights: any depth measurable offline (torch's
    global generator, seeded for them, is put back)."""
    with torch_settings():
        torch.manual_seed(seed)
        model = build_model(official_spec(f"d{depth}"), device)
        model.var.init_weights()
    return model


def flops_only(spec: ModelSpec, profile: Profile, num_classes: int) -> BenchResult:
    """Counts without running anything (works on the meta device, for any official depth)."""
    prof = profile.resolve(len(spec.var.patch_nums))
    paper = schedule_macs(spec, prof.stages, num_classes)
    executed = schedule_macs(spec, prof.stages, num_classes, reuse=True)
    return BenchResult(profile.name, "-", "-", None, None, paper.paper / 1e9, executed.paper / 1e9,
                       paper.attention / 1e9, None, None, None, None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PEAK_SIZES = {"cpu": (1024, 2048, 4096), "cuda": (4096, 8192, 16384)}
PEAK_MIN_SECONDS = {"cpu": 0.3, "cuda": 0.15}


@lru_cache(maxsize=8)
def matmul_peak(device_str: str, dtype: torch.dtype, threads: int | None = None) -> float:
    """Measured dense matmul rate (FLOP/s) of this device and dtype, the yardstick for ``peak_pct``: large square
    GEMMs, each timed over enough repeats to last ``PEAK_MIN_SECONDS``, best of three runs, best size. (``threads``
    only keys the cache: the rate is measured with the current thread count.) Sizes grow only while one product
    takes less than ``PEAK_MIN_SECONDS``: where a dtype is emulated (bf16 on an AVX2-only CPU) the largest would
    take minutes, and a smaller product already shows the rate."""
    device = torch.device(device_str)
    kind = "cuda" if device.type == "cuda" else "cpu"
    best = 0.0
    for n in PEAK_SIZES[kind]:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        once = max(time.perf_counter() - t0, 1e-6)
        reps = max(1, math.ceil(PEAK_MIN_SECONDS[kind] / once))
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            _sync(device)
            best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
        del a, b
        if once >= PEAK_MIN_SECONDS[kind]:
            break
    return best


class _TimedScorer(Scorer):
    """Records the wall time of each stage's scoring call (one call per stage) and of the precision guard."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.stage_times: list[float] = []
        self.guard_time = 0.0

    def reset(self) -> None:
        super().reset()
        self.stage_times, self.guard_time = [], 0.0

    def _timed(self, fn, *a, **kw):
        _sync(self.model.device)
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        _sync(self.model.device)
        return out, time.perf_counter() - t0

    def score(self, *a, **kw):
        out, dt = self._timed(super().score, *a, **kw)
        self.stage_times.append(dt)
        return out

    def score_fp32(self, *a, **kw):
        out, dt = self._timed(super().score_fp32, *a, **kw)
        self.guard_time += dt
        return out


def _peak_mem_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(model: Model, profile: Profile, images: torch.Tensor, candidates: list[int], warmup: int = 1, repeat: int = 3,
        chunk: int | None = None, seed: int = 0, reuse: bool = True, cache_bytes: int | None = None) -> BenchResult:
    """Time the whole path (encoder + schedule + precision guard) on ``images`` (B, 3, R, R) at the model's dtype.
    ``cache_bytes`` fixes the keys/values the schedule may keep (None: a share of the device's free memory), so two
    devices can be made to run the same work."""
    device = model.device
    prof = profile.resolve(len(model.spec.var.patch_nums))
    scorer = _TimedScorer(model, chunk, reuse=reuse, cache_bytes=cache_bytes)
    times, enc_times, stage_times, guard_times = [], [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    compiled_before = model.compile_evidence()
    for it in range(warmup + repeat):
        _sync(device)
        t0 = time.perf_counter()
        latents = model.encode(images)
        _sync(device)
        t_enc = time.perf_counter() - t0
        tokens = sample_tokens(model, latents, prof.max_samples, prof.sigma, seed)
        macs_before, guarded_before, flips_before = scorer.macs, scorer.guarded, scorer.guard_flips
        out = run_stages(model, tokens, candidates, prof, scorer)
        _sync(device)
        if it >= warmup:
            times.append(time.perf_counter() - t0)
            enc_times.append(t_enc)
            stage_times.append(list(scorer.stage_times))
            guard_times.append(scorer.guard_time)
            linear = scorer.macs.linear - macs_before.linear
            attention = scorer.macs.attention - macs_before.attention
            guarded, flips = scorer.guarded - guarded_before, scorer.guard_flips - flips_before
    n = images.shape[0]
    per_image = [t / n for t in times]
    med = statistics.median(per_image)
    enc = encoder_macs(model.spec.vae, model.spec.image_size, model.spec.var.patch_nums)
    paper = schedule_macs(model.spec, prof.stages, len(candidates))
    executed_paper = linear / n + enc
    tflops = 2 * (executed_paper + attention / n) / med / 1e12
    peak = matmul_peak(str(device), model.dtype, torch.get_num_threads())
    total = statistics.median(times)
    shares = [statistics.median(s[k] for s in stage_times) / total for k in range(len(stage_times[0]))]
    low = model.dtype != torch.float32
    compiled = _evidence_since(compiled_before, model.compile_evidence())
    counted = engine_counters(model)          # after the timed runs: counting slows the dispatch down
    return BenchResult(
        profile=profile.name, dtype=dtype_name(model.dtype), device=str(device),
        s_per_image={"median": med, "min": min(per_image), "max": max(per_image)}, images_per_s=1 / med,
        gflops_per_image=paper.paper / 1e9, gflops_executed=executed_paper / 1e9,
        attention_gflops_per_image=paper.attention / 1e9, tflops=tflops, peak_pct=100 * tflops * 1e12 / peak,
        peak_mem_mb=_peak_mem_mb(device), agreement_fp32=None, stage_share=shares,
        encoder_share=statistics.median(enc_times) / total,
        guard_images=guarded / n if low else None, guard_share=statistics.median(guard_times) / total if low else None,
        guard_flips=flips / n if low else None, **counted, threads=torch.get_num_threads(), compiled=compiled,
        preds=[p.pred for p in out], scores=[p.stages[0].scores for p in out],
    )


def _evidence_since(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int] | None:
    """A compiled row's graphs, recompiles and fallbacks: what its own runs (warm-up included) added."""
    return None if before is None or after is None else {k: after[k] - before[k] for k in after}


def _agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(b)


def compare(model: Model, profiles: list[Profile], images: torch.Tensor, candidates: list[int],
            dtypes: list[torch.dtype], warmup: int = 1, repeat: int = 3, chunk: int | None = None, seed: int = 0,
            plain: bool = False, results: list[BenchResult] | None = None) -> list[BenchResult]:
    """Every profile at every dtype; reduced precision is checked against an fp32 run (top-1 agreement, first-stage
    score error) and, with ``plain``, every dtype is also timed without reuse across stages (agreement with the
    optimised path). Rows are appended to ``results`` as they finish, so a caller keeps them when a later run
    fails. The model's dtype is restored afterwards."""
    results = [] if results is None else results
    for prof in profiles:
        by_dtype: dict[torch.dtype, BenchResult] = {}
        for dt in dtypes:
            with model.computing_in(dt):
                by_dtype[dt] = run(model, prof, images, candidates, warmup, repeat, chunk, seed)
            results.append(by_dtype[dt])
        if any(dt != torch.float32 for dt in dtypes):
            if torch.float32 not in by_dtype:
                with model.computing_in(torch.float32):
                    by_dtype[torch.float32] = run(model, prof, images, candidates, 0, 1, chunk, seed)
            ref = by_dtype[torch.float32]
            for dt in dtypes:
                r = by_dtype[dt]
                r.agreement_fp32 = _agreement(r.preds, ref.preds)
                if dt != torch.float32:
                    err = torch.tensor(r.scores) - torch.tensor(ref.scores)
                    r.score_err_rms, r.score_err_max = err.pow(2).mean().sqrt().item(), err.abs().max().item()
        if plain:
            for dt in dtypes:
                with model.computing_in(dt):
                    p = run(model, prof, images, candidates, warmup, repeat, chunk, seed, reuse=False)
                p.profile = f"{prof.name} plain"
                p.agreement_fp32 = _agreement(p.preds, by_dtype[dt].preds)
                results.append(p)
    return results
