"""One-shot check of avarc on an accelerator, sized to finish in 8 minutes on an H100 or an H200: correctness
(tokens equal to the CPU goldens, fp32 log-probs of the eager and the compiled engine against the goldens, bf16 score
error, which encoder layouts keep the tokens at the official VQ-VAE's real geometry, the engine tests on the device)
and speed (d16 with 100 and 1000 classes, compiled and eager, d30 with 100, the digits demo: MFU against the measured
matmul peak and the data-sheet peak, compiled graphs/recompiles/fallbacks and launches per row, the Scorer's real
host syncs per stage, peak memory, the device's busy share). Writes one JSON report, rewritten after every section;
each section runs on its own, so one failure does not lose the others, and a section that would not finish before
the time budget is skipped with a line saying so. Ends with pass/fail lines for the issue's targets.

    python3 scripts/device_check.py [REPORT.json] [--cpu-smoke]

``--cpu-smoke`` runs every section on the CPU at tiny sizes, the compiled ones included (CPU inductor), to prove
the script end to end (``tests/test_device_check.py`` runs it). Run from the repository root (see
scripts/device_check.sh). Environment: ``DEVICE_CHECK_BUDGET`` (seconds for all sections, default 450),
``DEVICE_CHECK_SPEC`` (the data-sheet peaks of a card the table below lacks, e.g. ``bf16=362,fp32=91.6``, TFLOP/s).
"""
from __future__ import annotations

import collections
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import digits
import numpy as np
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from avarc.engine.counters import SYNC_OPS, engine_counters
from avarc.engine.graphs import ForwardGraphs
from avarc.engine.model import Model
from avarc.engine.profile import Profile
from avarc.engine.runtime import resolve_device
from avarc.engine.schedule import run_stages, sample_tokens
from avarc.engine.scoring import Scorer
from avarc.engine.tokenizer import encode, tokenize_latent
from avarc.io.loading import load_model, resolve_model
from avarc.io.preprocess import preprocess_image
from avarc.io.profiles import load_profile
from avarc.models.checkpoints import load_into, unfilled, unwrap
from avarc.models.specs import infer_vae_spec, official_spec
from avarc.models.vqvae import VQVAE
from avarc.runs.bench import BenchResult, compare, matmul_peak, random_model
from avarc.runs.bench import run as bench_run

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE = ROOT / "tests" / "data" / "conformance"
T0 = time.perf_counter()
BUDGET_S = float(os.environ.get("DEVICE_CHECK_BUDGET", 450))   # the shell's hard timeout (540 s) leaves room after

# Data-sheet dense peaks (TFLOP/s) by device name, first match wins: bf16 tensor cores and plain fp32 (the fp32
# engine is exact: TF32 off). SXM unless named; NVL and PCIe cards run lower clocks.
SPEC_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp32": 60.0}),
    ("H200 NVL", {"bf16": 835.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp32": 67.0}),
    ("H200", {"bf16": 989.0, "fp32": 67.0}),      # GH200 too
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
)
# The targets: MFU of the data-sheet peak, read off the first of these sections with the row (the compiled one;
# the smoke run compiles no a-varc-plus bf16 row and reads the eager one).
TARGETS = (("d16 x 100 classes a-varc-plus bf16", ("bench_d16_compiled", "bench_d16"), 40.0),
           ("d16 x 1000 classes a-varc-plus bf16", ("bench_d16_1000",), 50.0))


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


@dataclass
class Check:
    """What every section needs: the device, smoke or not, the report, the models built so far (one d16 serves
    the eager, compiled, 1000-class, profiled and sync-counting sections, so it compiles once)."""

    dev: torch.device
    smoke: bool
    report: dict
    models: dict[str, Model] = field(default_factory=dict)

    def left(self) -> float:
        return BUDGET_S - (time.perf_counter() - T0)

    def model(self, key: str) -> Model:
        """``official256`` (the conformance model), ``d16``/``d30`` (official geometry, random weights; the smoke run
        takes the conformance model for these), ``digits`` (the bundled model)."""
        if self.smoke and key in ("d16", "d30"):
            key = "official256"
        if key not in self.models:
            if key in ("official256", "shared512"):
                d = CONFORMANCE / key
                self.models[key] = load_model(d / "var.pth", d / "vae.pth", device=self.dev)
            elif key == "digits":
                self.models[key] = resolve_model("digits", device=self.dev)
            else:
                self.models[key] = random_model(int(key[1:]), self.dev)
        return self.models[key]

    def section(self, name: str, fn: Callable[[], dict], needs: float) -> None:
        """Run one section if ``needs`` seconds (its pessimistic estimate on an H100) are left; its result, error or
        skip goes into the report, which is rewritten after every section."""
        if self.left() < needs and not self.smoke:
            self.report[name] = {"skipped": f"{self.left():.0f} s of the budget left, needs ~{needs:.0f} s"}
            say(f"{name} SKIPPED: {self.report[name]['skipped']}")
            write(self.report)
            return
        say(f"{name} …")
        t = time.perf_counter()
        try:
            self.report[name] = fn()
            self.report[name]["seconds"] = round(time.perf_counter() - t, 1)
            say(f"{name} done in {time.perf_counter() - t:.1f}s: {json.dumps(self.report[name])[:300]}")
        except Exception as e:  # noqa: BLE001 (a section's failure is data for the report)
            self.report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:],
                                 "seconds": round(time.perf_counter() - t, 1)}
            say(f"{name} FAILED: {type(e).__name__}: {e}")
        finally:
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()
        write(self.report)


def write(report: dict) -> None:
    path = Path(report["report_path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


@contextmanager
def compiled(m: Model, on: bool) -> Iterator[Model]:
    """The engine compiled or eager for a ``with`` block (the compiled graphs are kept across switches)."""
    own, m.compile = m.compile, on
    try:
        yield m
    finally:
        m.compile = own


# --- environment and yardsticks -------------------------------------------------------------------------------------

def environment(c: Check) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(c.dev),
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if c.dev.type == "cuda":
        p = torch.cuda.get_device_properties(c.dev)
        env.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gb=round(p.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, sms=p.multi_processor_count,
                   free_gb=round(torch.cuda.mem_get_info(c.dev)[0] / 2**30, 1))
    return {**env, "spec_tflops": spec_peaks(c.dev)}


def spec_peaks(dev: torch.device) -> dict[str, float] | None:
    """The data-sheet peaks of this device (``DEVICE_CHECK_SPEC`` first; None for a CPU or an unlisted card)."""
    given = os.environ.get("DEVICE_CHECK_SPEC")
    if given:
        return {k.strip(): float(v) for k, v in (kv.split("=") for kv in given.split(","))}
    return spec_for(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None


def spec_for(name: str) -> dict[str, float] | None:
    """The data-sheet peaks of a card by its name (``torch.cuda.get_device_name``), the first entry it contains."""
    return next((v for k, v in SPEC_TFLOPS if k in name), None)


def peak(c: Check) -> dict:
    """The measured dense matmul peak, the yardstick of every row's ``mfu_pct`` (bench measures it the same way)."""
    dtypes = (torch.bfloat16,) if c.smoke else (torch.bfloat16, torch.float32)
    out = {f"{str(dt).removeprefix('torch.')}_tflops": matmul_peak(str(c.dev), dt, torch.get_num_threads()) / 1e12
           for dt in dtypes}
    spec = spec_peaks(c.dev)
    if spec and not c.smoke:
        out["measured_of_spec_pct"] = round(100 * out["bfloat16_tflops"] / spec["bf16"], 1)
    return out


# --- correctness ----------------------------------------------------------------------------------------------------

def _golden(name: str, images: int | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """A conformance set's meta.json and golden arrays (of its first ``images`` images only, if given)."""
    d = CONFORMANCE / name
    meta = json.loads((d / "meta.json").read_text())
    meta["images"] = meta["images"][:images]
    golden = {k: torch.from_numpy(v) for k, v in np.load(d / "golden.npz").items()}
    return meta, {k: v[:images] if k in ("latent", "tokens", "logp") else v for k, v in golden.items()}


def _images(size: int, names: list[str] | None = None) -> torch.Tensor:
    """The conformance images (those named, else all), preprocessed the official way at ``size`` px (on the CPU)."""
    paths = sorted((CONFORMANCE / "images").iterdir())
    if names is not None:
        paths = [next(p for p in paths if p.stem == s) for s in names]
    return torch.stack([preprocess_image(p, size) for p in paths])


def tokens_and_scores(c: Check) -> dict:
    """Tokens on the device equal the CPU golden exactly; fp32 log-probs vs the golden; bf16 class-score error."""
    out = {}
    for name in ("official256",) if c.smoke else ("official256", "shared512"):
        meta, golden = _golden(name, 2 if c.smoke else None)
        m = c.model(name)
        tokens = m.tokenize(_images(meta["image_size"], meta["images"])).cpu()
        K = meta["num_classes"] + 1
        fp32 = m.token_logp(golden["tokens"], range(K))
        with m.computing_in(torch.bfloat16):
            bf16 = m.token_logp(golden["tokens"], range(K))
        err = bf16.sum(-1) - fp32.sum(-1)
        out[name] = {"tokens_equal_cpu": bool(torch.equal(tokens, golden["tokens"])),
                     "tokens_differing": int((tokens != golden["tokens"]).sum()),
                     "fp32_logp_max_err": float((fp32 - golden["logp"]).abs().max()),
                     "bf16_score_err_rms": float(err.pow(2).mean().sqrt()),
                     "bf16_score_err_max": float(err.abs().max()),
                     "bf16_top1_agrees": float((bf16.sum(-1).argmax(1) == fp32.sum(-1).argmax(1)).float().mean())}
        if name != "official256":
            c.models.pop(name)
    return out


def compiled_conformance(c: Check) -> dict:
    """fp32 log-probs of the compiled engine against the golden (within 1e-4 per token), with the graphs it compiled
    and the block calls that ran compiled code (0 would mean it silently ran eager)."""
    meta, golden = _golden("official256", 2 if c.smoke else None)
    with compiled(c.model("official256"), True) as m:
        runs = m.compiled_block.runs
        lp = m.token_logp(golden["tokens"], range(meta["num_classes"] + 1))
        return {"fp32_logp_max_err": float((lp - golden["logp"]).abs().max()), "compiled": m.compile_evidence(),
                "compiled_runs": m.compiled_block.runs - runs}


def manifest_vae(dev: torch.device, seed: int = 0) -> VQVAE:
    """The official VQ-VAE (vae_ch160v4096z32) built from its key/shape manifest in tests/data, loaded strictly
    with random weights (fan-in scaled, so activations stay in range): the real geometry, no download."""
    entry = json.loads((CONFORMANCE / "official_manifest.json").read_text())["vae_ch160v4096z32.pth"]
    g = torch.Generator().manual_seed(seed)

    def weight(name: str, shape: list[int]) -> torch.Tensor:
        if len(shape) > 1:
            return torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        return (1.0 if name.endswith("weight") else 0.0) + 0.02 * torch.randn(shape, generator=g)

    sd = unwrap({k: weight(k, v) for k, v in entry["params"].items()}, "vae")
    with unfilled():
        vae = VQVAE(infer_vae_spec(sd), official_spec("vae").var.patch_nums)
    load_into(vae, sd, "official_manifest.json", "VQ-VAE")
    return vae.eval().requires_grad_(False).to(dev)


def _layouts(vae: VQVAE, images: torch.Tensor, ref: torch.Tensor | None, timed: torch.Tensor | None,
             dev: torch.device) -> dict:
    """Each encoder layout (NCHW, channels_last; with and without cudnn.benchmark on a GPU): tokens of ``images``
    against ``ref`` (None: latents only), the largest latent change against NCHW, seconds per call on ``timed``
    (None: on ``images`` themselves)."""
    out, saved = {}, torch.backends.cudnn.benchmark
    images = images.to(dev)
    timed = images if timed is None else timed.to(dev)
    base = encode(vae, images)
    try:
        for layout in (torch.contiguous_format, torch.channels_last):
            for bench in (False, True) if dev.type == "cuda" else (False,):
                torch.backends.cudnn.benchmark = bench
                vae.to(memory_format=layout)
                x = timed.contiguous(memory_format=layout)
                encode(vae, x)                                  # warm-up (benchmark picks its algorithms here)
                _sync(dev)
                t = time.perf_counter()
                lat = encode(vae, x)
                _sync(dev)
                seconds = time.perf_counter() - t
                if timed is not images:                         # the tokens' images, in this layout
                    lat = encode(vae, images.contiguous(memory_format=layout))
                key = f"{'channels_last' if layout == torch.channels_last else 'nchw'}/benchmark={bench}"
                row: dict = {"latent_max_change": float((lat - base).abs().max()), "seconds": round(seconds, 4),
                             "images_per_s": round(len(x) / seconds, 1)}
                if ref is not None:
                    tokens = tokenize_latent(vae, lat).cpu()
                    row.update(tokens_equal=bool(torch.equal(tokens, ref)), tokens_differing=int((tokens != ref).sum()))
                out[key] = row
    finally:
        vae.to(memory_format=torch.contiguous_format)
        torch.backends.cudnn.benchmark = saved
    return out


def encoder_layouts(c: Check) -> dict:
    """Which encoder layouts keep every token, and how fast each is: on the conformance VQ-VAE against its golden
    tokens, and on the official architecture at its real geometry (256 px; random weights, built from the manifest)
    against the tokens the CPU computes with the same weights, timed on 32 images. A faster layout may become a
    device's default only where every token stays the CPU's (on the 2-core EPYC channels_last moved latents by up to
    2.6e-2 and changed tokens, so the CPU keeps NCHW). The smoke run takes the real architecture at 32 px (a few
    seconds on one core instead of minutes), where it compares latents only."""
    meta, golden = _golden("official256", 2 if c.smoke else None)
    m = c.model("official256")
    out = {"official256": _layouts(m.vae, _images(meta["image_size"], meta["images"]), golden["tokens"], None, c.dev)}
    size = 32 if c.smoke else 256
    vae = manifest_vae(torch.device("cpu"))
    real = _images(size)
    ref = None if c.smoke else tokenize_latent(vae, encode(vae, real))     # the CPU's tokens
    timed = None if c.smoke else torch.rand(32, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vae = vae if c.dev.type == "cpu" else copy.deepcopy(vae).to(c.dev)
    out[f"vae_ch160v4096z32@{size}px"] = _layouts(vae, real, ref, timed, c.dev)
    return out


def tests(c: Check) -> dict:
    """The engine's tests on the accelerator (their CPU variants are deselected: the CPU suite runs elsewhere), in a
    subprocess given whatever remains of the budget (no fixed cap)."""
    files = ["tests/test_engine.py"] if c.smoke else ["tests/test_conformance.py", "tests/test_likelihood.py",
                                                       "tests/test_scoring.py", "tests/test_engine.py",
                                                       "tests/test_digits.py::test_bf16_agrees_with_fp32",
                                                       "tests/test_device_plan.py::test_on_cuda_stages_wait_only_in_host_read"
                                                       "_and_graphs_change_nothing",
                                                       "tests/test_device_plan.py::test_on_cuda_encoding_on_a_side_stream_"
                                                       "changes_no_record"]
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    args += ["-k", "threads or margin"] if c.smoke else ["-k", "not cpu"]
    limit = max(c.left() - 5, 60 if c.smoke else 20)
    try:
        r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"returncode": None, "summary": f"stopped after {limit:.0f} s (the budget's rest)",
                "output_tail": out[-1000:], "failures": []}
    tail = (r.stdout + r.stderr).strip().splitlines()
    return {"returncode": r.returncode, "summary": tail[-1] if tail else "", "timeout_s": round(limit),
            "failures": [ln for ln in tail if ln.startswith(("FAILED", "ERROR"))][:20]}


# --- speed ----------------------------------------------------------------------------------------------------------

def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _unguarded(name: str) -> Profile:
    """A shipped profile with the precision guard off: random weights put every image's top two within its margin,
    so the guard would re-score every image in fp32 (trained models: a few per cent; see bench_demo)."""
    return replace(load_profile(name), guard_margin=0.0)


def _inputs(m: Model, n: int) -> torch.Tensor:
    return torch.rand(n, 3, m.spec.image_size, m.spec.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _rows(c: Check, rows: list[BenchResult], runs: int | None = None) -> list[dict]:
    """Bench rows with MFU against the measured matmul peak (``mfu_pct``) and the data-sheet peak (``mfu_spec_pct``,
    None where the card is unlisted); ``compiled`` says graphs, recompiles and fallbacks (None: eager) and
    ``compiled_runs`` the block calls that ran compiled code."""
    spec = spec_peaks(c.dev)
    out = []
    for r in rows:
        peak_spec = None if spec is None else spec.get(r.dtype)
        out.append({**r.to_json(), "mfu_pct": r.peak_pct, "compiled_runs": runs,
                    "mfu_spec_pct": None if peak_spec is None or r.tflops is None else 100 * r.tflops / peak_spec})
    return out


def bench_compiled(c: Check) -> dict:
    """d16 geometry with random weights, 100 classes, 32 images, ``varc`` and ``a-varc-plus`` in bf16 with the guard
    off and the fp32 agreement run, compiled: CUDA's default engine, the first benchmark, so no timeout cuts it. Each
    profile's rows carry the compiled block calls it ran (after the counters of the previous row: counting must not
    switch compilation off). The smoke run: the conformance model, ``varc`` in fp32 only, one image and two classes
    (one compiled graph, shared with ``compiled_conformance``)."""
    m = c.model("d16")
    n_img, n_cls = (1, 2) if c.smoke else (32, 100)
    profiles, dtypes = (("varc",), [torch.float32]) if c.smoke else (("varc", "a-varc-plus"), [torch.bfloat16])
    rows = []
    with compiled(m, True):
        for name in profiles:
            runs = m.compiled_block.runs
            got = compare(m, [_unguarded(name)], _inputs(m, n_img), list(range(n_cls)), dtypes,
                          warmup=0 if c.smoke else 1, repeat=1 if c.smoke else 2)
            rows += _rows(c, got, m.compiled_block.runs - runs)
    return {"depth": m.spec.var.depth, "images": n_img, "classes": n_cls, "compiled": True, "guard": "off",
            "results": rows}


def kv_policy(m: Model, profile: Profile, images: int, classes: int, dtype: torch.dtype) -> dict:
    """The first stage's keys/values of a schedule: their bytes, the fixed budget that keeps them (the same on every
    card, not a share of its free memory), and whether a later stage uses them."""
    spec = m.spec.var
    prof = profile.resolve(len(spec.patch_nums))
    first = prof.stages[0]
    n_tok = spec.scale_ends()[int(first.scales) - 1]
    rows = images * classes * first.samples
    need = rows * spec.depth * 2 * n_tok * spec.embed_dim * dtype.itemsize
    return {"stage1_kv_bytes": need, "cache_bytes": need, "kept": len(prof.stages) > 1}


def bench_1000(c: Check) -> dict:
    """d16 with 1000 classes, ``a-varc-plus`` bf16 (guard off), compiled, 4 images: the same work on an H100 and an
    H200. Its first stage keeps its keys/values under a fixed budget (22 GiB here), not a share of the free memory
    (0.4 × free kept them on an H200 but not on an H100 with 8 images)."""
    m = c.model("d16")
    n_img, n_cls = (1, 2) if c.smoke else (4, 1000)
    prof = _unguarded("a-varc-plus")
    policy = kv_policy(m, prof, n_img, n_cls, torch.bfloat16)
    with compiled(m, not c.smoke), m.computing_in(torch.bfloat16):
        runs = m.compiled_block.runs
        row = bench_run(m, prof, _inputs(m, n_img), list(range(n_cls)), warmup=0 if c.smoke else 1,
                        repeat=1 if c.smoke else 2, cache_bytes=policy["cache_bytes"])
        return {"depth": m.spec.var.depth, "images": n_img, "classes": n_cls, "compiled": m.compile, "guard": "off",
                "keys_values": policy, "results": _rows(c, [row], m.compiled_block.runs - runs)}


def bench_eager(c: Check, key: str = "d16", profiles: tuple[str, ...] = ("varc", "a-varc-plus"),
                images: int = 32) -> dict:
    """The eager engine on the same inputs (bf16, guard off; no agreement run: the compiled rows have it), the
    baseline the compiled rows are read against; ``key`` d30 with 8 images gives the largest 256-px model."""
    m = c.model(key)
    n_img, n_cls = (1, 2) if c.smoke else (images, 100)
    rows = []
    with compiled(m, False), m.computing_in(torch.bfloat16):
        for name in profiles:
            rows.append(bench_run(m, _unguarded(name), _inputs(m, n_img), list(range(n_cls)),
                                  warmup=0 if c.smoke else 1, repeat=1 if c.smoke else 2))
    if key != "d16" and not c.smoke:
        c.models.pop(key)
    return {"depth": m.spec.var.depth, "images": n_img, "classes": n_cls, "compiled": False, "guard": "off",
            "results": _rows(c, rows)}


def counters(c: Check) -> dict:
    """Launches (aten ops that run a kernel) per full-length forward and the engine's host syncs per scoring step,
    fp32 and bf16 (d16; the conformance model in the smoke run), counted eagerly on the plan the compiled engine
    fuses."""
    m = c.model("d16")
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        with m.computing_in(dt):
            out[str(dt).removeprefix("torch.")] = engine_counters(m)
    return {"depth": m.spec.var.depth, **out}


class HostWaits(TorchDispatchMode):
    """The ops in which the host waits for the device, by name: a sync op on a device tensor, a copy to the host, an
    upload that is not pinned and non-blocking (a pinned non-blocking upload queues behind the device's work). Also
    counts sync-type ops on any device (``sync_ops``): on a CPU they wait for nothing, but show the host bookkeeping
    a device would make wait if its tensors moved there."""

    def __init__(self):
        super().__init__()
        self.waits: collections.Counter[str] = collections.Counter()
        self.sync_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.sync_ops += 1
            if any(t.device.type != "cpu" for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)):
                self.waits[name] += 1
        elif name in ("_to_copy", "copy_"):
            if name == "_to_copy":
                src, dst = args[0], torch.device(kwargs.get("device") or args[0].device)
                blocking = not kwargs.get("non_blocking", False)
            else:
                src, dst = args[1], args[0].device
                blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
            down = src.device.type != "cpu" and dst.type == "cpu"
            up = src.device.type == "cpu" and dst.type != "cpu"
            if (down and blocking) or (up and (blocking or not src.is_pinned())):
                self.waits[f"{name}:{'download' if down else 'upload'}"] += 1
        return func(*args, **kwargs)


class _StageWaits(Scorer):
    """A Scorer that records the host waits inside each scoring call (one per stage) and the guard's."""

    def __init__(self, mode: HostWaits, *a, **kw):
        super().__init__(*a, **kw)
        self.mode, self.stages, self.guard = mode, [], collections.Counter()

    def score(self, tokens, classes, num_scales, *a, **kw):
        waits, ops, reported = collections.Counter(self.mode.waits), self.mode.sync_ops, len(_REPORTED)
        out = super().score(tokens, classes, num_scales, *a, **kw)
        mine = self.mode.waits - waits
        self.stages.append({"scales": num_scales, "rows": len(tokens), "host_waits": sum(mine.values()),
                            "by_op": dict(mine), "sync_ops_any_device": self.mode.sync_ops - ops,
                            "cuda_reported": len(_REPORTED) - reported})
        return out

    def score_fp32(self, *a, **kw):
        waits = collections.Counter(self.mode.waits)
        out = super().score_fp32(*a, **kw)
        self.guard.update(self.mode.waits - waits)
        return out


_REPORTED: list[str] = []     # CUDA's own sync warnings (torch.cuda.set_sync_debug_mode), the ground truth there


@contextmanager
def cuda_sync_reports(dev: torch.device) -> Iterator[None]:
    """CUDA reports each synchronising call (``set_sync_debug_mode("warn")``); they are collected in ``_REPORTED``."""
    if dev.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
            _REPORTED.extend(str(w.message) for w in caught if "synchroniz" in str(w.message))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def scorer_syncs(c: Check) -> dict:
    """The Scorer's real host syncs per stage of one ``varc`` and one ``a-varc-plus`` run (bf16, guard off; d16 × 100
    classes, 4 images): the ops where the host waits for the device (``host_waits``, by op), and on CUDA the calls
    CUDA itself reports as synchronising (``cuda_reported``). Counted eagerly (a dispatch mode around compiled code
    would switch compilation off); the syncs are the Scorer's and the schedule's, the same compiled or not."""
    m = c.model("d16")
    n_img, n_cls = (1, 2) if c.smoke else (4, 100)
    out = {}
    with compiled(m, False), m.computing_in(torch.bfloat16), torch.compiler.set_stance("force_eager"):
        for name in ("varc", "a-varc-plus"):
            prof = _unguarded(name).resolve(len(m.spec.var.patch_nums))
            tokens = sample_tokens(m, m.encode(_inputs(m, n_img)), prof.max_samples, prof.sigma, 0)
            run_stages(m, tokens, list(range(n_cls)), prof)                     # warm-up: class tables, plans
            _REPORTED.clear()
            with HostWaits() as mode, cuda_sync_reports(c.dev):
                scorer = _StageWaits(mode, m)
                run_stages(m, tokens, list(range(n_cls)), prof, scorer)
            out[name] = {"stages": scorer.stages, "guard_host_waits": dict(scorer.guard),
                         "whole_run_host_waits": sum(mode.waits.values()), "whole_run_by_op": dict(mode.waits),
                         "cuda_reported": len(_REPORTED) if c.dev.type == "cuda" else None}
    return {"depth": m.spec.var.depth, "images": n_img, "classes": n_cls, **out}


def bench_demo(c: Check) -> dict:
    """The bundled digits model on its 359 test digits, fp32 and bf16 (guard on): speed and agreement."""
    m = c.model("digits")
    data = digits.load_digits("test")
    x = digits.to_tensor(data.images[:8] if c.smoke else data.images, m.spec.image_size)
    rows = compare(m, [load_profile("digits")], x, list(range(10)), [torch.float32, torch.bfloat16],
                   warmup=0 if c.smoke else 1, repeat=1 if c.smoke else 3)
    acc = [sum(int(p == y) for p, y in zip(r.preds, data.labels)) / len(r.preds) for r in rows]
    return {"images": x.shape[0], "results": [{**r, "top1": a} for r, a in zip(_rows(c, rows), acc)]}


def profile_d16(c: Check) -> dict:
    """Where the device time of one compiled ``a-varc-plus`` bf16 run (guard off, d16 × 100 classes, 32 images)
    goes: the busiest kernels, and the share of the wall time the device was busy at all (idle gaps = host work or
    syncs inside the scoring loop). Busy time is the profiled run's kernels; wall time an identical unprofiled run's
    (the profiler slows the host)."""
    m = c.model("d16")
    n_img, n_cls = (1, 2) if c.smoke else (32, 100)
    x, prof = _inputs(m, n_img), _unguarded("a-varc-plus")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if c.dev.type == "cuda" else [])
    with compiled(m, not c.smoke), m.computing_in(torch.bfloat16):
        was_compiled = m.compile
        bench_run(m, prof, x, list(range(n_cls)), warmup=1, repeat=1)     # warm the allocator and kernels
        t0 = time.perf_counter()
        bench_run(m, prof, x, list(range(n_cls)), warmup=0, repeat=1)     # the wall time the profiler does not slow
        wall = time.perf_counter() - t0
        with profile(activities=acts) as p:
            bench_run(m, prof, x, list(range(n_cls)), warmup=0, repeat=1)
    kind = DeviceType.CUDA if c.dev.type == "cuda" else DeviceType.CPU
    attr = "self_device_time_total" if c.dev.type == "cuda" else "self_cpu_time_total"
    kernels = [e for e in p.key_averages() if e.device_type == kind]      # kernels only: ops would double count
    events = sorted(kernels, key=lambda e: getattr(e, attr), reverse=True)
    busy = sum(getattr(e, attr) for e in kernels) / 1e6
    return {"compiled": was_compiled, "wall_s": round(wall, 3), "device_busy_s": round(busy, 3),
            "busy_share": round(busy / wall, 3),
            "top": [{"name": e.key[:80], "ms": round(getattr(e, attr) / 1e3, 2), "calls": e.count}
                    for e in events[:15]]}


# GPU plan (issue 34 item 6, helper "gpuplan": survivors chosen on the device, the encoder on a side stream, CUDA
# graphs behind a flag) is not merged yet. When it is, add each switch here as (name, function turning it on for a
# Model and returning the function that turns it off); ``gpu_plan`` then times d16 × 100 a-varc-plus bf16 compiled
# with each switch against the same run without it, and checks that the predictions do not change.
def _cuda_graphs(m: Model) -> Callable[[], None]:
    """``--cuda-graphs``: small forwards replay CUDA graphs (on the CPU smoke the same buckets run eagerly)."""
    m.graphs = ForwardGraphs(capture=m.device.type == "cuda")

    def off() -> None:
        m.graphs = None
    return off


# The survivors chosen on the device need no switch (always on; ``scorer_syncs`` counts the waits per stage), and the
# encoder's side stream runs in classify's batch loop, not in a bench row.
GPU_PLAN_SWITCHES: tuple[tuple[str, Callable[[Model], Callable[[], None]]], ...] = (("cuda_graphs", _cuda_graphs),)


def gpu_plan(c: Check) -> dict:
    """Each switch of the GPU plan against the same compiled run without it (see ``GPU_PLAN_SWITCHES``)."""
    if not GPU_PLAN_SWITCHES:
        return {"switches": [], "note": "none registered yet (survivors on device, encoder side stream, CUDA graphs)"}
    m = c.model("d16")
    n_img, n_cls = (1, 2) if c.smoke else (32, 100)
    x, prof = _inputs(m, n_img), _unguarded("a-varc-plus")
    with compiled(m, not c.smoke), m.computing_in(torch.bfloat16):
        base = bench_run(m, prof, x, list(range(n_cls)), warmup=1, repeat=2)
        out = {"baseline": _rows(c, [base])[0]}
        for name, switch_on in GPU_PLAN_SWITCHES:
            off = switch_on(m)
            try:
                row = bench_run(m, prof, x, list(range(n_cls)), warmup=1, repeat=2)
                built = m.graphs.built if m.graphs is not None else None
            finally:
                off()
            out[name] = {**_rows(c, [row])[0], "same_predictions": row.preds == base.preds, "graphs_built": built}
    return out


# --- the verdict ----------------------------------------------------------------------------------------------------

def verdict(report: dict) -> list[dict]:
    """The issue's acceptance lines: the MFU targets (against the data-sheet peak; n/a where there is none), tokens
    equal to the CPU goldens, compiled fp32 log-probs within 1e-4, no compiled fallbacks and compiled code run. A
    failed correctness line makes the exit status 1; the MFU lines are measurements, reported PASS or FAIL only."""
    lines = []
    for what, sections, target in TARGETS:
        rows = [(sec, r) for sec in sections for r in report.get(sec, {}).get("results", [])
                if r["profile"] == "a-varc-plus" and r["dtype"] == "bf16"]
        got = rows[0][1]["mfu_spec_pct"] if rows else None
        lines.append({"check": f"{what}: MFU of spec peak >= {target:.0f}%", "value": got,
                      "from": rows[0][0] if rows else None, "pass": None if got is None else got >= target})
    tok = report.get("tokens_and_scores", {})
    equal = [v["tokens_equal_cpu"] for k, v in tok.items() if isinstance(v, dict)]
    lines.append({"check": "tokens equal to the CPU goldens", "value": equal, "pass": bool(equal) and all(equal)})
    conf = report.get("compiled_conformance", {})
    err = conf.get("fp32_logp_max_err")
    lines.append({"check": "compiled fp32 log-probs within 1e-4 of the goldens", "value": err,
                  "pass": err is not None and err <= 1e-4 and conf.get("compiled_runs", 0) > 0})
    rows = [r for sec in ("bench_d16_compiled", "bench_d16_1000") for r in report.get(sec, {}).get("results", [])
            if r.get("compiled")]
    falls = sum(r["compiled"]["fallbacks"] for r in rows) + (conf.get("compiled") or {}).get("fallbacks", 1)
    lines.append({"check": "compiled rows: 0 fallbacks, compiled code ran in each", "value": falls,
                  "pass": bool(rows) and falls == 0 and all((r["compiled_runs"] or 0) > 0 for r in rows)})
    return lines


def summary(report: dict) -> None:
    """One line per bench row, the Scorer's host waits per stage, the encoder layouts, the busy share, the verdict."""
    say("rows: section profile dtype | s/image | TFLOP/s | MFU measured / spec | graphs recompiles fallbacks runs | "
        "launches/forward host-syncs/step | peak MB")
    for sec, v in report.items():
        for r in v.get("results", []) if isinstance(v, dict) else []:
            ev, runs = r["compiled"], r["compiled_runs"]
            comp = "eager" if ev is None else f"{ev['graphs']} {ev['recompiles']} {ev['fallbacks']} {runs}"
            spec = "n/a" if r.get("mfu_spec_pct") is None else f"{r['mfu_spec_pct']:.1f}%"
            say(f"  {sec} {r['profile']} {r['dtype']} | {r['s_per_image']['median']:.4f} | {r['tflops']:.3g} | "
                f"{r['mfu_pct']:.1f}% / {spec} | {comp} | {r['launches_per_forward']:.0f} "
                f"{r['host_syncs_per_step']:.0f} | {r['peak_mem_mb']:.0f}")
    for name, v in report.get("scorer_syncs", {}).items():
        if isinstance(v, dict) and "stages" in v:
            say(f"scorer host waits per stage, {name}: {[st['host_waits'] for st in v['stages']]}, guard "
                f"{sum(v['guard_host_waits'].values())}, whole run {v['whole_run_host_waits']} "
                f"(CUDA reported {v['cuda_reported']}) {v['whole_run_by_op']}")
    for vae, rows in report.get("encoder_layouts", {}).items():
        for layout, r in rows.items() if isinstance(rows, dict) else ():
            say(f"encoder {vae} {layout}: tokens equal {r.get('tokens_equal', 'n/a')}, latent change "
                f"{r['latent_max_change']:.2e}, {r['images_per_s']} images/s")
    if "busy_share" in report.get("profile_d16", {}):
        say(f"profiled a-varc-plus: device busy {report['profile_d16']['busy_share']:.0%} of the unprofiled wall time")
    for line in report["acceptance"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[line["pass"]]
        say(f"{mark} {line['check']}: {line['value']}")


def main() -> int:
    argv = [a for a in sys.argv[1:] if a != "--cpu-smoke"]
    smoke = "--cpu-smoke" in sys.argv[1:] or os.environ.get("AVARC_CPU_SMOKE") == "1"
    default = Path(os.environ["OUT"]) / "device_check.json" if os.environ.get("OUT") else ROOT / "device_check.json"
    dev = torch.device("cpu") if smoke else resolve_device("auto")
    if smoke:      # tiny sizes on a shared CPU: one thread (a busy core stalls every OpenMP thread, README Threads)
        torch.set_num_threads(1)
    c = Check(dev, smoke, {"report_path": str(Path(argv[0]) if argv else default), "smoke": smoke,
                           "budget_s": BUDGET_S})
    say(f"device {dev}, report {c.report['report_path']}, budget {BUDGET_S:.0f} s")
    # In order of what matters if time runs out; each ``needs`` is a pessimistic H100 estimate (s).
    c.section("environment", lambda: environment(c), 0)
    c.section("matmul_peak", lambda: peak(c), 15)
    c.section("tokens_and_scores", lambda: tokens_and_scores(c), 30)
    c.section("counters", lambda: counters(c), 20)
    c.section("compiled_conformance", lambda: compiled_conformance(c), 90)
    c.section("bench_d16_compiled", lambda: bench_compiled(c), 150)
    c.section("bench_d16_1000", lambda: bench_1000(c), 60)
    c.section("bench_d16", lambda: bench_eager(c), 40)
    c.section("scorer_syncs", lambda: scorer_syncs(c), 30)
    c.section("profile_d16", lambda: profile_d16(c), 30)
    c.section("encoder_layouts", lambda: encoder_layouts(c), 40)
    c.section("gpu_plan", lambda: gpu_plan(c), 60 if GPU_PLAN_SWITCHES else 0)
    c.section("bench_d30", lambda: bench_eager(c, "d30", ("a-varc-plus",), images=8), 45)
    c.section("bench_demo", lambda: bench_demo(c), 20)
    c.section("tests", lambda: tests(c), 30)
    c.report["acceptance"] = verdict(c.report)
    c.report["total_seconds"] = round(time.perf_counter() - T0, 1)
    write(c.report)
    summary(c.report)
    failed = [k for k, v in c.report.items() if isinstance(v, dict) and "error" in v]
    skipped = [k for k, v in c.report.items() if isinstance(v, dict) and "skipped" in v]
    say(f"wrote {c.report['report_path']} in {c.report['total_seconds']}s; failed sections: {failed or 'none'}; "
        f"skipped: {skipped or 'none'}")
    wrong = [line["check"] for line in c.report["acceptance"] if line["pass"] is False and "MFU" not in line["check"]]
    return 1 if failed or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
