"""Result records (one JSON line per image), the results file with ``--resume``, and the run's metrics.

Every record carries a ``run`` key (model, profile, seed and a fingerprint of everything that changes scores) and
``file``, the image's resolved absolute path, which is the key resuming matches on. Resuming never removes a record:
a file of another run, or not a results file, is refused untouched. A kill -9 can leave a torn last line; resuming
cuts it off, so no record is duplicated and none that was complete is lost. One run at a time holds the file's lock.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from filelock import FileLock, Timeout

from .data import Item
from .distributed import Dist
from ..errors import FIX, AvarcError
from .files import absolute, atomic_write
from ..engine.model import Model
from ..engine.profile import Profile
from ..engine.stages import Prediction, rank


def model_identity(model: Model, arg: str) -> str:
    """A registry name as given, else the VAR file's name and size (stable when files move between machines)."""
    name = model.meta.get("name")
    if name:
        return str(name)
    if model.var_file is not None and model.var_file.is_file():
        return f"{model.var_file.name}:{model.var_file.stat().st_size}"
    return str(arg)


def run_info(model_id: str, profile: Profile, seed: int, candidates: Sequence[int], extra: dict | None = None) -> dict:
    """The ``run`` key of every record; ``fingerprint`` covers the model, the resolved schedule, σ, the seed and the
    candidate classes, which together decide every score, and the abstention rule, which decides every status."""
    schedule = [[s.scales, s.samples, s.keep, s.exit_margin] for s in profile.stages]
    abstain = [[profile.ood.score, sorted(profile.ood.thresholds)]] if profile.ood is not None else []
    blob = json.dumps([model_id, schedule, profile.sigma, seed, sorted(candidates), extra or {}, *abstain],
                      sort_keys=True)
    return {"model": model_id, "profile": profile.name, "seed": seed,
            "fingerprint": hashlib.sha256(blob.encode()).hexdigest()[:16]}


def image_key(path: str | os.PathLike) -> str:
    """The key ``--resume`` matches images by: the absolute path with symlinks resolved, so ``d/x.png`` and
    ``/abs/d/x.png`` are one image."""
    return str(absolute(path))


def record_key(record: dict) -> str:
    """A record's image key (records written before the ``file`` field resolve their ``path`` from here)."""
    return record.get("file") or image_key(record["path"])


def ok_record(item: Item, p: Prediction, names: Sequence[str], run: dict, topk: int) -> dict:
    """An abstained image keeps its ranking, posterior and ``ood`` scores; only ``pred`` and ``pred_name`` are null."""
    return {
        "path": item.path,
        "file": image_key(item.path),
        "label": item.label,
        "label_name": names[item.label] if item.label is not None else None,
        "pred": None if p.abstained else p.pred,
        "pred_name": None if p.abstained else names[p.pred],
        "label_rank": p.label_rank(item.label) if item.label is not None else None,
        "topk": [{"class": c, "name": names[c], "score": round(s, 4)} for c, s in p.ranking[:topk]],
        "stages": [{"scales": st.scales, "samples": st.samples, "keep": st.keep, "candidates": st.candidates,
                    "scores": [round(s, 4) for s in st.scores]} for st in p.stages],
        "exited_after": p.exited_after,
        "posterior": [{"class": c, "name": names[c], "p": round(q, 6)} for c, q in p.posterior[:topk]],
        "ood": p.ood,
        "status": "abstained" if p.abstained else "ok",
        "error": None,
        "run": run,
    }


def skipped_record(item: Item, reason: str, names: Sequence[str], run: dict) -> dict:
    return {"path": item.path, "file": image_key(item.path), "label": item.label,
            "label_name": names[item.label] if item.label is not None else None,
            "pred": None, "pred_name": None, "label_rank": None, "topk": [], "stages": [], "exited_after": None,
            "posterior": [], "ood": None, "status": "skipped", "error": reason, "run": run}


@dataclass
class Resumed:
    """What ``--resume`` found: the records already done by this run (by image key), and whether a torn last line
    (a kill -9 mid-write) was cut off."""

    done: dict[str, dict] = field(default_factory=dict)
    torn: bool = False


def lock_results(path: str | os.PathLike) -> FileLock:
    """Hold an exclusive lock on the results file for the whole run (a hidden ``.NAME.lock`` beside it), so two
    processes can never append to one file; a second one is refused at once."""
    path = Path(path)
    lock = FileLock(path.with_name(f".{path.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise AvarcError(f"{path}: another avarc run is writing this file; wait for it to finish, "
                         "or choose another file", option="out") from None
    return lock


def _differs(theirs: dict, ours: dict) -> str:
    diff = [f"{k} {theirs.get(k)!r} vs {ours[k]!r} now" for k in ("model", "profile", "seed") if theirs.get(k) != ours[k]]
    return ", ".join(diff) or "other candidate classes, schedule or extensions"


def open_results(path: str | os.PathLike, resume: bool, run: dict) -> Resumed:
    """Prepare the results file: new (an existing file needs ``resume``), or resumed. Resuming never removes a
    record: a file that is not a results file, or holds records of another run, is refused unchanged; only a torn
    last line is cut off."""
    path = Path(path)
    if not path.exists():
        path.write_bytes(b"")
        return Resumed()
    if not resume:
        raise AvarcError(f"{path}: already exists; {FIX} to continue it, or choose another file", option="out", fix="resume")
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    state = Resumed(torn=end < len(data))
    for number, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not (isinstance(rec, dict) and isinstance(rec.get("run"), dict) and isinstance(rec.get("path"), str)):
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


class ResultsWriter:
    """Appends records as they arrive, one ``write`` per batch of whole lines, with Ctrl-C and SIGTERM held back
    until the batch is on disk (so an interrupt never tears a line)."""

    def __init__(self, path: str | os.PathLike):
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, records: Iterable[dict]) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        held = _hold_signals()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        finally:
            _release_signals(held)

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
        f = ResultsFile(set(dist.from_main(prepare)), held.get("state"), ResultsWriter(path) if dist.is_main else None)
        try:
            yield f
        finally:
            if f.writer is not None:
                f.writer.close()
    finally:
        if "lock" in held:
            held["lock"].release()


def stage_survival(record: dict, num_stages: int) -> list[bool]:
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

    def add(self, record: dict) -> None:
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
    """The header row of an existing, non-empty CSV file (None when there is none yet)."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), [])
    except (UnicodeDecodeError, csv.Error):
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
    check_csv(path, list(row))
    old = path.read_bytes() if path.exists() else b""
    with atomic_write(path, "w") as f:
        f.write(old.decode("utf-8"))
        if old and not old.endswith(b"\n"):
            f.write("\r\n")
        w = csv.DictWriter(f, fieldnames=list(row))
        if not old.strip():
            w.writeheader()
        w.writerow(row)


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
