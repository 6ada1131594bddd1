"""Benchmarking the classification engine: seconds per image, compute, achieved throughput, memory, agreement.

Timings are taken after warm-up, over repeats, with device synchronisation; compute is counted in the paper's
convention and as executed (see ``flops.py``); the achieved rate is compared with the device's measured matmul peak
for the same dtype, so a number says how close to the hardware limit the engine runs.
"""
from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import torch

from .schedule import noise_generator, run_stages, sample_tokens
from .flops import encoder_macs, schedule_macs
from .model import Model, build_model, dtype_name
from .profiles import Profile
from .scoring import Scorer
from .specs import ModelSpec, official_spec


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
    preds: list[int] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("preds")
        return d


def random_model(depth: int, device: str | torch.device = "cpu", seed: int = 0) -> Model:
    """The official geometry of VAR-d{depth} (+ its VQ-VAE) with random weights: any depth measurable offline."""
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


@lru_cache(maxsize=8)
def matmul_peak(device_str: str, dtype: torch.dtype) -> float:
    """Measured dense matmul rate (FLOP/s) of this device and dtype: the yardstick for ``peak_pct``."""
    device = torch.device(device_str)
    n = 256
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b
        _sync(device)
        t0 = time.perf_counter()
        reps = 3
        for _ in range(reps):
            a @ b
        _sync(device)
        dt = (time.perf_counter() - t0) / reps
        if dt > 0.05 or n >= 8192:
            return 2 * n ** 3 / dt
        n *= 2


class _TimedScorer(Scorer):
    """Records the wall time of each stage's scoring call (one call per stage)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.stage_times: list[float] = []

    def reset(self) -> None:
        super().reset()
        self.stage_times = []

    def score(self, *a, **kw):
        _sync(self.model.device)
        t0 = time.perf_counter()
        out = super().score(*a, **kw)
        _sync(self.model.device)
        self.stage_times.append(time.perf_counter() - t0)
        return out


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(model: Model, profile: Profile, images: torch.Tensor, candidates: list[int], warmup: int = 1, repeat: int = 3,
        chunk: int | None = None, seed: int = 0, reuse: bool = True) -> BenchResult:
    """Time the whole path (encoder + schedule) on ``images`` (B, 3, R, R) at the model's dtype."""
    device = model.device
    prof = profile.resolve(len(model.spec.var.patch_nums))
    gens_for = lambda: [noise_generator(seed, f"bench{i}") for i in range(images.shape[0])]  # noqa: E731
    scorer = _TimedScorer(model, chunk, reuse=reuse)
    times, enc_times, stage_times, preds = [], [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for it in range(warmup + repeat):
        _sync(device)
        t0 = time.perf_counter()
        latents = model.encode(images)
        _sync(device)
        t_enc = time.perf_counter() - t0
        tokens = sample_tokens(model, latents, prof.max_samples, prof.sigma, gens_for())
        macs_before = scorer.macs
        out = run_stages(model, tokens, candidates, prof, scorer)
        _sync(device)
        if it >= warmup:
            times.append(time.perf_counter() - t0)
            enc_times.append(t_enc)
            stage_times.append(list(scorer.stage_times))
            linear = scorer.macs.linear - macs_before.linear
            attention = scorer.macs.attention - macs_before.attention
        preds = [p.pred for p in out]
    n = images.shape[0]
    per_image = [t / n for t in times]
    med = statistics.median(per_image)
    enc = encoder_macs(model.spec.vae, model.spec.image_size, model.spec.var.patch_nums)
    paper = schedule_macs(model.spec, prof.stages, len(candidates))
    executed_paper = linear / n + enc
    tflops = 2 * (executed_paper + attention / n) / med / 1e12
    peak = matmul_peak(str(device), model.dtype)
    total = statistics.median(times)
    shares = [statistics.median(s[k] for s in stage_times) / total for k in range(len(stage_times[0]))]
    return BenchResult(
        profile=profile.name, dtype=dtype_name(model.dtype), device=str(device),
        s_per_image={"median": med, "min": min(per_image), "max": max(per_image)}, images_per_s=1 / med,
        gflops_per_image=paper.paper / 1e9, gflops_executed=executed_paper / 1e9,
        attention_gflops_per_image=paper.attention / 1e9, tflops=tflops, peak_pct=100 * tflops * 1e12 / peak,
        peak_mem_mb=_peak_mem_mb(device), agreement_fp32=None, stage_share=shares,
        encoder_share=statistics.median(enc_times) / total, preds=preds,
    )
