"""The GPU plan, proven where a CPU can: a stage of the schedule reads nothing back from the device (survivors are
chosen there, by the same ranking rule as the host's), and the one read per stage comes between stages."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from avarc import Classifier
from avarc.engine.counters import HostReads
from avarc.engine.graphs import ForwardGraphs, bucket
from avarc.engine.profile import Profile, Stage
from avarc.engine.schedule import run_stages, sample_tokens
from avarc.engine.scoring import Scorer
from avarc.engine.stages import StageScores, choose_survivors
from avarc.errors import AvarcError
from avarc.io.data import collect
from avarc.io.distributed import IMAGES_PER_STEP, MAX_IMAGES_PER_STEP, images_per_step
from avarc.io.preprocess import pixels_to_tensor
from tests.conftest import run_cli, save_digits

EXAMPLES = Path(__file__).parent.parent / "examples" / "digits"
# Three stages on the digits' four scales: prune on two scales, rescore on four, smooth the last two survivors;
# the first stage lets clear images exit.
PROFILE = Profile("plan", (Stage(2, 1, 5, exit_margin=4.0), Stage(4, 1, 2), Stage(4, 3, 1)), sigma=0.3)


@pytest.fixture(scope="module")
def digits():
    clf = Classifier.from_pretrained("digits", device="cpu")
    paths = sorted(EXAMPLES.glob("*/*.png"))[::3]
    x = torch.stack([clf.preprocess(p) for p in paths])
    return clf.model, sample_tokens(clf.model, clf.model.encode(x), 3, PROFILE.sigma, 0)


def _counted(model, tokens, dtype=torch.float32):
    """A run counted after a warm-up one (each engine copy checks its attention constants once, a read)."""
    with model.computing_in(dtype):
        run_stages(model, tokens, range(10), PROFILE, Scorer(model))
        engines = {model.engine_var(torch.float32), model.engine_var()}
        with HostReads(model.vae, *engines) as reads:
            preds = run_stages(model, tokens, range(10), PROFILE, Scorer(model))
    return preds, reads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_stage_reads_nothing_back_from_the_device(digits, dtype):
    """Every read of what the engine computed goes through host_read: one per stage run (fp32), plus the precision
    guard's reads of its fp32 re-scores between stages (bf16); none inside a stage. The predictions are the plain
    path's, which reads every score as it comes."""
    model, tokens = digits
    preds, reads = _counted(model, tokens, dtype)
    assert not reads.inside, reads.inside
    stages_run = max(len(p.stages) for p in preds)
    assert stages_run == 3 and any(p.exited_after == 1 for p in preds)      # the exit path ran too
    if dtype == torch.float32:
        assert reads.between == stages_run
    else:
        assert reads.between >= stages_run
    with model.computing_in(dtype):
        plain = run_stages(model, tokens, range(10), PROFILE, Scorer(model, reuse=False))
    assert [p.pred for p in preds] == [p.pred for p in plain]
    assert [p.exited_after for p in preds] == [p.exited_after for p in plain]
    for a, b in zip(preds, plain):
        assert [st.candidates for st in a.stages] == [st.candidates for st in b.stages]


def test_the_counter_sees_a_read_inside_a_stage(digits):
    """The same count catches a read that is not between stages: a scoring step that brings its log-probs back."""
    model, tokens = digits
    with HostReads(model.vae, model.engine_var()) as reads:
        model.pair_logp(tokens[:2, 0], torch.tensor([1, 2]), 3)
    assert reads.inside == {"cpu": 1} and reads.between == 0


def test_survivors_on_the_device_follow_the_host_ranking_rule():
    """choose_survivors equals StageScores.decisions row by row, ties (by class index) and exits included."""
    g = torch.Generator().manual_seed(0)
    A, K = 64, 12
    cands_AK = torch.stack([torch.randperm(40, generator=g)[:K] for _ in range(A)])
    scores_AK = torch.randint(-6, 0, (A, K), generator=g).float() / 4 - 100        # many exact ties
    for keep, margin in [(1, None), (5, 0.5), (K, 0.25), (3, 0.0)]:
        survivors_AK, exits_A = choose_survivors(cands_AK, scores_AK, keep, margin)
        for a in range(A):
            st = StageScores(2, 1, keep, cands_AK[a].tolist(), scores_AK[a].tolist())
            _, want, exits = st.decisions(margin)
            assert survivors_AK[a].tolist() == want and bool(exits_A[a]) == exits


def test_encoding_a_step_ahead_changes_no_record(tmp_path):
    """The batch loop starts each step's encode before the step in front of it is scored (on a GPU on a side
    stream; here at once): its records equal classifying each step's readable images on their own, an unreadable
    file in the middle included."""
    clf = Classifier.from_pretrained("digits", device="cpu")
    root = save_digits(tmp_path / "d", 1438, 1448)
    (root / "3" / "broken.png").write_bytes(b"not a png")
    found = collect([str(root)], clf.space, "auto", None, None, None)
    records = [r for batch in clf.classify_items(found.items, found.candidates, per_step=3) for r in batch]
    assert [r["status"] for r in records].count("skipped") == 1 and len(records) == 11
    want = []
    for k in range(0, len(found.items), 3):
        pixels = [clf.load(it) for it in found.items[k:k + 3]]
        good = [pixels_to_tensor(px) for px in pixels if not isinstance(px, str)]
        want += [p.to_dict() for p in clf.predict(torch.stack(good), found.candidates)] if good else []
    got = [r for r in records if r["status"] != "skipped"]
    assert [r["pred"] for r in got] == [p["pred"] for p in want]
    assert [r["topk"] for r in got] == [p["top"] for p in want]


def test_a_gpu_step_takes_as_many_images_as_its_first_forward_fits():
    """Left to the budget, a CPU step is 32 images; a GPU's fills its first-stage forward, within 32…256."""
    assert images_per_step(None, 1000) == IMAGES_PER_STEP == 32
    assert images_per_step(None, 100, pairs_per_forward=9000) == 90
    assert images_per_step(None, 1000, pairs_per_forward=9000) == 32
    assert images_per_step(None, 10, pairs_per_forward=10**6) == MAX_IMAGES_PER_STEP == 256
    assert images_per_step(2000, 1000, pairs_per_forward=10**6) == 2        # --batch-size decides when given


def test_bucketed_forwards_score_as_plain_ones(digits):
    """The CUDA-graph path without capture (what a CPU can run): chunks of 5 rows run in 8-row buckets with static
    buffers, keys/values kept for the next stage copied out of them; predictions, survivors and scores equal the
    plain forwards'."""
    model, tokens = digits
    plain = run_stages(model, tokens, range(10), PROFILE, Scorer(model, chunk=5))
    model.graphs = ForwardGraphs(capture=False)
    try:
        bucketed = run_stages(model, tokens, range(10), PROFILE, Scorer(model, chunk=5))
        built = model.graphs.built
    finally:
        model.graphs = None
    assert built >= 2 and bucket(5) == 8 and bucket(1) == 1 and bucket(64) == 64
    assert [p.pred for p in bucketed] == [p.pred for p in plain]
    for a, b in zip(bucketed, plain):
        assert [st.candidates for st in a.stages] == [st.candidates for st in b.stages]
        for sa, sb in zip(a.stages, b.stages):
            assert max(abs(x - y) for x, y in zip(sa.scores, sb.scores)) < 1e-4


def test_cuda_graphs_off_cuda_is_refused_in_one_line(monkeypatch, capsys):
    """Asked for on a CPU, CUDA graphs are refused (they could only be ignored, and a user who asked believes the run
    is on a GPU): one line naming the option, exit 2; the library raises the same error."""
    code, out, err = run_cli(monkeypatch, capsys, "classify", str(EXAMPLES / "3"), "--cuda-graphs", "--device", "cpu")
    assert code == 2 and err.strip().count("\n") == 0 and "--cuda-graphs" in err and "CUDA device" in err
    with pytest.raises(AvarcError, match="CUDA graphs need a CUDA device") as e:
        Classifier.from_pretrained("digits", device="cpu", cuda_graphs=True)
    assert e.value.option == "cuda_graphs"


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="a GPU's confirmation (scripts/device_check runs it)")


@CUDA
def test_on_cuda_stages_wait_only_in_host_read_and_graphs_change_nothing(digits):
    """On a GPU, under torch's sync debug mode "error" (host_read lets its own read through): a warmed-up schedule
    never waits for the device inside a stage; its predictions equal the CPU's, and equal again with CUDA graphs
    captured."""
    cpu_model, tokens = digits
    want = [p.pred for p in run_stages(cpu_model, tokens, range(10), PROFILE, Scorer(cpu_model))]
    model = Classifier.from_pretrained("digits", device="cuda", dtype="fp32").model
    run_stages(model, tokens, range(10), PROFILE, Scorer(model))                            # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [p.pred for p in run_stages(model, tokens, range(10), PROFILE, Scorer(model))]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    model.graphs = ForwardGraphs()
    graphed = [p.pred for p in run_stages(model, tokens, range(10), PROFILE, Scorer(model))]
    assert got == want and graphed == want and model.graphs.built >= 2


@CUDA
def test_on_cuda_encoding_on_a_side_stream_changes_no_record(tmp_path):
    """The encode of the next step on a side stream gives the records of encoding each step by itself."""
    clf = Classifier.from_pretrained("digits", device="cuda", dtype="fp32")
    found = collect([str(save_digits(tmp_path / "d", 1438, 1458))], clf.space, "auto", None, None, None)
    records = [r for batch in clf.classify_items(found.items, found.candidates, per_step=4) for r in batch]
    want = [p.to_dict()["top"] for k in range(0, 20, 4) for p in clf.predict(
        torch.stack([pixels_to_tensor(clf.load(it)) for it in found.items[k:k + 4]]), found.candidates)]
    assert [r["topk"] for r in records] == want
