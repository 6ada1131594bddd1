"""avarc.Classifier, the one door: the README's example runs as written, and the library gives exactly what the
commands give (``avarc classify`` records, ``avarc explain`` NPZ maps, ``avarc add-class`` extension rows), on
the bundled ``digits`` model and its example images (examples/digits)."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import avarc
from avarc import AvarcError, Classifier
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "digits"
PATHS = sorted(str(p) for p in EXAMPLES.glob("*/*.png"))
FP32 = ["--device", "cpu", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def clf() -> Classifier:
    return Classifier.from_pretrained("digits", profile="varc", device="cpu", dtype="fp32")


def readme_library_code() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Library\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_library_example_runs_as_written(tmp_path):
    code = readme_library_code()
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) == 9, code
    (tmp_path / "examples").symlink_to(REPO / "examples")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    printed = r.stdout.split()
    assert printed[0] == "3" and float(printed[1]) > 0.5     # examples/digits/3/1438.png is a 3, and confidently so
    assert printed[2] == "3" and printed[3].startswith("Classifier('digits'")    # a folder of two and one image
    assert (tmp_path / "why.png").is_file() and (tmp_path / "why.npz").is_file()
    assert (tmp_path / "samples" / "grid.png").is_file() and (tmp_path / "samples" / "tokens.npz").is_file()
    assert (tmp_path / "why" / "1438.as_8.png").is_file()


def test_attributes(clf):
    assert clf.class_names == [str(d) for d in range(10)]
    assert clf.profile.name == "varc" and [s.scales for s in clf.profile.stages] == [4]     # resolved for 4 scales
    assert clf.spec.var.patch_nums == (1, 2, 3, 4) and clf.spec.preprocess == "resize"
    assert clf.device == torch.device("cpu") and clf.dtype == torch.float32
    assert Classifier.from_pretrained("digits", device="cpu").profile.name == "digits"       # the registry's default


def test_classify_equals_the_cli(clf, tmp_path, monkeypatch, capsys):
    preds = clf.classify(PATHS)
    out = tmp_path / "run.jsonl"
    code, _, err = run_cli(monkeypatch, capsys, "classify", *PATHS, "--profile", "varc", "--out", out, *FP32)
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in records] == PATHS
    for p, r in zip(preds, records):
        assert (p.pred, p.pred_name) == (r["pred"], r["pred_name"])
        assert [c for c, _ in p.ranking[:5]] == [t["class"] for t in r["topk"]]
        assert [round(s, 4) for _, s in p.ranking[:5]] == [t["score"] for t in r["topk"]]
        assert [round(s, 4) for s in p.stages[0].scores] == r["stages"][0]["scores"]
    labels = [Path(p).parent.name for p in PATHS]
    assert sum(p.pred_name == y for p, y in zip(preds, labels)) >= 18                          # 20 real test digits
    assert [p.label for p in clf.classify(PATHS[:2], labels=labels[:2])] == [int(y) for y in labels[:2]]


def test_one_label_for_many_images_is_refused(clf):
    """A lone label is a single image's; given for several, it is one error naming ``labels`` (a string's letters
    were once read as one label per image)."""
    with pytest.raises(AvarcError, match=r"one label \('cat'\) was given for 3 images; pass a list"):
        clf.classify(PATHS[:3], labels="cat")
    with pytest.raises(AvarcError, match=r"one label \(3\) was given for 2 images"):
        clf.explain(PATHS[:2], labels=3)


def test_inputs_paths_pil_and_tensors_agree(clf):
    from PIL import Image

    pixels = [clf.prepare(p) for p in PATHS[:3]]
    by_path = clf.classify(PATHS[:3])
    by_pil = clf.classify([Image.open(p) for p in PATHS[:3]])
    by_tensor = clf.classify(torch.stack([torch.from_numpy(px.copy()).permute(2, 0, 1).float() / 127.5 - 1
                                          for px in pixels]))
    for a, b, c in zip(by_path, by_pil, by_tensor):
        assert a.ranking == b.ranking == c.ranking
    only = clf.classify(PATHS[:1], candidates=["3", "8"])[0]
    assert {c for c, _ in only.ranking} == {3, 8}


def test_every_input_form_one_or_many(clf):
    """A path, PIL image or 3-D tensor gives one Prediction; a folder, 4-D tensor or list gives a list, in order."""
    from PIL import Image

    one = clf.classify(PATHS[0])
    x = clf.preprocess(PATHS[0])
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert isinstance(one, avarc.Prediction) and one.pred_name == Path(PATHS[0]).parent.name
    assert isinstance(clf.classify(Image.open(PATHS[0])), avarc.Prediction)
    assert clf.classify(x).ranking == one.ranking                    # same pixels, same result
    folder = clf.classify(str(EXAMPLES / "3"))
    assert [p.pred_name for p in folder] == ["3", "3"]
    assert len(clf.classify(x[None].repeat(3, 1, 1, 1))) == 3
    mixed = clf.classify([str(EXAMPLES / "7"), PATHS[0], Image.open(PATHS[0]), x])
    assert len(mixed) == 5 and mixed[0].pred_name == "7"
    assert isinstance(clf.explain(PATHS[0]), avarc.Explanation) and len(clf.explain([PATHS[0], x])) == 2


@pytest.mark.parametrize("bad, says", [
    (lambda x: (x + 1) / 2, "looks like [0, 1]"),                       # a [0, 1] tensor of a real digit
    (lambda x: ((x + 1) * 127.5).round().byte(), "a uint8 tensor"),
    (lambda x: torch.nn.functional.interpolate(x[None], size=16)[0], "shape (3, 16, 16)"),
    (lambda x: x * 3, "values lie in"),
])
def test_wrong_tensors_are_one_clear_error(clf, bad, says):
    with pytest.raises(AvarcError) as err:
        clf.classify(bad(clf.preprocess(PATHS[0])))
    assert says in str(err.value) and "3×8×8 tensor in [-1, 1]" in str(err.value) and "clf.preprocess" in str(err.value)


def test_results_name_their_classes_and_print_in_one_line(clf):
    p = clf.classify(PATHS[0], labels=Path(PATHS[0]).parent.name)
    assert p.top[0].name == p.pred_name and p.top[0].id == p.pred and 0.5 < p.top[0].p <= 1
    assert [t.score for t in p.top] == [s for _, s in p.ranking]
    d = p.to_dict()
    assert json.loads(json.dumps(d)) == d and d["label_name"] == p.pred_name and len(d["top"]) == 5
    ext = avarc.Extension(torch.zeros(1, 4, 96), ["seven"], "ab" * 32, "digits")
    for obj in (clf, p, clf.explain(PATHS[0]), ext):
        text = repr(obj)
        assert "\n" not in text and len(text) < 200, text
    assert repr(clf).startswith("Classifier('digits': 10 classes")


def test_explanation_saves_the_cli_panels(clf, tmp_path):
    from PIL import Image

    from avarc.tasks.heatmap import figure_size

    ex = clf.explain(PATHS[0], a="3", b="8")
    path = ex.save(tmp_path / "e.png")
    with Image.open(path) as im:
        assert im.size == figure_size(8) and np.array_equal(np.asarray(im.convert("RGB")), np.asarray(ex.to_pil()))
    assert np.load(tmp_path / "e.npz")["names"].tolist() == ["3", "8"]
    shared = np.asarray(ex.to_pil(shared_scale=True))
    # one scale for the three maps draws them otherwise
    assert not np.array_equal(shared, np.asarray(ex.to_pil()))


def test_explain_equals_the_cli(clf, tmp_path, monkeypatch, capsys):
    chosen = PATHS[:4]
    exps = clf.explain(chosen, labels=[Path(p).parent.name for p in chosen])
    code, _, err = run_cli(monkeypatch, capsys, "explain", *chosen, "--profile", "varc", "--out", tmp_path, *FP32)
    assert code == 0, err
    for path, ex in zip(chosen, exps):
        saved = np.load(tmp_path / f"{Path(path).stem}.npz")
        assert np.array_equal(saved["maps"], ex.maps.numpy()) and saved["classes"].tolist() == list(ex.classes)
        assert ex.pixels.shape == (8, 8, 3)
    fixed = clf.explain(chosen[:1], a="3", b="null")[0]
    assert fixed.classes == (3, 10)
    with pytest.raises(AvarcError, match="same class"):
        clf.explain(chosen[:1], a=3, b="3")


def test_add_classes_equals_the_cli(tmp_path, monkeypatch, capsys):
    """Digit 3 added again as a new class 'three' from the example folder: same rows from library and CLI."""
    opts = dict(steps=3, holdout=0.5, seed=4)
    lib = Classifier.from_pretrained("digits", device="cpu", dtype="fp32")
    ext = lib.add_classes({"three": EXAMPLES / "3"}, **opts)
    assert lib.class_names[-1] == "three" and lib.model.num_classes == 11
    saved = ext.save(tmp_path / "lib.ext.pt")
    cli = tmp_path / "cli.ext.pt"
    code, _, err = run_cli(monkeypatch, capsys, "add-class", "three", EXAMPLES / "3", "--steps", 3, "--holdout", 0.5,
                         "--seed", 4, "--out", cli, *FP32)
    assert code == 0, err
    a, b = (torch.load(p, weights_only=True) for p in (saved, cli))
    assert torch.equal(a["rows"], b["rows"]) and a["names"] == b["names"] == ["three"]
    again = Classifier.from_pretrained("digits", extensions=[cli], device="cpu", dtype="fp32")
    assert again.class_names[-1] == "three" and again.extensions[0].sha256 == ext.sha256


def test_bare_var_file_of_any_geometry_loads_with_its_vae(tmp_path):
    weights = REPO / "core" / "weights" / "digits"
    ref = Classifier.from_pretrained("digits", profile="varc", device="cpu", dtype="fp32")
    as_file = Classifier.from_pretrained(weights / "var.pth", vae=weights / "vae.pth", profile="varc", device="cpu",
                                         dtype="fp32")      # a model directory's files: its meta.json completes them
    assert [p.ranking for p in as_file.classify(PATHS[:4])] == [p.ranking for p in ref.classify(PATHS[:4])]
    for name in ("var.pth", "vae.pth"):                        # bare files, nothing beside them: scales inferred
        (tmp_path / name).write_bytes((weights / name).read_bytes())
    bare = Classifier.from_pretrained(tmp_path / "var.pth", vae=tmp_path / "vae.pth", device="cpu")
    assert bare.spec.var.patch_nums == (1, 2, 3, 4) and bare.spec.image_size == 8 and bare.profile.name == "varc"
    assert len(bare.classify(PATHS[:1])[0].ranking) == 10
    stated = Classifier.from_pretrained(tmp_path / "var.pth", vae=tmp_path / "vae.pth", patch_nums=(1, 2, 3, 4))
    assert stated.spec.var.patch_nums == (1, 2, 3, 4)
    with pytest.raises(AvarcError, match="give 10 tokens but the checkpoint has 30"):
        Classifier.from_pretrained(tmp_path / "var.pth", vae=tmp_path / "vae.pth", patch_nums=(1, 3))


def test_ambiguous_scales_ask_to_be_stated():
    from avarc.models.specs import infer_patch_nums

    assert infer_patch_nums(30, 4) == (1, 2, 3, 4) and infer_patch_nums(680, 10)[-1] == 16
    with pytest.raises(AvarcError, match="ambiguous .* state them as patch_nums"):
        infer_patch_nums(139, 5)


LAYERS = ("errors", "choices", "models", "engine", "io", "tasks", "classifier", "runs")   # bottom first


def _core_imports() -> dict[str, set[str]]:
    """Every core module → the core modules it imports (the source, not a running interpreter), imports under
    ``if TYPE_CHECKING:`` included: a lower layer must not even name a higher one's types; a name imported from a
    package counts as its module when it is one."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / "core").rglob("*.py")):
        if path.name == "__main__.py":   # `python -m avarc` is the CLI's entry point, not a library layer
            continue
        parts = ("avarc", *path.relative_to(REPO / "core").with_suffix("").parts)   # core/ installs as avarc
        mod = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = mod.split(".") if parts[-1] == "__init__" else mod.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module or ""
                deps.add(base)
                deps.update(f"{base}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        assert not any(d == "avarc.cli" or d.startswith("avarc.cli.") for d in deps), (mod, deps)
        graph[mod] = {d for d in deps if d.startswith("avarc.") and d != mod and (
            (REPO / ("core" + d[5:].replace(".", "/") + ".py")).is_file()
            or (REPO / ("core" + d[5:].replace(".", "/")) / "__init__.py").is_file())}
    return graph


def test_core_imports_point_down_no_cli_no_cycle():
    """core is layered bottom up: errors, models (the networks), engine (tokens → likelihoods → schedule), io
    (files, data, registry, loading, results), tasks (explain, add classes, calibration), the Classifier door, and
    runs (whole jobs over a dataset: classify, tune, report, bench). Every import points to its own layer or
    below, nothing reaches the CLI (avarc.cli), and there is no import cycle."""
    graph = _core_imports()
    assert len(graph) > 35

    def layer(m: str) -> int:
        return LAYERS.index(m.split(".")[1])

    for m, deps in graph.items():
        if m == "avarc":
            continue
        up = [d for d in deps if d != "avarc" and layer(d) > layer(m)]
        assert not up, f"{m} imports {up}, a layer above it ({' < '.join(LAYERS)})"
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, ()):
            assert state.get(d) != 1, f"import cycle: {' → '.join(stack + [m, d])}"
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state and m != "avarc":
            visit(m, [])
