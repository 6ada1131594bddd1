"""One-shot check of avarc on an accelerator: correctness (tests on the device, tokens equal to the CPU's, bf16 score
error, precision guard, which encoder layouts keep the tokens) and speed (d16 with 100 and 1000 classes, d30 with
100, the digits demo, measured bf16 matmul peak, MFU, peak memory, launches per forward, host syncs per step, the
device's busy share). Writes one JSON report; every section runs on its own, so one failure does not lose the
others.

    python3 scripts/device_check.py [REPORT.json] [--cpu-smoke]

``--cpu-smoke`` runs every section on the CPU at tiny sizes, to prove the script itself works end to end.
Run from the repository root (see scripts/device_check.sh).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import digits
import numpy as np
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from avarc.engine.counters import engine_counters
from avarc.engine.profile import Profile
from avarc.engine.runtime import resolve_device
from avarc.io.loading import finish, load_model, resolve_model
from avarc.io.preprocess import preprocess_image
from avarc.io.profiles import load_profile
from avarc.runs.bench import compare, matmul_peak, random_model
from avarc.runs.bench import run as bench_run

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE = ROOT / "tests" / "data" / "conformance"
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def section(report: dict, name: str, fn) -> None:
    """Run one section; its result (or its error) goes into the report, which is rewritten after every section."""
    say(f"{name} …")
    t = time.perf_counter()
    try:
        report[name] = fn()
        report[name]["seconds"] = round(time.perf_counter() - t, 1)
        say(f"{name} done in {time.perf_counter() - t:.1f}s: {json.dumps(report[name])[:300]}")
    except Exception as e:  # noqa: BLE001 (a section's failure is data for the report)
        report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:],
                        "seconds": round(time.perf_counter() - t, 1)}
        say(f"{name} FAILED: {type(e).__name__}: {e}")
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    write(report)


def write(report: dict) -> None:
    path = Path(report["report_path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def environment(dev: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(dev),
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gb=round(p.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, sms=p.multi_processor_count,
                   free_gb=round(torch.cuda.mem_get_info(dev)[0] / 2**30, 1))
    return env


def tests(smoke: bool) -> dict:
    """The engine's tests on the accelerator (their CPU variants are deselected: the CPU suite runs elsewhere), in a
    subprocess."""
    files = ["tests/test_engine.py"] if smoke else ["tests/test_conformance.py", "tests/test_likelihood.py",
                                                     "tests/test_scoring.py", "tests/test_engine.py",
                                                     "tests/test_digits.py::test_bf16_agrees_with_fp32"]
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    args += ["-k", "threads or margin"] if smoke else ["-k", "not cpu"]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                       timeout=float(os.environ.get("DEVICE_CHECK_TESTS_TIMEOUT", 300)))
    tail = (r.stdout + r.stderr).strip().splitlines()
    return {"returncode": r.returncode, "summary": tail[-1] if tail else "",
            "failures": [ln for ln in tail if ln.startswith(("FAILED", "ERROR"))][:20]}


def _conformance_set(name: str, dev: torch.device) -> tuple[dict, dict, object, torch.Tensor]:
    """A conformance set: its meta.json, golden arrays, model on ``dev`` and preprocessed images (on the CPU)."""
    d = CONFORMANCE / name
    meta = json.loads((d / "meta.json").read_text())
    golden = {k: torch.from_numpy(v) for k, v in np.load(d / "golden.npz").items()}
    m = load_model(d / "var.pth", d / "vae.pth", device=dev)
    imgs = torch.stack([preprocess_image(next((CONFORMANCE / "images").glob(f"{s}.*")), meta["image_size"])
                        for s in meta["images"]])
    return meta, golden, m, imgs


def tokens_and_scores(dev: torch.device, smoke: bool) -> dict:
    """Tokens on the device equal the CPU golden exactly; fp32 log-probs vs the golden; bf16 class-score error."""
    out = {}
    for name in ("official256",) if smoke else ("official256", "shared512"):
        meta, golden, m, imgs = _conformance_set(name, dev)
        tokens = m.tokenize(imgs).cpu()
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
    return out


def encoder_layouts(dev: torch.device, smoke: bool) -> dict:
    """The encoder in NCHW and channels_last, with and without cudnn.benchmark: tokens equal to the official ones,
    largest latent change, seconds per call. A faster layout may become the default on a device only where every
    token stays the official one (on a 2-core EPYC CPU channels_last moved latents by up to 2.6e-2 and changed
    tokens, so the CPU keeps NCHW)."""
    out, saved = {}, torch.backends.cudnn.benchmark
    for name in ("official256",) if smoke else ("official256", "shared512"):
        _, golden, m, imgs = _conformance_set(name, dev)
        imgs = imgs.to(dev)
        ref = m.encode(imgs)
        for layout in (torch.contiguous_format, torch.channels_last):
            for bench in (False, True):
                torch.backends.cudnn.benchmark = bench
                m.vae.to(memory_format=layout)
                x = imgs.contiguous(memory_format=layout)
                m.encode(x)                                   # warm-up (benchmark picks its algorithms here)
                t = time.perf_counter()
                lat = m.encode(x)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                key = f"{name}/{'channels_last' if layout == torch.channels_last else 'nchw'}/benchmark={bench}"
                out[key] = {"tokens_equal": bool(torch.equal(m.tokenize_latent(lat).cpu(), golden["tokens"])),
                            "latent_max_change": float((lat - ref).abs().max()),
                            "seconds": round(time.perf_counter() - t, 4)}
        m.vae.to(memory_format=torch.contiguous_format)
    torch.backends.cudnn.benchmark = saved
    return out


def compiled_conformance(dev: torch.device) -> dict:
    """fp32 log-probs of the compiled engine against the golden (must stay within 1e-4 per token)."""
    d = CONFORMANCE / "official256"
    golden = {k: torch.from_numpy(v) for k, v in np.load(d / "golden.npz").items()}
    m = finish(load_model(d / "var.pth", d / "vae.pth", device=dev), compile=True)
    lp = m.token_logp(golden["tokens"], range(json.loads((d / "meta.json").read_text())["num_classes"] + 1))
    return {"fp32_logp_max_err": float((lp - golden["logp"]).abs().max()), "compiled": m.compile_evidence(),
            "compiled_runs": m.compiled_block.runs}


def peak(dev: torch.device, smoke: bool) -> dict:
    if smoke:
        return {"bf16_tflops": matmul_peak(str(dev), torch.bfloat16) / 1e12}
    return {"bf16_tflops": matmul_peak(str(dev), torch.bfloat16) / 1e12,
            "fp32_tflops": matmul_peak(str(dev), torch.float32) / 1e12}


SPEC_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}   # dense bf16 tensor-core peaks (SXM data sheets)


def _spec_peak() -> float | None:
    """The data-sheet dense bf16 peak of this GPU (None on a CPU or an unlisted card)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in SPEC_BF16_TFLOPS.items() if k in name), None)


def _results(rows) -> list[dict]:
    """Bench rows with MFU against the measured matmul peak and the data-sheet peak; each row's ``compiled`` says
    graphs, recompiles and fallbacks (None: eager)."""
    spec = _spec_peak()
    return [{**r.to_json(), "mfu_pct": r.peak_pct,
             "mfu_spec_pct": None if spec is None or r.tflops is None else round(100 * r.tflops / spec, 2)}
            for r in rows]


def _unguarded(name: str) -> Profile:
    """A shipped profile with the precision guard off: random weights put every image's top two within its margin,
    so the guard would re-score every image in fp32 (trained models: a few per cent; see bench_demo)."""
    return replace(load_profile(name), guard_margin=0.0)


def bench_d16(dev: torch.device, smoke: bool, compiled: bool = False,
              profiles: tuple[str, ...] = ("varc", "a-varc-plus"), depth: int = 16, classes: int = 100,
              images: int = 32) -> dict:
    """d16 geometry (or ``depth``), random weights, 100 classes (or ``classes``), varc and a-varc-plus, bf16 with
    the guard off (with the fp32 agreement run); each row carries launches per forward and host syncs per step.
    The smoke run uses the small official256 conformance model instead."""
    d = CONFORMANCE / "official256"
    m = finish(load_model(d / "var.pth", d / "vae.pth", device=dev) if smoke else random_model(depth, dev),
               compile=compiled)
    n_img, n_cls = (1, 2) if smoke else (images, classes)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n_img, 3, m.spec.image_size, m.spec.image_size, generator=g) * 2 - 1
    rows = compare(m, [_unguarded(p) for p in profiles], x, list(range(n_cls)), [torch.bfloat16],
                   warmup=0 if smoke else 1, repeat=1 if smoke else 2)
    return {"depth": m.spec.var.depth, "images": n_img, "classes": n_cls, "compiled": compiled, "guard": "off",
            "results": _results(rows)}


def counters(dev: torch.device, smoke: bool) -> dict:
    """Launches (aten ops that run a kernel) per full-length forward and host syncs per scoring step, fp32 and
    bf16 (d16; the conformance model in the smoke run)."""
    d = CONFORMANCE / "official256"
    m = load_model(d / "var.pth", d / "vae.pth", device=dev) if smoke else random_model(16, dev)
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        with m.computing_in(dt):
            out[str(dt).removeprefix("torch.")] = engine_counters(m)
    return {"depth": m.spec.var.depth, **out}


def bench_demo(dev: torch.device, smoke: bool) -> dict:
    """The bundled digits model on its 359 test digits, fp32 and bf16 (guard on): speed and agreement."""
    m = resolve_model("digits", device=dev)
    data = digits.load_digits("test")
    x = digits.to_tensor(data.images[:8] if smoke else data.images, m.spec.image_size)
    rows = compare(m, [load_profile("digits")], x, list(range(10)), [torch.float32, torch.bfloat16],
                   warmup=0 if smoke else 1, repeat=1 if smoke else 3)
    acc = [sum(int(p == y) for p, y in zip(r.preds, data.labels)) / len(r.preds) for r in rows]
    return {"images": x.shape[0], "results": [{**r, "top1": a} for r, a in zip(_results(rows), acc)]}


def profile_d16(dev: torch.device, smoke: bool) -> dict:
    """Where the GPU time of one a-varc-plus bf16 run (guard off) goes: the busiest kernels, and how much of the wall
    time the device was busy at all (idle gaps = host work or syncs inside the scoring loop). The busy time is the
    profiled run's kernels; the wall time an identical unprofiled run's (the profiler slows the host)."""
    d = CONFORMANCE / "official256"
    m = load_model(d / "var.pth", d / "vae.pth", device=dev) if smoke else random_model(16, dev)
    n_img, n_cls = (1, 2) if smoke else (32, 100)
    x = torch.rand(n_img, 3, m.spec.image_size, m.spec.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prof = _unguarded("a-varc-plus")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with m.computing_in(torch.bfloat16):
        bench_run(m, prof, x, list(range(n_cls)), warmup=1, repeat=1)     # warm the allocator and kernels
        t0 = time.perf_counter()
        bench_run(m, prof, x, list(range(n_cls)), warmup=0, repeat=1)     # the wall time the profiler does not slow
        wall = time.perf_counter() - t0
        with profile(activities=acts) as p:
            bench_run(m, prof, x, list(range(n_cls)), warmup=0, repeat=1)
    kind = DeviceType.CUDA if dev.type == "cuda" else DeviceType.CPU
    attr = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    kernels = [e for e in p.key_averages() if e.device_type == kind]      # kernels only: ops would double count
    events = sorted(kernels, key=lambda e: getattr(e, attr), reverse=True)
    busy = sum(getattr(e, attr) for e in kernels) / 1e6
    return {"wall_s": round(wall, 3), "device_busy_s": round(busy, 3), "busy_share": round(busy / wall, 3),
            "top": [{"name": e.key[:80], "ms": round(getattr(e, attr) / 1e3, 2), "calls": e.count}
                    for e in events[:15]]}


def main() -> int:
    argv = [a for a in sys.argv[1:] if a != "--cpu-smoke"]
    smoke = "--cpu-smoke" in sys.argv[1:] or os.environ.get("AVARC_CPU_SMOKE") == "1"
    default = Path(os.environ["OUT"]) / "device_check.json" if os.environ.get("OUT") else ROOT / "device_check.json"
    dev = torch.device("cpu") if smoke else resolve_device("auto")
    if smoke:      # tiny sizes on a shared CPU: one thread (a busy core stalls every OpenMP thread, README Threads)
        torch.set_num_threads(1)
    report = {"report_path": str(Path(argv[0]) if argv else default), "smoke": smoke}
    say(f"device {dev}, report {report['report_path']}")
    section(report, "environment", lambda: environment(dev))
    section(report, "matmul_peak", lambda: peak(dev, smoke))
    section(report, "tokens_and_scores", lambda: tokens_and_scores(dev, smoke))
    section(report, "encoder_layouts", lambda: encoder_layouts(dev, smoke))
    section(report, "bench_d16", lambda: bench_d16(dev, smoke))
    section(report, "counters", lambda: counters(dev, smoke))
    section(report, "bench_d16_1000", lambda: bench_d16(dev, smoke, profiles=("a-varc-plus",), classes=1000, images=8))
    section(report, "bench_d30", lambda: bench_d16(dev, smoke, profiles=("a-varc-plus",), depth=30, images=8))
    section(report, "bench_demo", lambda: bench_demo(dev, smoke))
    section(report, "profile_d16", lambda: profile_d16(dev, smoke))
    section(report, "tests", lambda: tests(smoke))
    # Last: the first compile may take a minute or more; the report already holds everything else. The smoke run
    # compiles too (CPU inductor), so a change that turns compilation off shows there.
    section(report, "compiled_conformance", lambda: compiled_conformance(dev))
    section(report, "bench_d16_compiled", lambda: bench_d16(dev, smoke, compiled=True))
    report["total_seconds"] = round(time.perf_counter() - T0, 1)
    write(report)
    failed = [k for k, v in report.items() if isinstance(v, dict) and "error" in v]
    say(f"wrote {report['report_path']} in {report['total_seconds']}s; failed sections: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
