"""`avarc download` (core/hub.py, core/registry.py) against a real HTTP server on 127.0.0.1 that answers like the hub.

The server serves the conformance checkpoints (tests/data/conformance/official256/{vae,var}.pth) under the official
names in FoundationVision/var, with the headers huggingface_hub reads (linked ETag = SHA-256, linked size, commit),
Range requests, and faults on demand: a connection cut mid-transfer, or bytes that do not match the advertised hash.
Each `avarc` run is a real subprocess, so HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE are read as a user's shell sets them.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from avarc import AvarcError, preprocess_image
from avarc.cli.output import message
from avarc.io.loading import resolve_model
from tests.conftest import CONFORMANCE, HUB_COMMIT, HUB_FILES, ConformanceSet, FakeHub


@pytest.fixture
def hub():
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def env(hub, tmp_path) -> dict[str, str]:
    """A user's shell pointed at the fake hub, with its own HF_HOME and user cache."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    return {**keep, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "xdg"),
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "COLUMNS": "400"}


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "avarc", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def snapshot(env: dict[str, str], name: str) -> Path:
    return Path(env["HF_HOME"]) / "hub" / "models--FoundationVision--var" / "snapshots" / HUB_COMMIT / name


def test_download_is_byte_identical_with_token_and_second_run_fetches_nothing(hub, env):
    r = cli({**env, "HF_TOKEN": "hf_secret"}, "download")
    assert r.returncode == 0, r.stderr
    for name, src in HUB_FILES.items():
        path = snapshot(env, name)
        assert path.read_bytes() == src.read_bytes()
        assert path.resolve().name == hub.sha256[name]  # the blob, named by its SHA-256
        (get,) = hub.gets(name)
        assert get["authorization"] == "Bearer hf_secret"
    assert "downloaded" in r.stdout and hub.sha256["var_d16.pth"][:12] in r.stdout

    hub.requests.clear()
    r = cli(env, "download", "vae", "d16")
    assert r.returncode == 0, r.stderr
    assert [m for m, p, _ in hub.requests if p != "/"] == ["HEAD", "HEAD"]    # besides the reachability probe
    assert r.stdout.count("present") == 2 and "downloaded" not in r.stdout


def test_cut_transfer_is_resumed_with_a_range_request(hub, env, tmp_path):
    # huggingface_hub keeps what it has received in 10 MiB steps, so the file must be larger than that to resume
    # mid-way: the conformance VQ-VAE saved in fp32 (~19 MB), cut after 12 MB.
    big = tmp_path / "vae_fp32.pth"
    torch.save({k: v.float() for k, v in torch.load(HUB_FILES["vae_ch160v4096z32.pth"], weights_only=True).items()},
               big)
    data = big.read_bytes()
    hub.serve("vae_ch160v4096z32.pth", data)
    hub.cut_after["vae_ch160v4096z32.pth"] = 12_000_000
    r = cli(env, "download", "vae")
    assert r.returncode == 0, r.stderr
    first, second = hub.gets("vae_ch160v4096z32.pth")
    start = int(re.fullmatch(r"bytes=(\d+)-", second["range"])[1])
    assert "range" not in first and 0 < start <= 12_000_000
    assert snapshot(env, "vae_ch160v4096z32.pth").read_bytes() == data


def test_file_that_does_not_match_the_hub_hash_is_rejected_and_not_left_behind(hub, env):
    hub.corrupt.add("var_d16.pth")
    r = cli(env, "download", "vae", "d16")
    assert r.returncode == 2
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("error: d16: var_d16.pth does not match the hub's checksum")
    assert "avarc download d16" in error
    repo = Path(env["HF_HOME"]) / "hub" / "models--FoundationVision--var"
    left = sorted(p.name for p in repo.rglob("*") if p.is_file() or p.is_symlink())
    assert left == sorted(["main", "vae_ch160v4096z32.pth", hub.sha256["vae_ch160v4096z32.pth"]])  # ref + the good file
    assert not list(Path(env["HF_HOME"]).rglob("*.incomplete"))
    assert snapshot(env, "vae_ch160v4096z32.pth").read_bytes() == HUB_FILES["vae_ch160v4096z32.pth"].read_bytes()

    hub.corrupt.clear()  # the hub serves the right bytes again: a plain rerun repairs it
    r = cli(env, "download", "d16")
    assert r.returncode == 0, r.stderr
    assert snapshot(env, "var_d16.pth").read_bytes() == HUB_FILES["var_d16.pth"].read_bytes()


def test_offline_uses_the_cache_without_any_request(hub, env, conf_golden_256):
    assert cli(env, "download").returncode == 0
    hub.requests.clear()
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    r = cli(offline, "download")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("present") == 2
    load = ("import torch, avarc.io.loading as r; m = r.resolve_model('d16'); g = torch.load(%r, weights_only=True); "
            "print(torch.equal(m.tokenize_latent(g['latent']), g['tokens']))" % str(conf_golden_256))
    r = subprocess.run([sys.executable, "-c", load], env=offline, capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "True", r.stderr
    r = cli(offline, "download", "d20")
    assert r.returncode == 2 and "HF_HUB_OFFLINE is set" in r.stderr
    assert hub.requests == []


def test_dir_places_plain_files_that_resolve_model_finds(hub, env, tmp_path):
    conf = ConformanceSet("official256")
    weights = tmp_path / "weights"
    r = cli(env, "download", "d16", "--dir", str(weights), "--onnx")
    assert r.returncode == 0, r.stderr
    for name, src in HUB_FILES.items():
        assert not (weights / name).is_symlink() and (weights / name).read_bytes() == src.read_bytes()
    onnx = weights / "vae_ch160v4096z32.onnx"
    assert onnx.is_file() and (weights / "vae_ch160v4096z32.onnx.json").is_file()
    assert not (Path(env["HF_HOME"]) / "hub" / "models--FoundationVision--var").exists()

    model = resolve_model("d16", model_dir=weights)
    assert torch.equal(model.tokenize_latent(conf.golden["latent"]), conf.golden["tokens"])
    stamp = onnx.stat().st_mtime_ns
    model = resolve_model("d16", model_dir=weights, encoder="onnx")  # the export made by --onnx is reused
    assert onnx.stat().st_mtime_ns == stamp
    image = preprocess_image(conf.images[1], 256)[None]
    assert (model.encode(image) - conf.golden["latent"][1:2]).abs().max() < 1e-4

    hub.requests.clear()
    r = cli(env, "download", "d16", "--dir", str(weights))
    assert r.returncode == 0 and not hub.gets("var_d16.pth") and not hub.gets("vae_ch160v4096z32.pth")


def test_missing_model_says_which_download_to_run(tmp_path, env):
    with pytest.raises(AvarcError) as err:
        resolve_model("d16", model_dir=tmp_path)
    assert str(err.value) == (f"model 'd16' is not in {tmp_path}; download it with "
                              f"Classifier.from_pretrained('d16', model_dir={str(tmp_path)!r}) "
                              "(without local_files_only)")
    assert message(err.value) == f"model 'd16' is not in {tmp_path}; run `avarc download d16 --dir {tmp_path}`"
    with pytest.raises(AvarcError) as err:
        resolve_model(tmp_path / "nothing.pth")
    assert "no such model file" in str(err.value)
    show = "import avarc.io.loading as r\ntry: r.resolve_model('d20-cca', vae='vae')\nexcept Exception as e: print(e)"
    r = subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == ("model 'd20-cca' is not in the Hugging Face cache; "
                                "download it with Classifier.from_pretrained('d20-cca') (without local_files_only)")


def test_list_shows_sizes_purposes_and_what_is_here(hub, env):
    assert cli(env, "download", "vae").returncode == 0
    r = cli(env, "download", "--list")
    assert r.returncode == 0, r.stderr
    rows = {line.split("│")[1].strip(): line for line in r.stdout.splitlines() if line.count("│") > 3}
    assert str(snapshot(env, "vae_ch160v4096z32.pth")) in rows["vae"] and "437.0 MB" in rows["vae"]
    assert "not downloaded" in rows["d16"] and "1.2 GB" in rows["d16"] and "A-VARC+" in rows["d30-cca"]
    assert set(rows) >= {"vae", "d16", "d20", "d24", "d30", "d36", "d16-cca", "d20-cca", "d24-cca", "d30-cca", "digits"}
    assert not hub.gets("var_d16.pth")


def test_unknown_names_and_revisions_are_one_line_errors(hub, env):
    r = cli(env, "download", "d99")
    assert r.returncode == 2 and r.stderr.startswith("error: unknown model 'd99'") and r.stderr.count("\n") == 1
    r = cli(env, "download", "vae", "--revision", "v9")
    assert r.returncode == 2 and "revision 'v9' not found in FoundationVision/var" in r.stderr


@pytest.fixture
def conf_golden_256(tmp_path) -> Path:
    """official256's golden latent and tokens, saved where a subprocess can load them."""
    import numpy as np

    g = np.load(CONFORMANCE / "official256" / "golden.npz")
    path = tmp_path / "golden.pt"
    torch.save({"latent": torch.from_numpy(g["latent"]), "tokens": torch.from_numpy(g["tokens"])}, path)
    return path


def test_from_pretrained_downloads_what_is_not_here(hub, env):
    """The library fetches a registry model (and its VQ-VAE) on first use, as `avarc download` does; with
    local_files_only it refuses in one line that says how to get it."""
    code = ("from avarc import AvarcError, Classifier\n"
            "try:\n    Classifier.from_pretrained('d16', device='cpu', local_files_only=True)\n"
            "except AvarcError as e:\n    print('refused:', e)\n"
            "clf = Classifier.from_pretrained('d16', device='cpu', dtype='fp32')\n"
            "print(clf.spec.image_size, clf.model.num_classes)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.strip().splitlines()
    assert first.startswith("refused: model 'd16' is not in the Hugging Face cache; download it with "
                            "Classifier.from_pretrained('d16')"), first
    assert second == "256 10"                       # the conformance checkpoint served as d16: 10 classes
    assert len(hub.gets("var_d16.pth")) == 1 and len(hub.gets("vae_ch160v4096z32.pth")) == 1
    for name, src in HUB_FILES.items():
        assert snapshot(env, name).read_bytes() == src.read_bytes()


def test_unreachable_hub_is_one_line_at_once(env):
    """A port that refuses connections: one line naming the endpoint and the reason, exit 2, no retry noise."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]          # nothing listens here once the socket is closed
    r = cli({**env, "HF_ENDPOINT": f"http://127.0.0.1:{closed}"}, "download", "d16")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Retrying" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"error: vae: cannot reach http://127.0.0.1:{closed} (Connection refused)")
