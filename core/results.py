"""Result records (one JSON line per image), the results file with ``--resume``, and the run's metrics.

Every record carries a ``run`` key (model, profile, seed and a fingerprint of everything that changes scores),
so resuming skips only images done by the same run. A kill -9 can leave a torn last line; resuming cuts it off,
so no record is duplicated and none that was complete is lost.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .schedule import Prediction, rank
from .data import Item
from .errors import AvarcError
from .model import Model
from .profiles import Profile


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
    candidate classes, which together decide every score."""
    schedule = [[s.scales, s.samples, s.keep, s.exit_margin] for s in profile.stages]
    blob = json.dumps([model_id, schedule, profile.sigma, seed, sorted(candidates), extra or {}], sort_keys=True)
    return {"model": model_id, "profile": profile.name, "seed": seed,
            "fingerprint": hashlib.sha256(blob.encode()).hexdigest()[:16]}


def ok_record(item: Item, p: Prediction, names: Sequence[str], run: dict, topk: int) -> dict:
    return {
        "path": item.path,
        "label": item.label,
        "label_name": names[item.label] if item.label is not None else None,
        "pred": p.pred,
        "pred_name": names[p.pred],
        "label_rank": p.label_rank(item.label) if item.label is not None else None,
        "topk": [{"class": c, "name": names[c], "score": round(s, 4)} for c, s in p.ranking[:topk]],
        "stages": [{"scales": st.scales, "samples": st.samples, "keep": st.keep, "candidates": st.candidates,
                    "scores": [round(s, 4) for s in st.scores]} for st in p.stages],
        "exited_after": p.exited_after,
        "posterior": [{"class": c, "name": names[c], "p": round(q, 6)} for c, q in p.posterior[:topk]],
        "status": "ok",
        "error": None,
        "run": run,
    }


def skipped_record(item: Item, reason: str, names: Sequence[str], run: dict) -> dict:
    return {"path": item.path, "label": item.label,
            "label_name": names[item.label] if item.label is not None else None,
            "pred": None, "pred_name": None, "label_rank": None, "topk": [], "stages": [], "exited_after": None,
            "posterior": [], "status": "skipped", "error": reason, "run": run}


@dataclass
class Resumed:
    """What ``--resume`` found: the records already done by this run (by path), and what it cut out."""

    done: dict[str, dict] = field(default_factory=dict)
    torn: bool = False        # a partial last line was cut off
    dropped: int = 0          # records of another run (or unreadable lines) removed


def open_results(path: str | os.PathLike, resume: bool, run: dict) -> Resumed:
    """Prepare the results file: new (an existing file needs ``--resume``), or resumed and repaired."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        return Resumed()
    if not resume:
        raise AvarcError(f"{path}: already exists; pass --resume to continue it, or choose another --out")
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    state = Resumed(torn=end < len(data))
    keep = []
    for line in data[:end].splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and (rec.get("run") or {}).get("fingerprint") == run["fingerprint"]
        except ValueError:
            ok = False
        if not ok or rec["path"] in state.done:
            state.dropped += 1
            continue
        state.done[rec["path"]] = rec
        keep.append(line)
    if state.dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(b"".join(line + b"\n" for line in keep))
        os.replace(tmp, path)
    elif state.torn:
        os.truncate(path, end)
    return state


class ResultsWriter:
    """Appends records as they arrive, one line each, flushed after every batch."""

    def __init__(self, path: str | os.PathLike):
        self._f = open(path, "a", encoding="utf-8")

    def write(self, records: Iterable[dict]) -> None:
        self._f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


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
    survived: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.survived = self.survived or [0] * self.num_stages

    def add(self, record: dict) -> None:
        self.images += 1
        if record["status"] != "ok":
            self.skipped += 1
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


def append_csv_summary(path: str | os.PathLike, row: dict) -> None:
    """Add one run's summary row to a CSV (header written when the file is new), so runs accumulate into a table."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def summary_row(m: Metrics, profile: Profile, run: dict, dataset: str | None, subset: str | None, new: int,
                seconds: float) -> dict:
    """One run's row for :func:`append_csv_summary`; ``new`` images were classified in ``seconds`` by this run."""
    row = {"model": run["model"], "profile": profile.name, "seed": run["seed"], "dataset": dataset or "",
           "subset": subset or "", "images": m.images, "skipped": m.skipped,
           "top1": m.top1 if m.top1 is not None else "", "top5": m.top5 if m.top5 is not None else ""}
    row.update({f"recall_stage{i}": r if r is not None else "" for i, r in enumerate(m.recall, 1)})
    row.update({"early_exits": m.early_exits, "images_per_s": round(new / seconds, 3) if new and seconds > 0 else ""})
    return row
