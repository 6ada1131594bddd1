"""Shared fixtures and helpers: the conformance vectors (tests/data/conformance, computed by the upstream VAR code),
the hub stand-in on 127.0.0.1, the real digits as folders, and a tiny explain setup."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

import avarc
from avarc import Classifier, ModelSpec, VARSpec, VQVAESpec
from avarc.cli.app import main
from avarc.engine.profile import Profile
from avarc.engine.runtime import usable_cores
from avarc.engine.schedule import classify as run_schedule
from avarc.engine.schedule import run_stages
from avarc.engine.scoring import Scorer
from avarc.engine.stages import Prediction
from avarc.engine.torch_state import torch_settings
from avarc.io import distributed
from avarc.io.data import Item
from avarc.io.preprocess import pixels_to_tensor
from avarc.models import block_ops
from scripts.digits import load_digits

DATA = Path(__file__).parent / "data"


def pytest_configure(config) -> None:
    """Every cache the suite writes (ONNX exports, compiled kernels, crash logs, the hub's and datasets' caches,
    matplotlib's fonts) in a folder of this process's own, chosen before any test module is imported: pytest-xdist's
    workers never share one, and a user's ~/.cache is never touched. Subprocesses inherit it."""
    config.avarc_caches = Path(tempfile.mkdtemp(prefix="avarc-tests-"))
    os.environ["XDG_CACHE_HOME"] = str(config.avarc_caches / "xdg")
    os.environ["HF_HOME"] = str(config.avarc_caches / "hf")
    os.environ["MPLCONFIGDIR"] = str(config.avarc_caches / "matplotlib")


def pytest_unconfigure(config) -> None:
    shutil.rmtree(config.avarc_caches, ignore_errors=True)


# The suite's own torch threads: the usable cores shared among pytest-xdist's workers (the library sets its own per
# call and puts them back). Every test starts from the same torch settings, so its speed and its random numbers do
# not depend on the tests that ran before it.
SUITE_THREADS = max(1, usable_cores() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


@pytest.fixture(scope="session", autouse=True)
def pinned_suite_settings():
    """The same settings for the module- and session-scoped fixtures, which are computed before a test's own pin
    (the digits' fp32 runs, the ONNX export, the tune folders)."""
    with torch_settings(SUITE_THREADS):
        yield


@pytest.fixture(autouse=True)
def pinned_torch_settings():
    with torch_settings(SUITE_THREADS):
        yield


@pytest.fixture
def emulated(monkeypatch):
    """This process as a CPU without native bf16 (oneDNN's bf16 kernels off; ``AVARC_CPU_BF16=emulated``), restored
    afterwards: the AVX2 path, proved on a host that has native bf16 (test_portability, test_bf16_digits)."""
    monkeypatch.setenv(block_ops.EMULATED_ENV, "emulated")
    block_ops.onednn_bf16.cache_clear()
    yield
    monkeypatch.undo()
    block_ops.onednn_bf16.cache_clear()


def predict_as(model: avarc.Model, tokens: torch.Tensor, profile: Profile, dtype: torch.dtype,
               scorer: Scorer | None = None) -> list[Prediction]:
    """The profile's stages over every class, computed in ``dtype`` (the model is put back to fp32 afterwards):
    the precision guard's tests score the same tokens in fp32 and bf16."""
    model.dtype = dtype
    try:
        return run_stages(model, tokens, range(model.num_classes), profile, scorer)
    finally:
        model.dtype = torch.float32


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

    def load(self, **kw) -> avarc.Model:
        return avarc.load_model(self.var_path, self.vae_path, **kw)


_SETS: dict[str, ConformanceSet] = {}
_MODELS: dict[str, avarc.Model] = {}


# A property that does not depend on the geometry (the guard, reuse of keys/values, the ONNX export) is proved once,
# on the cheaper 256-px set; the 512-px set proves conformance proper (test_conformance).
AT_256 = pytest.mark.parametrize("conf", ["official256"], indirect=True)


@pytest.fixture(scope="session", params=CONFORMANCE_SETS)
def conf(request) -> ConformanceSet:
    return _SETS.setdefault(request.param, ConformanceSet(request.param))


@pytest.fixture(scope="session")
def conf_model(conf) -> avarc.Model:
    if conf.name not in _MODELS:
        _MODELS[conf.name] = conf.load()
    return _MODELS[conf.name]


_ENGINE_MODELS: dict[tuple[str, str], avarc.Model] = {}


@pytest.fixture(scope="session", params=DEVICES)
def engine_model(conf, request) -> avarc.Model:
    """The conformance model on every available device: the engine's tests run on each."""
    key = (conf.name, request.param)
    if key not in _ENGINE_MODELS:
        _ENGINE_MODELS[key] = _MODELS[conf.name] if request.param == "cpu" and conf.name in _MODELS else \
            conf.load(device=request.param)
    return _ENGINE_MODELS[key]


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run the real CLI entry point in this process → (exit code, stdout, stderr)."""
    ran = cli_run(*args)
    return ran.returncode, ran.stdout, ran.stderr


def cli_run(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real CLI entry point in this process, as a finished process looks (for module fixtures, where capsys is
    not available): what it printed, its exit code; ``cwd`` the folder it runs in. Processes only where the process
    is the subject (signals, two processes at once, what a fresh interpreter imports)."""
    argv, here, out, err = sys.argv, os.getcwd(), io.StringIO(), io.StringIO()
    sys.argv = ["avarc", *map(str, args)]
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = argv
        os.chdir(here)
    return subprocess.CompletedProcess(["avarc", *map(str, args)], code, out.getvalue(), err.getvalue())


# The hub stand-in: a real HTTP server on 127.0.0.1 that answers like the Hugging Face hub (test_download,
# test_datasets, test_classifier's from_pretrained).
HUB_REPO = "FoundationVision/var"
HUB_COMMIT = "1f0e2d3c4b5a69788796a5b4c3d2e1f0a9b8c7d6"
HUB_FILES = {"vae_ch160v4096z32.pth": CONFORMANCE / "official256" / "vae.pth",
         "var_d16.pth": CONFORMANCE / "official256" / "var.pth"}
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


class FakeHub(ThreadingHTTPServer):
    """HEAD/GET /{repo}/resolve/{revision}/{filename}, recording every request it sees."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.blobs: dict[str, bytes] = {}
        self.sha256: dict[str, str] = {}
        for name, path in HUB_FILES.items():
            self.serve(name, path.read_bytes())
        self.requests: list[tuple[str, str, dict[str, str]]] = []   # method, path, headers (lower-case names)
        self.cut_after: dict[str, int] = {}  # filename → bytes sent on its first GET before the connection is closed
        self.corrupt: set[str] = set()       # filenames served with flipped bytes (the advertised hash stays right)

    def serve(self, name: str, data: bytes) -> None:
        self.blobs[name], self.sha256[name] = data, hashlib.sha256(data).hexdigest()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def gets(self, name: str) -> list[dict[str, str]]:
        return [h for m, p, h in self.requests if m == "GET" and p.endswith("/" + name)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeHub

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        hub = self.server
        hub.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        m = RESOLVE.match(self.path)
        if not m or m["repo"] != HUB_REPO:
            return self._error(404, "RepoNotFound")
        if m["rev"] not in ("main", HUB_COMMIT):
            return self._error(404, "RevisionNotFound")
        name = m["file"]
        if name not in hub.blobs:
            return self._error(404, "EntryNotFound")
        data = hub.blobs[name]
        if name in hub.corrupt:
            data = data[: len(data) // 2] + bytes(b ^ 0xFF for b in data[len(data) // 2:])
        start = 0
        rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if body and rng:
            start = int(rng[1])
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{hashlib.sha1(name.encode()).hexdigest()}"')  # the LFS pointer's git oid
        self.send_header("X-Linked-Etag", f'"{hub.sha256[name]}"')
        self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("X-Repo-Commit", HUB_COMMIT)
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        cut = hub.cut_after.pop(name, None)
        if cut is not None:
            self.wfile.write(data[:cut])
            self.wfile.flush()
            self.close_connection = True  # the client sees the body end early
            return
        self.wfile.write(data[start:])

    def _error(self, status: int, code: str) -> None:
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Repo-Commit", HUB_COMMIT)
        self.send_header("Content-Length", "0")
        self.end_headers()





# The conformance model as CLI arguments, and reading a run's records.
MODEL = ["--model", str(CONFORMANCE / "official256" / "var.pth"), "--vae", str(CONFORMANCE / "official256" / "vae.pth"),
         "--device", "cpu", "--dtype", "fp32"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def save_digits(root: Path, start: int, stop: int) -> Path:
    """Test digits start…stop−1 as label/index.png (8-bit greyscale, exactly the model's training pixels)."""
    d = load_digits("all")
    for i in range(start, stop):
        (root / str(d.labels[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(d.images[i], mode="L").save(root / str(d.labels[i]) / f"{i}.png")
    return root


@pytest.fixture
def small_disk(tmp_path):
    """A function making a tmpfs of ``size`` (``"64k"``) under tmp_path, unmounted afterwards (needs root; the test
    is skipped with the reason where mounting is not allowed): a real ENOSPC."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk-{size}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a small tmpfs for a real ENOSPC: {proc.stderr.strip() or proc.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def save_classes(root: Path, classes: Sequence[int], per_class: int) -> Path:
    """The first ``per_class`` digits of each of ``classes`` as root/label/0.png, 1.png, …"""
    d = load_digits("all")
    for label in classes:
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        for n, i in enumerate(np.flatnonzero(d.labels == label)[:per_class]):
            Image.fromarray(d.images[i], mode="L").save(root / str(label) / f"{n}.png")
    return root


# A tiny explain setup (test_explain, test_explain_cli): the image and class pair, the maps by the formula's loops.
IMAGE, A, B = 1, 3, 7


def expected_maps(logp_a: np.ndarray, logp_b: np.ndarray, logp_null: np.ndarray, patch_nums) -> np.ndarray:
    """The issue's formula with plain loops: per-token differences per scale, nearest-neighbour to p×p,
    weighted (p_k/p)²."""
    p = patch_nums[-1]
    out = np.zeros((3, p, p))
    for m, diff in enumerate((logp_a - logp_null, logp_b - logp_null, logp_a - logp_b)):
        start = 0
        for k in patch_nums:
            grid = diff[start:start + k * k].reshape(k, k)
            for y in range(p):
                for x in range(p):
                    out[m, y, x] += (k / p) ** 2 * grid[y * k // p, x * k // p]
            start += k * k
    return out


def tiny_spec(num_classes: int, patch_nums=(1, 2, 3, 4, 8), class_names=()) -> ModelSpec:
    """A 16-px model small enough to build in milliseconds (random weights)."""
    vae = VQVAESpec(vocab_size=32, z_channels=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, num_groups=8,
                    using_sa=False, using_mid_sa=False)
    var = VARSpec(depth=1, embed_dim=32, num_heads=1, num_classes=num_classes, patch_nums=patch_nums, vocab_size=32,
                  z_channels=8)
    return ModelSpec(vae, var, 16, preprocess="resize", class_names=class_names)


def counted_run(clf: Classifier, items: list[Item], candidates: list[int]) -> tuple[list[Prediction], float]:
    """The classifier's batch loop with one Scorer for the whole run: predictions and the linear MACs executed."""
    scorer = Scorer(clf.model, clf.batch_size)

    def step(batch: list[Item], pixels: list) -> list[Prediction]:
        x = torch.stack([pixels_to_tensor(px) for px in pixels])
        return run_schedule(clf.model, clf.model.encode(x), candidates, clf.profile, 0, scorer)

    per_step = distributed.images_per_step(clf.batch_size, len(candidates))
    preds = [p for batch in distributed.run(items, clf.load, step, per_step=per_step) for p in batch]
    return preds, scorer.macs.linear
