"""What a run adds up to: top-k accuracy (k of :data:`TOPK`), per-stage recall and early exits over its records,
and the summary row ``--csv`` appends (refused up front when the file's columns differ, appended under its lock)."""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

from .. import __version__
from ..engine.profile import Profile
from ..engine.stages import rank
from ..errors import AvarcError
from .files import atomic_write, file_lock
from .records import Record, RunIdentity

TOPK = (1, 3, 5, 10, 20, 25, 50, 100)      # the top-k accuracies A-VARC's eval.py reports


def shown_ks(candidates: int | None) -> list[int]:
    """The k of :data:`TOPK` that say something with this many candidates (k ≥ candidates is always 100%)."""
    return [k for k in TOPK if k == 1 or candidates is None or k < candidates]

SUMMARY_SCHEMA = 2


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
    """Running totals over records; ``topk``/``recall`` are over labelled records that were classified (a record's
    ``label_rank`` is its true class's rank in the whole ranking, so every k is counted from it)."""

    num_stages: int
    candidates: int | None = None  # how many classes competed (which top-k are worth showing)
    images: int = 0
    skipped: int = 0
    labelled: int = 0
    hits: dict[int, int] = field(default_factory=lambda: dict.fromkeys(TOPK, 0))    # k → labels ranked ≤ k
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
        for k in TOPK:
            self.hits[k] += rank is not None and rank <= k
        for s, ok in enumerate(stage_survival(record, self.num_stages)):
            self.survived[s] += ok

    @property
    def correct1(self) -> int:
        return self.hits[1]

    @property
    def correct5(self) -> int:
        return self.hits[5]

    def topk(self, k: int) -> float | None:
        return self.hits[k] / self.labelled if self.labelled else None

    @property
    def top1(self) -> float | None:
        return self.topk(1)

    @property
    def top5(self) -> float | None:
        return self.topk(5)

    @property
    def ks(self) -> list[int]:
        return shown_ks(self.candidates)

    @property
    def recall(self) -> list[float | None]:
        return [n / self.labelled if self.labelled else None for n in self.survived]


class SummaryRow(BaseModel):
    """One run's row of the summary CSV (``classify --csv``): an experiment log, one fixed header whatever the profile,
    OOD rule or dtype, so every run appends to one file. Empty cells: not applicable (no labels, no rule)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    schema_: int = Field(SUMMARY_SCHEMA, alias="schema")   # 2: this header; 1: recall_stageN columns, no identity
    started: str                        # the run's start, UTC, ISO 8601
    avarc_version: str
    model: str
    weights: str                        # the VAR weights' SHA-256 (sha256: + 16 hex digits)
    vae_weights: str
    extensions: str                     # each extension's rows' SHA-256 (16 hex digits), ``;``-separated
    dtype: str
    compile: bool
    threads: int
    profile: str
    stages: str                         # the schedule: scales×samples→keep per stage, ``;``-separated
    temperature: FiniteFloat
    ood_rule: str                       # SCORE≥THRESHOLD the run abstained by (empty: none)
    seed: int
    inputs: str                         # the inputs as given, ``;``-separated
    dataset: str
    subset: str
    images: int
    skipped: int
    abstained: int
    top1: FiniteFloat | Literal[""]     # top-k accuracy for A-VARC eval.py's k (empty: k ≥ the candidates, no labels)
    top3: FiniteFloat | Literal[""]
    top5: FiniteFloat | Literal[""]
    top10: FiniteFloat | Literal[""]
    top20: FiniteFloat | Literal[""]
    top25: FiniteFloat | Literal[""]
    top50: FiniteFloat | Literal[""]
    top100: FiniteFloat | Literal[""]
    recall_per_stage: str               # the true class still in the running after each stage, ``;``-separated
    early_exits: int
    gflops_executed: FiniteFloat | Literal[""]   # per image, mean (reuse and early exits counted)
    gflops_paper: FiniteFloat | Literal[""]      # per image, mean, the paper's convention
    seconds: FiniteFloat
    images_per_s: FiniteFloat | Literal[""]


SUMMARY_COLUMNS = [f.alias or name for name, f in SummaryRow.model_fields.items()]


def _csv_header(path: Path) -> list[str] | None:
    """The header row of an existing, non-empty CSV file (None when there is none yet; [] when the file is not a
    UTF-8 CSV anywhere in it, since the summary row is appended to the whole file)."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        return next(csv.reader(path.read_bytes().decode("utf-8").splitlines()), [])
    except (UnicodeDecodeError, csv.Error, OSError):
        return []


def check_csv(path: str | os.PathLike, columns: Sequence[str] = SUMMARY_COLUMNS) -> None:
    """A row of ``columns`` can be appended under the file's header; checked before a run starts so a long run never
    ends on a CSV it cannot add to. Every run has the same columns (:class:`SummaryRow`); a file with others is
    refused naming the real difference."""
    path = Path(path)
    header = _csv_header(path)
    if header is None or header == list(columns):
        return
    missing, extra = [c for c in columns if c not in header], [c for c in header if c not in columns]
    if header[:3] == ["model", "profile", "seed"]:
        why = "a summary CSV of an older avarc (per-stage recall columns; no weights' SHA, dtype or start time)"
    elif not header:
        why = "not a UTF-8 CSV"
    elif missing or extra:
        why = "its header " + "; ".join([*([f"lacks {', '.join(missing[:3])}"] if missing else []),
                                         *([f"has {', '.join(extra[:3])} too"] if extra else [])])
    else:
        why = "its columns are in another order"
    raise AvarcError(f"{path}: {why}; left it untouched; choose another file", option="csv")


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


def summary_row(m: Metrics, profile: Profile, run: RunIdentity, *, started: str, threads: int,
                inputs: Sequence[str], dataset: str | None, subset: str | None, gflops: tuple[list[float], list[float]],
                new: int, seconds: float) -> dict:
    """One run's row for :func:`append_csv_summary`; ``new`` images were classified in ``seconds`` by this run;
    ``gflops``: the executed and paper GFLOPs of each classified record."""
    rule = profile.ood
    executed, paper = gflops

    def mean(xs: list[float]) -> float | Literal[""]:
        return round(sum(xs) / len(xs), 6) if xs else ""

    tops: dict[str, Any] = {f"top{k}": m.topk(k) if k in m.ks and m.labelled else "" for k in TOPK}  # top1, top3, …
    row = SummaryRow(
        started=started, avarc_version=__version__, model=run.model, weights=run.weights or "",
        vae_weights=run.vae_weights or "", extensions=";".join(e[:16] for e in run.extensions), dtype=run.dtype or "",
        compile=bool(run.compile), threads=threads, profile=profile.name,
        stages=";".join(f"{s.scales}x{s.samples}->{s.keep}" for s in profile.stages),
        temperature=run.temperature if run.temperature is not None else 1.0,
        ood_rule=f"{run.ood_score}>={rule.threshold(run.ood_score or rule.score)}" if rule is not None else "",
        seed=run.seed, inputs=";".join(inputs), dataset=dataset or "", subset=subset or "", images=m.images,
        skipped=m.skipped, abstained=m.abstained,
        **tops,
        recall_per_stage=";".join(f"{r:.6g}" for r in m.recall if r is not None), early_exits=m.early_exits,
        gflops_executed=mean(executed), gflops_paper=mean(paper), seconds=round(seconds, 3),
        images_per_s=round(new / seconds, 3) if new and seconds > 0 else "")
    return row.model_dump(by_alias=True)
