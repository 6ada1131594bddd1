"""Result records (one JSON line per image), the results file with ``--resume``, and the run's metrics.

Every record (a :class:`Record`) carries a ``run`` key, the run's identity (model, weights' SHA-256, profile, seed,
dtype, temperature, top-k, labels mode and a fingerprint of everything that changes a record), and ``file``, the
image's resolved absolute path, which is the key resuming matches on. Resuming never removes a record: a file of
another run, or not a results file, is refused untouched. A kill -9 can leave a torn last line; resuming cuts it
off, so no record is duplicated and none that was complete is lost. One run at a time holds the file's lock. Records
are written by :func:`record_line` (strict JSON, bytes-safe paths) and read back only through :func:`parse_line`,
which checks every field a reader uses, so a damaged line is one error naming it.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TypedDict

from filelock import FileLock, Timeout

from .data import Item
from .distributed import Dist
from ..errors import FIX, AvarcError
from .files import absolute, atomic_write, disk_error
from .registry import is_registry_name
from ..models.checkpoints import file_sha256
from ..engine.model import Model
from ..engine.profile import Profile
from ..engine.stages import Prediction, rank


class StageRecord(TypedDict):
    """One profile stage of a record: the candidates it scored and their scores (4 decimals)."""

    scales: int
    samples: int
    keep: int
    candidates: list[int]
    scores: list[float]


class Record(TypedDict):
    """One image's result: the one JSON line per image that classify writes and resume, report and the metrics read
    (through :func:`record_line`, :func:`parse_line` and :func:`read_records`, the only writer and readers)."""

    path: str
    file: str
    label: int | None
    label_name: str | None
    pred: int | None
    pred_name: str | None
    label_rank: int | None
    topk: list[dict]
    stages: list[StageRecord]
    exited_after: int | None
    posterior: list[dict]
    status: str             # "ok" or "skipped"
    error: str | None
    run: dict               # the run's identity: see run_info


def model_identity(model: Model, arg: str) -> str:
    """The model's name a person knows it by: a registry name as given, else the VAR file's resolved path (what
    ``avarc report`` loads the architecture from)."""
    if is_registry_name(str(arg)):
        return str(arg)
    name = model.meta.get("name")
    if name:
        return str(name)
    return text(absolute(model.var_file)) if model.var_file is not None else text(arg)


def weights_identity(model: Model) -> str | None:
    """The VAR weights by content (``sha256:`` and 16 hex digits): another file of the same size is another run."""
    if model.var_file is None or not Path(model.var_file).is_file():
        return None
    return "sha256:" + file_sha256(model.var_file)[:16]


IDENTITY = ("model", "weights", "profile", "seed", "dtype", "temperature", "topk", "labels")


def run_info(model_id: str, profile: Profile, seed: int, candidates: Sequence[int], extra: dict | None = None,
             **settings) -> dict:
    """The ``run`` key of every record: the run's identity. ``fingerprint`` covers the model, its weights, the resolved
    schedule, σ, the seed, the candidate classes and every setting that changes a record (``settings``: weights,
    dtype, temperature, top-k, labels mode) and the abstention rule; each setting is also a field, so a mismatch can
    be named."""
    schedule = [[s.scales, s.samples, s.keep, s.exit_margin] for s in profile.stages]
    abstain = [[profile.ood.score, sorted(profile.ood.thresholds)]] if profile.ood is not None else []
    blob = json.dumps([model_id, schedule, profile.sigma, seed, sorted(candidates), extra or {}, settings, *abstain],
                      sort_keys=True)
    return {"model": model_id, "profile": profile.name, "seed": seed, **settings,
            "fingerprint": hashlib.sha256(blob.encode("utf-8", "surrogateescape")).hexdigest()[:16]}


def text(path: str | os.PathLike) -> str:
    """A path as record text, losslessly: a file name that is not UTF-8 keeps its bytes surrogate-escaped
    (``os.fsencode`` gives them back; JSON holds them as ``\\udcXX`` escapes)."""
    return os.fsdecode(os.fsencode(path))


def image_key(path: str | os.PathLike) -> str:
    """The key ``--resume`` matches images by: the absolute path with symlinks resolved, so ``d/x.png`` and
    ``/abs/d/x.png`` are one image."""
    return text(absolute(path))


def record_key(record: Record) -> str:
    """A record's image key (records written before the ``file`` field resolve their ``path`` from here)."""
    return record.get("file") or image_key(record["path"])


def ok_record(item: Item, p: Prediction, names: Sequence[str], run: dict, topk: int) -> Record:
    label = item.record_label(p.label_rank)
    """An abstained image keeps its ranking, posterior and ``ood`` scores; only ``pred`` and ``pred_name`` are null."""
    return {
        "path": item.path,
        "file": item.file,
        "label": label,
        "label_name": item.label_name or (names[label] if label is not None else None),
        **({"accepted": list(item.accepted)} if item.accepted else {}),
        "pred": None if p.abstained else p.pred,
        "pred_name": None if p.abstained else names[p.pred],
        "label_rank": p.label_rank(label) if label is not None else None,
        "topk": [{"class": c, "name": names[c], "score": round(s, 4)} for c, s in p.ranking[:topk]],
        "stages": [{"scales": st.scales, "samples": st.samples, "keep": st.keep, "candidates": st.candidates,
                    "scores": [round(s, 4) for s in st.scores]} for st in p.stages],
        "exited_after": p.exited_after,
        "gflops": p.gflops,
        "posterior": [{"class": c, "name": names[c], "p": round(q, 6)} for c, q in p.posterior[:topk]],
        "ood": p.ood,
        "status": "abstained" if p.abstained else "ok",
        "error": None,
        "run": run,
    }


def skipped_record(item: Item, reason: str, names: Sequence[str], run: dict) -> Record:
    return {"path": item.path, "file": item.file, "label": item.label,
            "label_name": item.label_name or (names[item.label] if item.label is not None else None),
            "pred": None, "pred_name": None, "label_rank": None, "topk": [], "stages": [], "exited_after": None,
            "posterior": [], "ood": None, "status": "skipped", "error": reason, "run": run}


@dataclass
class Resumed:
    """What ``--resume`` found: the records already done by this run (by image key), and whether a torn last line
    (a kill -9 mid-write) was cut off."""

    done: dict[str, Record] = field(default_factory=dict)
    torn: bool = False


def file_lock(path: str | os.PathLike) -> FileLock:
    """The one lock of a file, keyed by its resolved path (a symlink or another spelling of it takes the same lock);
    a hidden ``.avarc-HASH.lock`` beside the real file, short whatever the file's name."""
    real = absolute(path)
    return FileLock(real.with_name(f".avarc-{hashlib.sha256(os.fsencode(real)).hexdigest()[:16]}.lock"))


def lock_results(path: str | os.PathLike) -> FileLock:
    """Hold an exclusive lock on the results file for the whole run, so two processes can never append to one file; a
    second one is refused at once. The lock (a hidden file beside the real file) is keyed by the resolved path, so a
    symlink or another spelling of the same file takes the same lock, and its name is short (a 250-byte name works)."""
    path = Path(path)
    lock = file_lock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise AvarcError(f"{path}: another avarc run is writing this file; wait for it to finish, "
                         "or choose another file", option="out") from None
    return lock


def _differs(theirs: dict, ours: dict) -> str:
    diff = [f"{k} {theirs.get(k)!r} vs {ours.get(k)!r} now" for k in IDENTITY if theirs.get(k) != ours.get(k)]
    return ", ".join(diff) or "other candidate classes, schedule or extensions"


def parse_line(line: bytes) -> Record | None:
    """One results line as a record, or None when it is not one (not JSON, too deeply nested, or not an object with
    the fields every record has, of the right types)."""
    try:
        rec = json.loads(line.decode("utf-8", "surrogateescape"), parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None
    return rec if valid_record(rec) else None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def valid_record(rec: object) -> bool:
    """Whether ``rec`` has every field a reader uses, with its type (a hand-edited record that lacks one is not a
    record: readers name its line instead of failing on it)."""
    if not (isinstance(rec, dict) and isinstance(rec.get("run"), dict) and isinstance(rec.get("path"), str)
            and rec.get("status") in ("ok", "skipped") and isinstance(rec.get("stages"), list)
            and isinstance(rec.get("file", ""), str)):
        return False
    if rec["status"] == "skipped":
        return True
    ints = all(isinstance(rec.get(k), int) or (k != "pred" and rec.get(k) is None)
               for k in ("pred", "label", "label_rank"))
    named = isinstance(rec.get("posterior"), list) and all(
        isinstance(p, dict) and isinstance(p.get("p"), (int, float)) for p in rec["posterior"])
    stages = all(isinstance(st, dict) and isinstance(st.get("candidates"), list) and isinstance(st.get("scores"), list)
                 and all(isinstance(k, int) for k in (st.get("scales"), st.get("samples"), st.get("keep")))
                 and len(st["candidates"]) == len(st["scores"]) > 0
                 and all(isinstance(c, int) for c in st["candidates"])
                 and all(isinstance(x, (int, float)) for x in st["scores"]) for st in rec["stages"])
    return ints and named and stages and bool(rec["stages"]) and (rec.get("exited_after") is None
                                                                    or isinstance(rec["exited_after"], int))


def read_records(path: str | os.PathLike, option: str | None = None) -> list[Record]:
    """Every record of a results file, for a reader (report, metrics): a torn last line (an interrupted run) is left
    out; any other line that is not a record, or a file that cannot be read, is one error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise AvarcError(f"{path}: no such results file; pass the --out file of `avarc classify`", option=option)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AvarcError(f"{path}: cannot read it ({e.strerror}); pass a readable results file",
                         option=option) from None
    lines = data.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rec = parse_line(line)
        if rec is None:
            if number == len(lines) and not data.endswith(b"\n"):
                break
            raise AvarcError(f"{path}: line {number} is not an avarc result record (damaged or hand-edited); fix or "
                             "remove that line, or pass a file written by `avarc classify --out`", option=option)
        records.append(rec)
    if not records:
        raise AvarcError(f"{path}: holds no records; pass a file written by `avarc classify --out`", option=option)
    return records


def open_results(path: str | os.PathLike, resume: bool, run: dict) -> Resumed:
    """Prepare the results file: new (an existing file needs ``resume``), or resumed. Resuming never removes a
    record: a file that is not a results file, or holds records of another run, is refused unchanged; only a torn
    last line (one that does not parse) is cut off, and a whole last record without its newline gets one."""
    path = Path(path)
    if not path.exists():
        path.write_bytes(b"")
        return Resumed()
    if not resume:
        raise AvarcError(f"{path}: already exists; {FIX} to continue it, or choose another file", option="out", fix="resume")
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and parse_line(data[end:]) is not None:     # a whole last record, only its newline missing
        with open(path, "ab") as f:
            f.write(b"\n")
        data, end = data + b"\n", len(data) + 1
    state = Resumed(torn=end < len(data))
    for number, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        rec = parse_line(line)
        if rec is None:
            raise AvarcError(f"{path}: line {number} is not an avarc result record, so this is not a results file; "
                             "left it untouched; choose another file", option="out")
        if rec["run"].get("fingerprint") != run["fingerprint"]:
            raise AvarcError(f"{path}: holds records of another run ({_differs(rec['run'], run)}); left it "
                             "untouched; resume with the same settings, or choose another file for this run", option="out")
        state.done.setdefault(record_key(rec), rec)
    if state.torn:
        if not data[end:].startswith(b'{"'):
            raise AvarcError(f"{path}: its last line is not an avarc result record, so this is not a results file; "
                             "left it untouched; choose another file", option="out")
        os.truncate(path, end)
    return state


def record_line(record: Record) -> bytes:
    """A record as one line of strict JSON (no NaN or Infinity: a non-finite number is refused) in UTF-8; a path
    holding a surrogate-escaped byte is written with ``\\u`` escapes, so the line stays valid UTF-8."""
    try:
        return (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(record, allow_nan=False) + "\n").encode("ascii")
    except ValueError:
        if record.get("status") != "ok":
            raise
        return record_line({**record, "pred": None, "pred_name": None, "label_rank": None, "topk": [], "stages": [],
                            "exited_after": None, "posterior": [], "status": "skipped",
                            "error": "the model gave non-finite scores (damaged weights or extension?)"})


class ResultsWriter:
    """Appends records as they arrive, one ``write`` per batch of whole lines, with Ctrl-C and SIGTERM held back
    until the batch is on disk (so an interrupt never tears a line). A full disk (or any write error) cuts the
    partial batch back off and is one error saying how many records are safe."""

    def __init__(self, path: str | os.PathLike, safe: int = 0):
        self.path, self.safe = Path(path), safe
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, records: Iterable[Record]) -> None:
        records = list(records)
        data = b"".join(map(record_line, records))
        held = _hold_signals()
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as e:
            os.ftruncate(self._fd, start)
            raise disk_error(e, f"{self.safe} records safe in {self.path}", "--resume") from None
        finally:
            _release_signals(held)
        self.safe += len(records)

    def close(self) -> None:
        os.close(self._fd)


_HELD = {signal.SIGINT, signal.SIGTERM}


def _hold_signals() -> bool:
    if hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
        return True
    return False


def _release_signals(held: bool) -> None:
    if held:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)


@dataclass
class ResultsFile:
    """An open results file: the image keys already done (on every rank), what resuming found and the writer
    (rank 0 only)."""

    done: set[str]
    resumed: Resumed | None = None
    writer: ResultsWriter | None = None

    def write(self, records: list[dict]) -> None:
        if self.writer is not None:
            self.writer.write(records)


@contextmanager
def results_file(path: str | os.PathLike | None, resume: bool, run: dict, dist: Dist = Dist()) -> Iterator[ResultsFile]:
    """The results file of one run, locked by rank 0 for the whole block and opened new or resumed there (its errors
    reach every rank); without a path, nothing is written."""
    if path is None:
        yield ResultsFile(set())
        return
    held: dict = {}

    def prepare() -> list[str]:
        held["lock"] = lock_results(path)
        held["state"] = open_results(path, resume, run)
        return sorted(held["state"].done)

    try:
        done = set(dist.from_main(prepare))
        f = ResultsFile(done, held.get("state"), ResultsWriter(path, len(done)) if dist.is_main else None)
        try:
            yield f
        finally:
            if f.writer is not None:
                f.writer.close()
    finally:
        if "lock" in held:
            held["lock"].release()


def stage_survival(record: Record, num_stages: int) -> list[bool]:
    """Whether the true class was still in the running after each profile stage (after an early exit, only the
    prediction is)."""
    label, stages = record["label"], record["stages"]
    out = []
    for s in range(num_stages):
        if s < len(stages) - 1:
            st = stages[s]
            out.append(label in [c for c, _ in rank(st["candidates"], st["scores"])[:st["keep"]]])
        else:
            out.append(record["pred"] == label)
    return out


@dataclass
class Metrics:
    """Running totals over records; ``top1``/``top5``/``recall`` are over labelled records that were classified."""

    num_stages: int
    images: int = 0
    skipped: int = 0
    labelled: int = 0
    correct1: int = 0
    correct5: int = 0
    early_exits: int = 0
    abstained: int = 0             # answered "none of these" (not counted in top1/top5/recall)
    survived: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.survived = self.survived or [0] * self.num_stages

    def add(self, record: Record) -> None:
        self.images += 1
        if record["status"] == "skipped":
            self.skipped += 1
            return
        if record["status"] == "abstained":
            self.abstained += 1
            return
        self.early_exits += record["exited_after"] is not None
        if record["label"] is None:
            return
        self.labelled += 1
        rank = record["label_rank"]
        self.correct1 += rank == 1
        self.correct5 += rank is not None and rank <= 5
        for s, ok in enumerate(stage_survival(record, self.num_stages)):
            self.survived[s] += ok

    @property
    def top1(self) -> float | None:
        return self.correct1 / self.labelled if self.labelled else None

    @property
    def top5(self) -> float | None:
        return self.correct5 / self.labelled if self.labelled else None

    @property
    def recall(self) -> list[float | None]:
        return [n / self.labelled if self.labelled else None for n in self.survived]


def _csv_header(path: Path) -> list[str] | None:
    """The header row of an existing, non-empty CSV file (None when there is none yet; [] when the file is not a
    UTF-8 CSV anywhere in it, since the summary row is appended to the whole file)."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        return next(csv.reader(path.read_bytes().decode("utf-8").splitlines()), [])
    except (UnicodeDecodeError, csv.Error, OSError):
        return []


def check_csv(path: str | os.PathLike, columns: Sequence[str]) -> None:
    """A summary row with ``columns`` can be appended under the file's header; checked before a run starts so a
    long run never ends on a CSV it cannot add to."""
    path = Path(path)
    header = _csv_header(path)
    if header is not None and header != list(columns):
        stages = sum(c.startswith("recall_stage") for c in columns)
        raise AvarcError(f"{path}: its columns differ from this run's ({len(header)} vs {len(columns)}: a profile "
                         f"with {stages} stages, or not a summary CSV); left it untouched; choose another file", option="csv")


def append_csv_summary(path: str | os.PathLike, row: dict) -> None:
    """Add one run's summary row to a CSV (header written when the file is new), so runs accumulate into a table.
    Every row parses under the one header (a row with other columns is refused); the file is replaced atomically."""
    path = Path(path)
    with file_lock(path):                # two runs ending together each add their row (read, add, replace)
        _append_csv(path, row)


def _append_csv(path: Path, row: dict) -> None:
    check_csv(path, list(row))
    old = path.read_bytes() if path.exists() else b""
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(row))
    if not old.strip():
        w.writeheader()
    w.writerow(row)
    with atomic_write(path) as f:
        f.write(old + (b"\r\n" if old and not old.endswith(b"\n") else b"")
                + text.getvalue().encode("utf-8", "surrogateescape"))


def summary_row(m: Metrics, profile: Profile, run: dict, dataset: str | None, subset: str | None, new: int,
                seconds: float) -> dict:
    """One run's row for :func:`append_csv_summary`; ``new`` images were classified in ``seconds`` by this run."""
    row = {"model": run["model"], "profile": profile.name, "seed": run["seed"], "dataset": dataset or "",
           "subset": subset or "", "images": m.images, "skipped": m.skipped,
           "top1": m.top1 if m.top1 is not None else "", "top5": m.top5 if m.top5 is not None else ""}
    row.update({f"recall_stage{i}": r if r is not None else "" for i, r in enumerate(m.recall, 1)})
    row.update({"abstained": m.abstained} if profile.ood is not None else {})
    row.update({"early_exits": m.early_exits, "images_per_s": round(new / seconds, 3) if new and seconds > 0 else ""})
    return row
