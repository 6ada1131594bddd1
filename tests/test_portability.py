"""Every host runs every path: the kernel choice follows what the CPU can do, not what torch was built with. The
plain (emulated-bf16) path is forced here with ``AVARC_CPU_BF16=emulated``, so an AMX host proves the AVX2 path;
on a host without native bf16 the rest of the suite proves it anyway. The precision guard on the emulated path:
test_bf16_digits."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from avarc.engine import runtime as model_mod
from avarc.models import block_ops as var_mod
from tests.conftest import cli_run

REPO = Path(__file__).resolve().parents[1]


def test_forced_fallback_takes_plain_linear_and_auto_picks_fp32(emulated, caplog):
    """No oneDNN bf16 call is made (its primitive cannot be built on AVX2); --dtype auto is fp32; an explicit bf16
    works, with one warning; the fallback's bf16 linear equals F.linear's."""
    assert not var_mod.onednn_bf16()
    cpu = torch.device("cpu")
    assert model_mod.resolve_dtype("auto", cpu) == torch.float32
    model_mod._warn_emulated.cache_clear()
    with caplog.at_level("WARNING", logger="avarc"):
        assert model_mod.resolve_dtype("bf16", cpu) == torch.bfloat16
        model_mod.resolve_dtype("bf16", cpu)
    assert sum("emulated" in r.getMessage() for r in caplog.records) == 1
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).bfloat16() for s in ((3, 5, 16), (8, 16), (8,)))
    with torch.no_grad():
        y = var_mod.linear(x, w, b, gelu=True)
    assert torch.equal(y, torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b), approximate="tanh"))


def test_native_choice_follows_the_probe():
    """Where oneDNN reports and runs bf16 the fused path is taken; where it does not, never (whatever the host)."""
    var_mod.onednn_bf16.cache_clear()
    supported = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert var_mod.onednn_bf16() == supported
    if not supported:
        assert model_mod.resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_cli_bf16_on_an_emulating_cpu(emulated, tmp_path, caplog):
    """`classify --dtype bf16` on the demo where bf16 is emulated: fp32's predictions, one warning line, no
    traceback; `bench --dtype fp32 --dtype bf16` keeps both rows."""
    runs = {}
    for dt in ("fp32", "bf16"):
        out = tmp_path / f"{dt}.jsonl"
        model_mod._warn_emulated.cache_clear()              # once per process: this run is a process of its own
        caplog.clear()
        with caplog.at_level("WARNING", logger="avarc"):
            r = cli_run("classify", REPO / "examples" / "digits", "--dtype", dt, "--device", "cpu", "--out", out)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
        assert (sum("emulated" in rec.getMessage() for rec in caplog.records) == 1) == (dt == "bf16")
        runs[dt] = [json.loads(line)["pred"] for line in out.read_text().splitlines()]
    assert runs["bf16"] == runs["fp32"] and len(runs["fp32"]) == 20
    r = cli_run("bench", "-m", "digits", "-p", "digits", "--images", "2", "--warmup", "0", "--repeat", "1", "--device",
                "cpu", "--dtype", "fp32", "--dtype", "bf16", "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert [row["dtype"] for row in json.loads(r.stdout)["results"]] == ["fp32", "bf16"]


def test_an_unexpected_failure_is_one_line_and_bench_keeps_what_it_measured(monkeypatch, capsys, tmp_path):
    """A kernel failing mid-bench (injected for bf16): the fp32 row is still printed, the error is one line naming
    the log file with the full trace, exit code 1."""
    from avarc.runs import bench as bench_mod
    from tests.conftest import run_cli

    real = bench_mod.run

    def fails_in_bf16(model, *a, **kw):
        if model.dtype == torch.bfloat16:
            raise RuntimeError("could not create a primitive descriptor for the inner product forward propagation")
        return real(model, *a, **kw)

    monkeypatch.setattr(bench_mod, "run", fails_in_bf16)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    code, out, err = run_cli(monkeypatch, capsys, "bench", "-m", "digits", "-p", "digits", "--images", "1", "--warmup",
                           "0", "--repeat", "1", "--device", "cpu", "--dtype", "fp32", "--dtype", "bf16", "--json")
    assert code == 1
    assert [r["dtype"] for r in json.loads(out)["results"]] == ["fp32"]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "unexpected RuntimeError: could not create a primitive" in lines[0]
    logs = list((tmp_path / "avarc" / "logs").glob("crash-*.log"))
    assert len(logs) == 1 and str(logs[0]) in lines[0] and "Traceback" in logs[0].read_text()


HUGE_PAGES = '''
import os, avarc_cli, torch
t = torch.empty(16 << 20, dtype=torch.uint8).fill_(1)
p, huge, inside = t.data_ptr(), 0, False
for line in open("/proc/self/smaps"):
    f = line.split()
    if f[0].count("-") == 1 and all(c in "0123456789abcdef-" for c in f[0]):
        lo, hi = (int(x, 16) for x in f[0].split("-"))
        inside = lo <= p < hi
    elif inside and f[0] == "AnonHugePages:":
        huge = int(f[1])
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), p % 4096, huge)
'''


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux only: torch's THP switch and smaps")
@pytest.mark.parametrize("user", [None, "0"])
def test_cli_puts_large_tensors_on_huge_pages_unless_the_user_says_no(user):
    """Importing the CLI turns on torch's transparent-huge-page allocation (page-aligned, madvised) before torch is
    imported; where the kernel allows THP the tensor's memory is on huge pages. A user's own setting wins."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if user is not None:
        env["THP_MEM_ALLOC_ENABLE"] = user
    out = subprocess.run([sys.executable, "-c", HUGE_PAGES], capture_output=True, text=True, env=env, cwd=REPO,
                         check=True)
    setting, offset, huge = out.stdout.split()
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    mode = mode.read_text() if mode.exists() else "[never]"
    if user is None:
        assert setting == "1" and offset == "0"
        assert int(huge) > 0 or "[never]" in mode
    else:
        assert setting == "0"
        assert int(huge) == 0 or "[always]" in mode      # under "always" the kernel uses huge pages anyway
