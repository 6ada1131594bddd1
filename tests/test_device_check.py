"""scripts/device_check.sh, the one script a lent GPU runs, in its CPU smoke mode (the script is the subject, so it
runs as one process): every section runs, the compiled ones too (CPU inductor), and the report holds real outcomes:
tokens equal to the goldens, compiled rows with 0 fallbacks that ran compiled code after the counters, MFU against the
measured and a given data-sheet peak, the Scorer's host waits per stage, the encoder layouts at the real geometry."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from avarc import build_model, official_spec
from avarc.engine.scoring import Scorer

ROOT = Path(__file__).resolve().parent.parent
SPEC = {"bf16": 0.5, "fp32": 0.25}       # data-sheet peaks given for the CPU (TFLOP/s), as for an unlisted card


def test_cpu_smoke_runs_every_section_and_reports_real_outcomes(tmp_path):
    report_path = tmp_path / "device_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE_CHECK_SPEC": ",".join(f"{k}={v}" for k, v in SPEC.items())}
    proc = subprocess.run(["bash", "scripts/device_check.sh", str(report_path), "--cpu-smoke"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads(report_path.read_text())
    sections = {k: v for k, v in rep.items() if isinstance(v, dict)}
    assert not [k for k, v in sections.items() if "error" in v or "skipped" in v]

    tok = rep["tokens_and_scores"]["official256"]
    assert tok["tokens_equal_cpu"] and tok["tokens_differing"] == 0 and tok["fp32_logp_max_err"] < 1e-4
    conf = rep["compiled_conformance"]
    assert conf["fp32_logp_max_err"] < 1e-4 and conf["compiled_runs"] > 0
    assert conf["compiled"] == {"graphs": 1, "recompiles": 0, "fallbacks": 0}

    # The compiled bench ran after the counters section and bench's own counting: still compiled, no new graph.
    (row,) = rep["bench_d16_compiled"]["results"]
    assert row["compiled"] == {"graphs": 0, "recompiles": 0, "fallbacks": 0} and row["compiled_runs"] > 0
    rows = [r for sec in sections.values() for r in sec.get("results", [])]
    assert {r["profile"] for r in rows} == {"varc", "a-varc-plus", "digits"} and len(rows) == 7
    for r in rows:
        assert math.isfinite(r["mfu_pct"]) and r["mfu_pct"] > 0
        assert math.isclose(r["mfu_spec_pct"], 100 * r["tflops"] / SPEC[r["dtype"]], rel_tol=1e-9)
        assert r["launches_per_forward"] > 0 and r["host_syncs_per_step"] == 0 and r["peak_mem_mb"] > 0
    kv = rep["bench_d16_1000"]["keys_values"]
    assert kv["kept"] and kv["cache_bytes"] == kv["stage1_kv_bytes"] > 0

    syncs = rep["scorer_syncs"]["a-varc-plus"]
    assert [s["scales"] for s in syncs["stages"]] == [6, 10, 10]
    assert all(s["host_waits"] == 0 and s["sync_ops_any_device"] > 0 for s in syncs["stages"])   # CPU: no device
    layouts = rep["encoder_layouts"]
    assert layouts["official256"]["nchw/benchmark=False"]["tokens_equal"]
    real = layouts["vae_ch160v4096z32@32px"]
    assert real["nchw/benchmark=False"]["latent_max_change"] == 0 and "channels_last/benchmark=False" in real
    assert 0 < rep["profile_d16"]["busy_share"] and rep["profile_d16"]["top"]
    assert rep["tests"]["returncode"] == 0 and "passed" in rep["tests"]["summary"]
    graphed = rep["gpu_plan"]["cuda_graphs"]      # the CPU runs the graphs' buckets and buffers eagerly
    assert graphed["same_predictions"] and graphed["graphs_built"] > 0

    verdict = {line["check"]: line["pass"] for line in rep["acceptance"]}
    assert all(v is True for k, v in verdict.items() if "MFU" not in k) and len(verdict) == 5
    assert all(isinstance(v, bool) for k, v in verdict.items() if "MFU" in k)   # computed against the given peak
    assert "PASS tokens equal to the CPU goldens" in proc.stdout


def test_sections_that_do_not_fit_the_budget_are_skipped_with_the_reason(tmp_path):
    """The 8-minute bound: a section starts only if its estimate fits what is left; the others are reported as
    skipped (the report is still written) and the missing correctness verdict makes the exit status 1."""
    report_path = tmp_path / "r.json"
    env = {**os.environ, "DEVICE_CHECK_BUDGET": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "scripts/device_check.py", str(report_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    rep = json.loads(report_path.read_text())
    assert rep["environment"]["device"] == "cpu" and rep["budget_s"] == 1
    skipped = {k for k, v in rep.items() if isinstance(v, dict) and "skipped" in v}
    assert {"matmul_peak", "tokens_and_scores", "compiled_conformance", "bench_d16_compiled", "tests"} <= skipped
    assert "tokens_and_scores SKIPPED" in proc.stdout
    assert {line["check"]: line["pass"] for line in rep["acceptance"]}["tokens equal to the CPU goldens"] is False


def test_host_waits_count_what_makes_the_host_wait_for_the_device(monkeypatch):
    """The rule behind ``scorer_syncs``, with the meta device standing in for a GPU: uploads from unpinned memory
    (blocking or not) and sync ops on device tensors are waits; a sync op on host tensors is not. (A pinned
    non-blocking upload, not a wait, needs a GPU to pin memory.)"""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from device_check import HostWaits

    x = torch.ones(4)
    with HostWaits() as w:
        x.to("meta")
        x.to("meta", non_blocking=True)
        torch.empty(4, device="meta").copy_(x)
        x.nonzero()
        with pytest.raises(RuntimeError):                 # dispatched (and counted) before the meta kernel refuses
            torch.ones(4, device="meta").sum().item()
    assert w.waits == {"_to_copy:upload": 2, "copy_:upload": 1, "_local_scalar_dense": 1} and w.sync_ops == 2


def test_spec_peaks_by_card_name_and_the_1000_class_keys_values_policy(monkeypatch):
    """The GPU acceptance lines read these: each card's dense bf16/fp32 data-sheet peak by the name torch gives it,
    and the d16 x 1000 first stage's keys/values kept under a fixed budget the Scorer keeps them in exactly, whatever
    the card's free memory (an H100 and an H200 run the same work)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from device_check import _unguarded, kv_policy, spec_for

    assert spec_for("NVIDIA H100 80GB HBM3") == spec_for("NVIDIA H200") == spec_for("NVIDIA GH200 480GB") == {
        "bf16": 989.0, "fp32": 67.0}
    assert spec_for("NVIDIA H100 PCIe")["bf16"] == 756 and spec_for("NVIDIA H200 NVL")["bf16"] == 835
    assert spec_for("NVIDIA A100-SXM4-80GB")["bf16"] == 312 and spec_for("NVIDIA L4") is None

    m = build_model(official_spec("d16"), device="meta")
    policy = kv_policy(m, _unguarded("a-varc-plus"), 4, 1000, torch.bfloat16)
    assert policy["stage1_kv_bytes"] == 4 * 1000 * 16 * 2 * 91 * 1024 * 2 == policy["cache_bytes"] and policy["kept"]
    with m.computing_in(torch.bfloat16):
        assert Scorer(m, cache_bytes=policy["cache_bytes"])._fits(4000, 91)
        assert not Scorer(m, cache_bytes=policy["cache_bytes"] - 1)._fits(4000, 91)
