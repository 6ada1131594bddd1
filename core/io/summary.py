"""What a run adds up to: accuracy, top-5, per-stage recall and early exits over its records, and the summary row
``--csv`` appends (refused up front when the file's columns differ, appended under the file's lock)."""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..engine.profile import Profile
from ..engine.stages import rank
from ..errors import AvarcError
from .files import atomic_write, file_lock
from .records import Record


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
                         f"with {stages} stages, or not a summary CSV); left it untouched; choose another file",
                         option="csv")


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
