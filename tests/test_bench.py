"""`avarc bench`: the paper's GFLOPs from --flops-only, and a real (tiny) timed run's JSON."""
import json

from typer.testing import CliRunner

from avarc.cli.app import app
from tests.conftest import CONFORMANCE

runner = CliRunner()
PAPER = {"varc": 14105.0, "a-varc-plus": 4649.4, "smooth-top10": 28210.0}


def test_flops_only_matches_paper_tables():
    res = runner.invoke(app, ["bench", "--flops-only", "--depth", "16", "--num-classes", "100", "--json",
                              *[a for p in PAPER for a in ("-p", p)]])
    assert res.exit_code == 0, res.output
    rows = {r["profile"]: r for r in json.loads(res.stdout)["results"]}
    for name, gflops in PAPER.items():
        assert abs(rows[name]["gflops_per_image"] / gflops - 1) < 0.02
        assert rows[name]["gflops_executed"] <= rows[name]["gflops_per_image"]
    assert rows["a-varc-plus"]["gflops_executed"] < 0.9 * rows["a-varc-plus"]["gflops_per_image"]


def test_timed_run_reports_every_field():
    var = CONFORMANCE / "official256" / "var.pth"
    res = runner.invoke(app, ["bench", "-m", str(var), "-p", "a-varc-plus", "--num-classes", "4", "--warmup", "0",
                              "--repeat", "1", "--dtype", "fp32", "--dtype", "bf16", "--plain", "--json",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["results"]
    assert [(r["profile"], r["dtype"]) for r in rows] == [("a-varc-plus", "fp32"), ("a-varc-plus", "bf16"),
                                                         ("a-varc-plus plain", "fp32"), ("a-varc-plus plain", "bf16")]
    fp32, bf16, plain = rows[0], rows[1], rows[2]
    for r in rows:
        s = r["s_per_image"]
        assert 0 < s["min"] <= s["median"] <= s["max"] and r["images_per_s"] > 0 and r["tflops"] > 0
        assert r["peak_pct"] > 0 and r["peak_mem_mb"] > 0 and r["device"] == "cpu"
        assert r["threads"] == 1             # a tiny model runs on one thread
    assert fp32["agreement_fp32"] == 1.0 and bf16["agreement_fp32"] in (0.0, 1.0)
    assert plain["agreement_fp32"] == 1.0            # the unoptimised path predicts the same
    assert fp32["gflops_executed"] < plain["gflops_executed"] == plain["gflops_per_image"]
