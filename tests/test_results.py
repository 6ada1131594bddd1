"""avarc.io.records, results and summary: records, the resumable results file and the metrics of the final table."""
from __future__ import annotations

import csv
import json

import pytest

from avarc import AvarcError
from avarc.engine.profile import Profile, Stage
from avarc.engine.stages import Prediction, StageScores
from avarc.io.data import Item
from avarc.io.records import RECORD, image_key, ok_record, parse_record, record_line, run_identity, skipped_record
from avarc.io.results import ResultsWriter, lock_results, open_results
from avarc.io.summary import Metrics, append_csv_summary, stage_survival

NAMES = [f"c{i}" for i in range(6)]
PROFILE = Profile("p", (Stage(3, 1, 3), Stage(5, 1, 2), Stage(5, 2, 1)))
RUN = run_identity("m", PROFILE, 0, range(6))


def prediction(stage_scores: list[dict[int, float]], keeps=(3, 2, 1), exited_after=None) -> Prediction:
    """A Prediction built the way the schedule builds it (see avarc.engine.schedule._prediction)."""
    from avarc.engine.schedule import _prediction

    stages = [StageScores(5, 1, k, list(s), list(s.values())) for s, k in zip(stage_scores, keeps)]
    return _prediction(stages, exited_after, 1.0)


def test_records_hold_ranking_stages_posterior_and_run():
    p = prediction([{0: -9.0, 1: -3.0, 2: -5.0, 3: -4.0, 4: -8.0, 5: -7.0}, {1: -30.0, 3: -20.0, 2: -25.0},
                    {3: -40.0, 1: -41.0}])
    rec = ok_record(Item("d/2/x.png", 2), p, NAMES, RUN, topk=4)
    assert rec["pred"] == 3 and rec["pred_name"] == "c3" and rec["label_rank"] == 3 and rec["status"] == "ok"
    assert [t["class"] for t in rec["topk"]] == [3, 1, 2, 5]        # survivors, stage-2 dropout, best stage-1 dropout
    assert [s["candidates"] for s in rec["stages"]] == [[0, 1, 2, 3, 4, 5], [1, 3, 2], [3, 1]]
    assert [q["class"] for q in rec["posterior"]] == [3, 1] and abs(sum(q["p"] for q in rec["posterior"]) - 1) < 1e-5
    assert stage_survival(rec, 3) == [True, True, False]
    assert parse_record(record_line(rec)) == parse_record(json.dumps(RECORD.dump_python(rec, by_alias=True)))
    skipped = skipped_record(Item("bad.png"), "bad.png: not a readable image (empty file)", NAMES, RUN)
    assert skipped["status"] == "skipped" and skipped["pred"] is None and "empty file" in skipped["error"]


def test_run_fingerprint_changes_with_anything_that_changes_scores():
    base = run_identity("m", PROFILE, 0, range(6))
    assert base == run_identity("m", PROFILE, 0, [5, 4, 3, 2, 1, 0])
    other_sigma = Profile("p", PROFILE.stages, sigma=0.2)
    for other in (run_identity("m2", PROFILE, 0, range(6)), run_identity("m", PROFILE, 1, range(6)),
                  run_identity("m", other_sigma, 0, range(6)), run_identity("m", PROFILE, 0, range(5))):
        assert other.fingerprint != base.fingerprint


def _rec(path: str, run=RUN) -> dict:
    """A classified image's record (a skipped one is not done: ``--resume`` tries it again)."""
    return ok_record(Item(path), prediction([{0: -1.0, 1: -2.0, 2: -3.0}, {0: -5.0, 1: -6.0}, {0: -9.0}]),
                     NAMES, run, 3)


def test_resume_tries_skipped_images_again(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_bytes(b"".join(record_line(skipped_record(Item(p), "x", NAMES, RUN)) for p in ("a", "b"))
                    + record_line(_rec("b")))
    state = open_results(out, True, RUN)
    assert list(state.done) == [str(image_key("b"))] and state.retried == 1


def test_resume_cuts_a_torn_line_and_keeps_every_complete_record(tmp_path):
    out = tmp_path / "r.jsonl"
    assert open_results(out, False, RUN).done == {} and out.read_bytes() == b""
    w = ResultsWriter(out)
    w.write([_rec("a"), _rec("b")])
    w.close()
    with pytest.raises(AvarcError, match="already exists; set resume=True"):
        open_results(out, False, RUN)
    full = out.read_bytes()
    with open(out, "ab") as f:
        f.write(record_line(_rec("c"))[:40])                # kill -9 in the middle of a write
    state = open_results(out, True, RUN)
    assert state.torn and sorted(state.done) == sorted(image_key(p) for p in ("a", "b"))
    assert out.read_bytes() == full
    w = ResultsWriter(out)
    w.write([_rec("c")])
    w.close()
    lines = out.read_text().splitlines()
    assert [json.loads(line)["path"] for line in lines] == ["a", "b", "c"]


def test_resume_matches_images_by_their_resolved_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.jsonl"
    out.write_bytes(record_line(_rec("d/x.png")))
    assert (set(open_results(out, True, RUN).done) == {str(tmp_path / "d" / "x.png")}
            == {image_key(tmp_path / "d/x.png")})


@pytest.mark.parametrize("content, says", [
    ("# My notes\nnot json at all\n", "line 1 is not an avarc result record"),
    ('{"path": "a"}\n', "line 1 is not an avarc result record"),
    ("plain text without a newline", "last line is not an avarc result record"),
])
def test_resume_refuses_a_file_that_is_not_a_results_file_and_leaves_it_untouched(tmp_path, content, says):
    out = tmp_path / "r.jsonl"
    out.write_text(content)
    before = out.read_bytes()
    with pytest.raises(AvarcError, match=says):
        open_results(out, True, RUN)
    assert out.read_bytes() == before


def test_resume_refuses_records_of_another_run_and_names_what_differs(tmp_path):
    out = tmp_path / "r.jsonl"
    other = run_identity("m", PROFILE, 1, range(6))
    out.write_text("".join(record_line(r).decode() for r in (_rec("a"), _rec("b", other))))
    before = out.read_bytes()
    with pytest.raises(AvarcError, match=r"r.jsonl: holds records of another run \(seed 1 vs 0 now\).*another file"):
        open_results(out, True, RUN)
    assert out.read_bytes() == before


def test_a_second_lock_on_one_results_file_is_refused(tmp_path):
    out = tmp_path / "r.jsonl"
    lock = lock_results(out)
    try:
        with pytest.raises(AvarcError, match="another avarc run is writing this file"):
            lock_results(out)
    finally:
        lock.release()
    lock_results(out).release()                                       # free again once released


def test_metrics_top1_top5_stage_recall_and_early_exits():
    m = Metrics(3)
    good = ok_record(Item("a", 3), prediction([{0: -9.0, 1: -3.0, 2: -5.0, 3: -4.0}, {1: -3.0, 3: -2.0, 2: -9.0},
                                                    {3: -1.0, 1: -2.0}]), NAMES, RUN, 5)
    lost_late = ok_record(Item("b", 1), prediction([{0: -9.0, 1: -3.0, 2: -5.0, 3: -4.0},
                                                         {1: -3.0, 3: -2.0, 2: -9.0},
                                                         {3: -1.0, 1: -2.0}]), NAMES, RUN, 5)
    lost_early = ok_record(Item("c", 0), prediction([{0: -9.0, 1: -3.0, 2: -5.0, 3: -4.0},
                                                          {1: -3.0, 3: -2.0, 2: -9.0},
                                                          {3: -1.0, 1: -2.0}]), NAMES, RUN, 5)
    exited = ok_record(Item("d", 1), prediction([{0: -9.0, 1: -3.0, 2: -5.0, 3: -4.0}], exited_after=1),
                       NAMES, RUN, 5)
    for rec in (good, lost_late, lost_early, exited, skipped_record(Item("e", 2), "bad", NAMES, RUN),
                ok_record(Item("f"), prediction([{0: -1.0, 1: -2.0}]), NAMES, RUN, 5)):
        m.add(rec)
    assert (m.images, m.skipped, m.labelled, m.early_exits) == (6, 1, 4, 1)
    assert m.top1 == 2 / 4 and m.top5 == 4 / 4                        # c: rank 4; b: rank 2
    assert m.recall == [3 / 4, 3 / 4, 2 / 4]                           # c pruned at stage 1; b at stage 3


def test_csv_summary_rows_accumulate_under_one_header(tmp_path):
    f = tmp_path / "s.csv"
    append_csv_summary(f, {"model": "a", "top1": 0.5})
    append_csv_summary(f, {"model": "b", "top1": 0.75})
    rows = list(csv.DictReader(f.open()))
    assert rows == [{"model": "a", "top1": "0.5"}, {"model": "b", "top1": "0.75"}]
    before = f.read_bytes()
    with pytest.raises(AvarcError, match="s.csv: its header lacks recall_stage1; left it untouched; choose another"):
        append_csv_summary(f, {"model": "c", "top1": 0.5, "recall_stage1": 1.0})
    left = [p.name for p in tmp_path.iterdir()]
    assert f.read_bytes() == before and left == ["s.csv"]    # no temporary and no lock file left
