"""The built wheel (what `pip install .` installs) is complete: data files ship and the CLI starts from it."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_data_and_cli_runs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)],
                   check=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("avarc-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    for f in ("core/data/imagenet_class_index.json", "core/data/imagenet100.txt",
              "core/data/imagenet_variant_classes.json"):
        assert f in names
    tracked = subprocess.run(["git", "ls-files", "profiles", "core/weights"], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    for f in tracked:
        assert f in names, f"{f} is tracked but not in the wheel"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-m", "avarc_cli", "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0 and "Usage" in out.stdout
    origin = subprocess.run([sys.executable, "-c", "import core; print(core.__file__)"], cwd=tmp_path, env=env,
                            capture_output=True, text=True).stdout
    assert str(tmp_path / "site") in origin
