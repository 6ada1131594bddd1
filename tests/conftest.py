"""Shared fixtures: the conformance vectors (tests/data/conformance, computed by the upstream VAR code)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import core
from avarc_cli.app import main

DATA = Path(__file__).parent / "data"
CONFORMANCE = DATA / "conformance"
CONFORMANCE_SETS = ("official256", "shared512")
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
LOGP_TOL = {"cpu": 1e-4, "cuda": 1e-3}     # per-token fp32 log-prob against the golden (upstream, CPU fp32)


def conformance_image(stem: str) -> Path:
    return next((CONFORMANCE / "images").glob(f"{stem}.*"))


class ConformanceSet:
    """One conformance directory: its checkpoints, meta.json and golden.npz."""

    def __init__(self, name: str):
        self.name, self.dir = name, CONFORMANCE / name
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.golden = {k: torch.from_numpy(v) for k, v in np.load(self.dir / "golden.npz").items()}
        self.var_path, self.vae_path = self.dir / "var.pth", self.dir / "vae.pth"
        self.images = [conformance_image(s) for s in self.meta["images"]]

    def load(self, **kw) -> core.Model:
        return core.load_model(self.var_path, self.vae_path, **kw)


_SETS: dict[str, ConformanceSet] = {}
_MODELS: dict[str, core.Model] = {}


@pytest.fixture(scope="session", params=CONFORMANCE_SETS)
def conf(request) -> ConformanceSet:
    return _SETS.setdefault(request.param, ConformanceSet(request.param))


@pytest.fixture(scope="session")
def conf_model(conf) -> core.Model:
    if conf.name not in _MODELS:
        _MODELS[conf.name] = conf.load()
    return _MODELS[conf.name]


_ENGINE_MODELS: dict[tuple[str, str], core.Model] = {}


@pytest.fixture(scope="session", params=DEVICES)
def engine_model(conf, request) -> core.Model:
    """The conformance model on every available device: the engine's tests run on each."""
    key = (conf.name, request.param)
    if key not in _ENGINE_MODELS:
        _ENGINE_MODELS[key] = _MODELS[conf.name] if request.param == "cpu" and conf.name in _MODELS else \
            conf.load(device=request.param)
    return _ENGINE_MODELS[key]


def avarc(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run the real CLI entry point in this process → (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["avarc", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err
