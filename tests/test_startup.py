"""A command's start-up imports no more than it uses: ``avarc classify`` on one image never imports torch._dynamo
(a second of every process's start-up; only ``--compile`` needs it). The subject is a fresh process's import graph,
so it runs as one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_classify_on_one_image_never_imports_torch_dynamo(tmp_path):
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "avarc", "classify", "examples/digits/3/1438.png",
                          "--out", str(tmp_path / "r.jsonl")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")]
    assert "torch" in imported and "avarc.classifier" in imported     # the import graph was read
    assert not [m for m in imported if m.startswith("torch._dynamo")]
    assert (tmp_path / "r.jsonl").read_text().count("\n") == 1
