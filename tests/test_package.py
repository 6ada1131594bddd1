"""The built wheel (what `pip install .` installs) is complete: one package, ``avarc``, with its data files and the CLI;
nothing under a generic top-level name that a user's own ``core/`` or ``profiles/`` could shadow."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_one_avarc_package_that_a_users_core_does_not_shadow(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)],
                   check=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("avarc-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"avarc"}
    for f in ("avarc/data/imagenet_class_index.json", "avarc/data/imagenet100.txt",
              "avarc/data/imagenet_variant_classes.json", "avarc/cli/app.py", "avarc/__main__.py"):
        assert f in names
    tracked = subprocess.run(["git", "ls-files", "profiles", "core/weights"], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    for f in tracked:
        assert "avarc/" + f.removeprefix("core/") in names, f"{f} is tracked but not in the wheel"
    # A user's project with its own core/ and profiles/ packages, run from its folder (first on sys.path).
    project = tmp_path / "project"
    for own in ("core", "profiles"):
        (project / own).mkdir(parents=True)
        (project / own / "__init__.py").write_text("MINE = True\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-m", "avarc", "--help"], cwd=project, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0 and "Usage" in out.stdout, out.stderr
    probe = ("import core, profiles, avarc; from avarc.io.profiles import list_profiles; "
             "from avarc.io.data import imagenet_classes; "
             "print(core.MINE, profiles.MINE, avarc.__file__, avarc.Classifier.__name__, len(list_profiles()), "
             "imagenet_classes()[0][1])")
    done = subprocess.run([sys.executable, "-c", probe], cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    mine, also_mine, origin, door, count, first_class = done.stdout.split()
    assert mine == also_mine == "True" and origin.startswith(str(tmp_path / "site")) and door == "Classifier"
    assert int(count) == sum(f.endswith(".yaml") for f in tracked) > 0
    assert first_class == "tench"       # the package's own data/, not the user's core/
