"""avarc.io.distributed under a real torchrun (2 CPU processes, gloo): the merged output equals a one-process run."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from avarc.io.distributed import Dist, images_per_step
from tests.conftest import MODEL, ConformanceSet, read_jsonl, run_cli

CS = ConformanceSet("official256")
REPO = Path(__file__).resolve().parents[1]
PROFILE = "sigma: 0.2\nstages:\n  - {scales: 3, keep: 3}\n  - {scales: 4, samples: 3}\n"


def test_single_process_defaults():
    d = Dist()
    assert d.is_main and not d.active and d.gather("x") == ["x"] and d.from_main(lambda: 5) == 5
    assert images_per_step(None, 1000) == 32 and images_per_step(2000, 1000) == 2 and images_per_step(10, 1000) == 1


def test_torchrun_with_two_gloo_processes_writes_the_same_records_as_one_process(tmp_path, monkeypatch, capsys):
    data = tmp_path / "imgs"
    shutil.copytree(CS.dir.parent / "images", data)
    (data / "more").mkdir()
    shutil.copy(data / "tiny.png", data / "more" / "tiny_copy.png")
    (data / "more" / "zz_broken.png").write_bytes(b"\x89PNG\r\n")                  # 8 inputs, one unreadable
    profile = tmp_path / "p.yaml"
    profile.write_text(PROFILE)
    common = ["classify", str(data), *map(str, MODEL), "--profile", str(profile), "--seed", "3", "--batch-size", "12"]

    one = tmp_path / "one.jsonl"
    code, _, _ = run_cli(monkeypatch, capsys, *common, "--out", one)
    assert code == 0
    two = tmp_path / "two.jsonl"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "avarc", *common, "--out", str(two)], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("images/s") == 1 and re.search(r"processes\s*│\s*2\s*│", run.stdout)   # rank 0 only

    a, b = read_jsonl(one), read_jsonl(two)
    assert [r["path"] for r in a] == [r["path"] for r in b] and len(a) == 8           # input order, merged
    for ra, rb in zip(a, b):
        assert (ra["status"], ra["error"], ra["pred"], ra["run"]) == (rb["status"], rb["error"], rb["pred"], rb["run"])
        assert [t["class"] for t in ra["topk"]] == [t["class"] for t in rb["topk"]]
        for sa, sb in zip(ra["stages"], rb["stages"], strict=True):
            assert sa["candidates"] == sb["candidates"]
            assert max(abs(x - y) for x, y in zip(sa["scores"], sb["scores"])) < 1e-3
    assert sum(r["status"] == "skipped" for r in a) == 1
    assert a[0]["stages"][1]["samples"] == 3
    # every reader reads what torchrun's ranks wrote: --resume has nothing left to do (the unreadable file is retried
    # and still unreadable: no new record), explain --from explains each decided image of the merged file
    before = two.read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, *common, "--out", two, "--resume")
    assert code == 0 and two.read_bytes() == before and "Traceback" not in err, err
    why = tmp_path / "why"
    code, _, err = run_cli(monkeypatch, capsys, "explain", "--from", two, *map(str, MODEL), "--out", why)
    assert code == 0 and "Traceback" not in err, err
    assert len(list(why.glob("*.png"))) == sum(r["status"] == "ok" for r in b) == 7
