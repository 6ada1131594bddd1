"""The library and an in-process command leave torch's process-wide settings as they found them, and run on their
own thread count meanwhile: a tiny model (the digits) on one thread, ``--threads`` on what it asks for."""
from __future__ import annotations

import pytest
import torch

from avarc import Classifier
from avarc.engine.runtime import usable_cores
from avarc.engine.torch_state import TorchSettings, torch_settings
from tests.conftest import SUITE_THREADS, read_jsonl, run_cli

DIGIT = "examples/digits/3"
IMAGE = f"{DIGIT}/1438.png"


@pytest.fixture
def host_settings():
    """A host program's own settings, unlike anything avarc would choose: 3 threads, autograd off, TF32-level
    matmuls, a float64 default dtype, its own random stream."""
    with torch_settings(3):
        torch.set_grad_enabled(False)
        torch.set_float32_matmul_precision("medium")
        torch.set_default_dtype(torch.float64)
        torch.manual_seed(1234)
        interop = torch.get_num_interop_threads()
        before = TorchSettings.now()
        yield before
        assert torch.get_num_interop_threads() == interop


def test_library_calls_run_on_their_threads_and_put_every_setting_back(host_settings):
    clf = Classifier.from_pretrained("digits", device="cpu", dtype="fp32")
    assert TorchSettings.now() == host_settings and clf.threads == 1
    seen = []
    pred = clf.classify(IMAGE)
    assert pred.pred_name == "3" and TorchSettings.now() == host_settings
    clf.explain(IMAGE, a=3, b=8)
    assert TorchSettings.now() == host_settings
    clf.add_classes({"three": DIGIT}, steps=2, batch_size=2, holdout=0.0,
                    on_step=lambda *a: seen.append((torch.get_num_threads(), torch.is_grad_enabled())))
    assert TorchSettings.now() == host_settings
    assert seen and {s[0] for s in seen} == {1}


def test_an_in_process_command_puts_every_setting_back_and_records_its_threads(host_settings, tmp_path, monkeypatch,
                                                                               capsys, caplog):
    out = tmp_path / "r.jsonl"
    code, _, err = run_cli(monkeypatch, capsys, "classify", DIGIT, "--device", "cpu", "--dtype", "fp32", "--out", out)
    assert code == 0, err
    assert TorchSettings.now() == host_settings
    assert {r["run"]["threads"] for r in read_jsonl(out)} == {1}
    cores = usable_cores()
    with caplog.at_level("WARNING", logger="avarc"):
        code, _, err = run_cli(monkeypatch, capsys, "classify", DIGIT, "--device", "cpu", "--dtype", "fp32",
                               "--threads", 999, "--out", tmp_path / "many.jsonl")
    assert code == 0, err
    assert [r.message for r in caplog.records] == [f"warning: 999 threads asked for, but this process may use {cores} "
                                                   f"core(s); using {cores} (more threads than cores wait for each "
                                                   "other)"]
    assert {r["run"]["threads"] for r in read_jsonl(tmp_path / "many.jsonl")} == {cores}
    assert TorchSettings.now() == host_settings


@pytest.fixture(scope="module")
def fixture_settings() -> TorchSettings:
    """What a module fixture (the digits' fp32 runs, an ONNX export) computes under: set up before any test's own."""
    return TorchSettings.now()


def test_the_suites_fixtures_run_on_its_pinned_settings(fixture_settings):
    """Module fixtures run on the suite's pinned threads, as its tests do (they ran on torch's default, 2 threads a
    worker under -n 2), so what a fixture costs does not depend on where it is computed."""
    assert fixture_settings.threads == torch.get_num_threads() == SUITE_THREADS
    assert fixture_settings.default_dtype == torch.get_default_dtype() == torch.float32
