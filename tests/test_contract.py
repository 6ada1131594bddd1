"""The file contract: every reader of a results file (``--resume``, ``report``, ``explain --from``) reads what every
writer variant writes, and counts it right; records and profiles avarc writes validate against the published JSON
Schemas (schemas/)."""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from datetime import datetime
from functools import partial
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

import avarc
from avarc import AvarcError
from avarc.engine.profile import OodRule, Profile, Stage
from avarc.io.json_schemas import json_schemas, schema_text
from avarc.io.profiles import load_profile, shipped_names, write_profile
from avarc.io.records import parse_record
from avarc.io.summary import SUMMARY_COLUMNS
from scripts.ood_digits import noise
from tests.conftest import run_cli, save_digits

CPU = ("--device", "cpu")
SCHEMAS = Path(__file__).parents[1] / "schemas"


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def records_of(path: Path) -> list[dict]:
    """A results file's records, each valid by the published record schema and by avarc's own reader."""
    check = validator("record")
    lines = path.read_bytes().splitlines()
    for line in lines:
        check.validate(json.loads(line))
    return [parse_record(line) for line in lines]


def clean(err: str) -> bool:
    return "Traceback" not in err and "unexpected" not in err


def read_back(monkeypatch, capsys, tmp_path: Path, out: Path, *classify: str, model: tuple = ()) -> list[dict]:
    """Feed a run's results to every reader: ``--resume`` (nothing to do, nothing added), ``report`` and ``explain
    --from`` (``model``: the run's model options) all accept it and count it right; returns its records."""
    before = out.read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, "classify", *classify, *model, "-o", out, "--resume", *CPU)
    assert code == 0 and clean(err), err
    assert out.read_bytes() == before
    records = records_of(out)
    html = tmp_path / f"{out.stem}.html"
    code, _, err = run_cli(monkeypatch, capsys, "report", out, "-o", html)
    assert code == 0 and clean(err) and html.is_file(), err
    page = html.read_text()
    abstained = sum(r["status"] == "abstained" for r in records)
    skipped = sum(r["status"] == "skipped" for r in records)
    assert f"<td>abstained</td><td>{abstained}</td>" in page and f"<td>skipped</td><td>{skipped}</td>" in page
    code, _, err = run_cli(monkeypatch, capsys, "explain", "--from", out, "--out", tmp_path / f"{out.stem}-why",
                           *model, *CPU)
    assert code == 0 and clean(err), err
    decided = sum(r["status"] in ("ok", "abstained") for r in records)   # an abstained image keeps its ranking
    assert len(list((tmp_path / f"{out.stem}-why").glob("*.png"))) == decided
    return records


def test_ood_flow_calibrate_classify_then_every_reader(tmp_path, monkeypatch, capsys):
    """The README's OOD flow: calibrate-ood → classify -p ood.yaml -o → report, --resume, explain --from; abstentions
    are counted as such in the report and the summary CSV."""
    tune = save_digits(tmp_path / "tune", 1438, 1478)
    test = save_digits(tmp_path / "test", 1300, 1306)
    for i, im in enumerate(noise(3)):
        (test / "0").mkdir(exist_ok=True)
        im.save(test / "0" / f"noise{i}.png")
    prof = tmp_path / "ood.yaml"
    code, _, err = run_cli(monkeypatch, capsys, "calibrate-ood", tune, "-o", prof, *CPU)
    assert code == 0, err
    validator("profile").validate(yaml.safe_load(prof.read_text()))
    out, table = tmp_path / "r.jsonl", tmp_path / "s.csv"
    code, _, err = run_cli(monkeypatch, capsys, "classify", test, "-p", prof, "-o", out, "--csv", table, *CPU)
    assert code == 0, err
    records = read_back(monkeypatch, capsys, tmp_path, out, test, model=("-p", prof))
    statuses = {Path(r["path"]).name: r["status"] for r in records}
    assert [statuses[f"noise{i}.png"] for i in range(3)] == ["abstained"] * 3
    assert sum(s == "ok" for s in statuses.values()) >= 5
    row = next(csv.DictReader(table.open()))
    assert row["abstained"] == str(sum(s == "abstained" for s in statuses.values())) and row["images"] == "9"


def test_a_record_with_an_unknown_status_or_a_bad_field_is_one_line(tmp_path, monkeypatch, capsys):
    test = save_digits(tmp_path / "test", 1300, 1303)
    out = tmp_path / "r.jsonl"
    assert run_cli(monkeypatch, capsys, "classify", test, "-o", out, *CPU)[0] == 0
    good = out.read_text().splitlines()
    for field, value, says in (("status", 17, "does not match any of the expected tags"),
                               ("gflops", {"executed": "x"}, "gflops.executed"),
                               ("ood", {"score": "likelihood"}, "ood.likelihood"),
                               ("stages", [], "stages")):
        rec = json.loads(good[1])
        rec[field] = value
        out.write_text("\n".join([good[0], json.dumps(rec), good[2]]) + "\n")
        for args in (("report", out, "-o", tmp_path / "r.html"), ("explain", "--from", out, "--out", tmp_path / "w"),
                     ("classify", test, "-o", out, "--resume")):
            code, _, err = run_cli(monkeypatch, capsys, *args, *(CPU if args[0] != "report" else ()))
            assert code == 2 and clean(err) and len(err.strip().splitlines()) == 1, err
            assert "line 2" in err and says in err, err


def test_published_schemas_are_current_and_refuse_an_unknown_status():
    for name, schema in json_schemas().items():
        assert (SCHEMAS / name).read_text() == schema_text(schema), "regenerate: python -m avarc.io.json_schemas"
    profile = validator("profile")
    for name in shipped_names():
        profile.validate(yaml.safe_load(resources.files("avarc.profiles").joinpath(f"{name}.yaml").read_text()))
    assert not profile.is_valid({"stages": [{"scales": "six"}]})
    record = validator("record")
    skipped = {"path": "a.png", "label": None, "label_name": None, "status": "skipped", "error": "unreadable",
               "run": {"model": "digits", "profile": "digits", "seed": 0, "fingerprint": "0" * 16}}
    assert record.is_valid(skipped) and not record.is_valid({**skipped, "status": 17})
    assert not record.is_valid({**skipped, "status": "ok"})      # an ok record needs its prediction


def test_runs_of_different_profiles_ood_rules_and_dtypes_append_to_one_csv(tmp_path, monkeypatch, capsys):
    test = save_digits(tmp_path / "test", 1300, 1304)
    rule = OodRule("likelihood", 0.95, (("likelihood", -1e9), ("ratio", 0.0)))
    ood = write_profile(replace(load_profile("digits"), name="digits-ood", ood=rule), tmp_path / "ood.yaml")
    one = write_profile(Profile("one-stage", (Stage("all"),)), tmp_path / "one.yaml")
    table = tmp_path / "runs.csv"
    fp32 = ("--dtype", "fp32")
    for args in (fp32, ("-p", ood, "--dtype", "bf16"), ("-p", one, "--ood-score", "ratio", *fp32)):
        code, _, err = run_cli(monkeypatch, capsys, "classify", test, "--csv", table, *args, *CPU)
        assert code == 0 and clean(err), err
    lines = table.read_text().splitlines()
    rows = list(csv.DictReader(lines))
    assert lines[0].split(",") == SUMMARY_COLUMNS and len(rows) == 3
    assert [(r["profile"], r["dtype"], r["ood_rule"]) for r in rows] == [
        ("digits", "float32", ""), ("digits-ood", "bfloat16", "likelihood>=-1000000000.0"),
        ("one-stage", "float32", "")]
    assert all(r["weights"].startswith("sha256:") and r["vae_weights"].startswith("sha256:") for r in rows)
    assert all(r["avarc_version"] == avarc.__version__ and datetime.fromisoformat(r["started"]) for r in rows)
    assert all(r["images"] == "4" and r["abstained"] == "0" and float(r["top1"]) >= 0.75 for r in rows)
    assert all(float(r["gflops_paper"]) > 0 and float(r["gflops_executed"]) > 0 for r in rows)
    assert rows[0]["inputs"] == str(test) and rows[2]["stages"] == "4x1->1"
    old = tmp_path / "old.csv"
    old.write_text("model,profile,seed,dataset,subset,images,skipped,top1,top5,recall_stage1,early_exits,"
                   "images_per_s\ndigits,digits,0,,,4,0,1.0,1.0,1.0,0,3.0\n")
    code, _, err = run_cli(monkeypatch, capsys, "classify", test, "--csv", old, *CPU)
    assert code == 2 and "a summary CSV of an older avarc" in err and len(err.strip().splitlines()) == 1


def _early_exit(tmp_path: Path, test: Path, cli) -> tuple[list, tuple]:
    staged = Profile("early", (Stage(2, 1, 5, exit_margin=3.6), Stage("all")))
    return [test], ("-p", write_profile(staged, tmp_path / "early.yaml"), "--dtype", "fp32")


def _bf16_guard(tmp_path: Path, test: Path, cli) -> tuple[list, tuple]:
    return [test], ("--dtype", "bf16")


def _extension(tmp_path: Path, test: Path, cli) -> tuple[list, tuple]:
    ext = tmp_path / "sevens.pt"
    assert cli("add-class", "sevens", test / "7", "--steps", 2, "--out", ext, *CPU)[0] == 0
    return [test], ("-e", ext, "--dtype", "fp32")


def _rows(test: Path):  # noqa: ANN202 (a datasets.Dataset)
    import datasets

    files = sorted(test.rglob("*.png"))
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    return datasets.Dataset.from_dict({"image": [{"bytes": f.read_bytes(), "path": None} for f in files],
                                       "label": [int(f.parent.name) for f in files]}, features=features)


def _parquet(tmp_path: Path, test: Path, cli) -> tuple[list, tuple]:
    _rows(test).to_parquet(str(tmp_path / "d.parquet"))
    return [tmp_path / "d.parquet"], ("--dtype", "fp32")


def _save_to_disk(tmp_path: Path, test: Path, cli) -> tuple[list, tuple]:
    import datasets

    datasets.DatasetDict({"test": _rows(test)}).save_to_disk(str(tmp_path / "saved"))
    return [tmp_path / "saved"], ("--dtype", "fp32")


def _from_list(tmp_path: Path, test: Path, cli) -> tuple[list, tuple]:
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"{p.relative_to(tmp_path)}\n" for p in sorted(test.rglob("*.png"))))
    return ["--from-list", listed, "--labels", "folders"], ("--dtype", "fp32")


def _skipped(tmp_path: Path, test: Path, cli) -> tuple[list, tuple]:
    (test / "3" / "broken.png").write_bytes(b"not a png")
    (test / "5" / "empty.png").write_bytes(b"")
    return [test], ("--dtype", "fp32")


@pytest.mark.parametrize("writer", [_early_exit, _bf16_guard, _extension, _parquet,
                                    _save_to_disk, _from_list, _skipped],
                         ids=lambda w: w.__name__.strip("_"))
def test_every_reader_reads_what_every_writer_writes(writer, tmp_path, monkeypatch, capsys):
    """The reader/writer matrix: each writer variant's run is resumed (nothing redone), reported (abstained and
    skipped counted) and explained from, with nothing refused."""
    test = save_digits(tmp_path / "test", 1300, 1312)
    inputs, model = writer(tmp_path, test, partial(run_cli, monkeypatch, capsys))
    out = tmp_path / "r.jsonl"
    code, _, err = run_cli(monkeypatch, capsys, "classify", *inputs, *model, "-o", out, *CPU)
    assert code == 0 and clean(err), err
    records = read_back(monkeypatch, capsys, tmp_path, out, *inputs, model=model)
    assert len(records) == len(list(test.rglob("*.png")))
    assert sum(r["label_rank"] == 1 for r in records if r["status"] == "ok") >= 10
    if writer is _early_exit:
        assert any(r["exited_after"] == 1 for r in records)
    if writer is _skipped:         # resumed: the two broken images were tried again, skipped for the same reason
        assert sorted(Path(r["path"]).name for r in records if r["status"] == "skipped") == ["broken.png",
                                                                                             "empty.png"]


def test_a_dataset_resumes_by_its_resolved_path_and_a_rewritten_one_is_another_run(tmp_path, monkeypatch, capsys):
    test = save_digits(tmp_path / "test", 1300, 1306)
    rows = _rows(test)
    rows.to_parquet(str(tmp_path / "d.parquet"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.jsonl"
    assert run_cli(monkeypatch, capsys, "classify", "d.parquet", "-o", out, *CPU)[0] == 0
    before = out.read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, "classify", tmp_path / "d.parquet", "-o", out, "--resume", *CPU)
    assert code == 0 and out.read_bytes() == before, err                 # $PWD/d.parquet: the same rows, none redone
    rows.select(range(len(rows) - 1, -1, -1)).to_parquet(str(tmp_path / "d.parquet"))     # rows reversed
    code, _, err = run_cli(monkeypatch, capsys, "classify", "d.parquet", "-o", out, "--resume", *CPU)
    assert code == 2 and "holds records of another run (inputs" in err and out.read_bytes() == before, err


def test_resume_tries_skipped_images_again_and_readers_count_each_image_once(tmp_path, monkeypatch, capsys):
    test = save_digits(tmp_path / "test", 1300, 1304)
    half = test / "3" / "half.png"
    half.write_bytes((test / "3").joinpath(next(p.name for p in (test / "3").iterdir())).read_bytes()[:20])
    out = tmp_path / "r.jsonl"
    assert run_cli(monkeypatch, capsys, "classify", test, "-o", out, *CPU)[0] == 0
    assert [r["status"] for r in records_of(out) if r["path"] == str(half)] == ["skipped"]
    save_digits(tmp_path / "more", 1305, 1306)
    next((tmp_path / "more").rglob("*.png")).replace(half)                  # the copy finished
    code, _, err = run_cli(monkeypatch, capsys, "classify", test, "-o", out, "--resume", *CPU)
    assert code == 0 and "4 images already done, 1 to go (1 skipped before, tried again)" in err, err
    assert [r["status"] for r in records_of(out) if r["path"] == str(half)] == ["skipped", "ok"]
    code, _, err = run_cli(monkeypatch, capsys, "report", out, "-o", tmp_path / "r.html")
    assert code == 0 and "note: 1 records repeat an image" in err, err
    page = (tmp_path / "r.html").read_text()
    assert "<td>images</td><td>5</td>" in page and "<td>skipped</td><td>0</td>" in page


def test_a_results_file_replaced_during_a_run_stops_the_run_in_one_line(tmp_path):
    from avarc.io.results import ResultsWriter
    from tests.test_results import _rec

    out = tmp_path / "r.jsonl"
    writer = ResultsWriter(out)
    writer.write([_rec("a"), _rec("b")])
    edited = tmp_path / "sed-tmp"
    edited.write_bytes(out.read_bytes().splitlines(keepends=True)[0])
    edited.replace(out)                                                      # what `sed -i '2d'` does
    with pytest.raises(AvarcError, match=r"r.jsonl: changed under this run .* 2 records were in it; check the file"):
        writer.write([_rec("c")])
    writer.close()
    writer = ResultsWriter(out)
    with out.open("ab") as f:
        f.write(b"\n")                                                       # another program appends
    with pytest.raises(AvarcError, match="changed under this run"):
        writer.write([_rec("d")])
    writer.close()


def test_resume_refuses_another_ood_score_or_dtype_in_one_line(tmp_path, monkeypatch, capsys):
    test = save_digits(tmp_path / "test", 1300, 1302)
    out = tmp_path / "r.jsonl"
    assert run_cli(monkeypatch, capsys, "classify", test, "-o", out, "--dtype", "fp32", *CPU)[0] == 0
    before = out.read_bytes()
    run = records_of(out)[0]["run"]
    assert (run.dtype, run.compile, run.ood_score) == ("float32", False, "likelihood")
    assert run.weights.startswith("sha256:") and run.vae_weights.startswith("sha256:")
    for args, says in ((("--ood-score", "ratio"), "ood_score 'likelihood' vs 'ratio' now"),
                       (("--dtype", "bf16"), "dtype 'float32' vs 'bfloat16' now")):
        code, _, err = run_cli(monkeypatch, capsys, "classify", test, "-o", out, "--resume", "--dtype", "fp32", *args,
                               *CPU)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1 and out.read_bytes() == before, err
