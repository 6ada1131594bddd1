"""A classify run's decisions, ready to explain: each record's image found by its identity (the absolute ``file``, or
the dataset row it names), the two classes the run set against each other, and the stage that decided between them
— its scales and samples, with the run's seed and σ — so a panel shows the decision the run made: in a
mistake, the predicted class wins the pair on the scales it won on, by the run's own lead."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Collection, Sequence

from ..engine.profile import Profile, Stage
from ..engine.stages import rank
from ..errors import AvarcError
from ..io import hf_data
from ..io.data import DataOptions, Item
from ..io.records import Record, RunIdentity, record_key
from .explain import Target

EXPLAINED = ("ok", "abstained")        # records that hold a decision (a skipped one has none)
_ROW = re.compile(r"(?P<raw>.+)\[(?P<split>[^\[\]]*)\]#(?P<row>\d+)")


@dataclass(frozen=True)
class Decision:
    """One record's image, the pair to explain on its deciding stage, the run's prediction and its lead."""

    item: Item
    target: Target
    pred: int | None
    lead: float | None          # the run's score of A minus B on that stage (None: the pair never met in a stage)


def ranking(record: Record) -> list[int]:
    """The record's classes best first, from its stages: the last stage's ranking, then classes pruned earlier by
    their last score (later stages first), as the run ranked them."""
    stages = record["stages"]
    out = [c for c, _ in rank(stages[-1]["candidates"], stages[-1]["scores"])]
    for st in reversed(stages[:-1]):
        out += [c for c, _ in rank(st["candidates"], st["scores"]) if c not in out]
    return out


def deciding_stage(record: Record, a: int, b: int) -> int:
    """0-based index of the last stage that scored both A and B (B not a candidate, i.e. the null class: the last
    that scored A); else the record's last stage, the one that made its prediction."""
    stages, scored = record["stages"], set(ranking(record))
    both = [k for k, st in enumerate(stages) if a in st["candidates"] and (b in st["candidates"] or b not in scored)]
    return both[-1] if both else len(stages) - 1


def decision(record: Record, item: Item, num_classes: int, cls: int | None = None, vs: int | None = None,
             label: int | None = None) -> Decision:
    """The record's pair: A = ``cls``, else the true class, else the prediction; B = ``vs``, else the prediction
    when A is not it, else the best other class of the run — explained on the stage that decided between them."""
    order = ranking(record)
    pred = record["pred"] if record["pred"] is not None else order[0]       # an abstained image keeps its ranking
    a = cls if cls is not None else label if label is not None else pred
    b = vs if vs is not None else pred if pred != a else next((c for c in order if c != a), num_classes)
    k = deciding_stage(record, a, b)
    st = record["stages"][k]
    score = dict(zip(st["candidates"], st["scores"]))
    lead = score[a] - score[b] if a in score and b in score else None
    target = Target(a, b, label, scales=st["scales"], samples=st["samples"], stage=k + 1)
    return Decision(item, target, record["pred"], lead)


def run_decisions(records: Sequence[Record], num_classes: int, data: DataOptions = DataOptions(),
                  mistakes: bool = False, cls: int | None = None, vs: int | None = None, label: int | None = None,
                  labels: str = "auto", keys: Collection[str] | None = None, where: str = "run") -> list[Decision]:
    """The decisions of a run's records to explain, once per image (``keys``: only these images; ``mistakes``: only
    labelled images it got wrong; ``label``: every image's true class; ``labels``: ``none`` ignores the run's).
    A class index the model lacks (a run made with extensions) is one error naming the fix."""
    out: dict[str, Decision] = {}
    rows = run_rows(records, data, where)
    for r in records:
        key = record_key(r)
        if r["status"] not in EXPLAINED or key in out or (keys is not None and key not in keys):
            continue
        truth = label if label is not None else None if labels == "none" else r["label"]
        if labels == "folders" and truth is None:
            raise AvarcError(f"{where}: {r['path']} has no true class in the run; explain with --labels auto or none",
                             option="labels")
        if mistakes and (truth is None or r["pred"] is None or r["pred"] == truth):
            continue
        named = [c for c in (truth, r["pred"], *ranking(r)) if c is not None]
        if any(not 0 <= c < num_classes for c in named):
            raise AvarcError(f"{where}: the run has class {max(named)}, but this model has classes 0…{num_classes - 1};"
                             " the run used extensions: pass them with -e (or the run's model with -m)",
                             option="extension")
        out[key] = decision(r, record_item(r, data, rows), num_classes, cls, vs, truth)
    return list(out.values())


def record_item(record: Record, data: DataOptions, rows: dict[tuple[str, str], hf_data.SplitImages]) -> Item:
    """The record's image by its identity, from any working folder: its absolute ``file``, or the dataset row its
    ``path`` names (each dataset opened once, in ``rows``)."""
    file = record_key(record)
    split = _split(file)
    if split is not None:
        return Item(path=file, label=record["label"], source=_open(split, data, rows), row=int(split[2]))
    return Item(path=file, label=record["label"], border=data.border if "accepted" in record else 0)


def _split(key: str) -> tuple[str, str, str] | None:
    """A record key's dataset, split and row, when it names a row of a dataset (not a file of that odd name)."""
    row = _ROW.fullmatch(key)
    if row is None or os.path.lexists(key) or not hf_data.is_dataset(hf_data.display(row["raw"])):
        return None
    return row["raw"], row["split"], row["row"]


def _open(split: tuple[str, str, str], data: DataOptions,
          rows: dict[tuple[str, str], hf_data.SplitImages]) -> hf_data.SplitImages:
    raw, name, _ = split
    if (raw, name) not in rows:
        found, _ = hf_data.read_rows([raw], lambda name, where: 0, "none", name, data.image_column, None)
        rows[raw, name] = found[0].images
    return rows[raw, name]


def run_rows(records: Sequence[Record], data: DataOptions, where: str) -> dict[tuple[str, str], hf_data.SplitImages]:
    """Every dataset split the run's records name, opened, after checking they hold the rows the run read: a
    dataset rewritten under the same name since (its fingerprint, the identity's ``inputs``, differs) holds other
    images at those rows, so it is one error, not panels or thumbnails of the wrong images."""
    rows: dict[tuple[str, str], hf_data.SplitImages] = {}
    for r in records:
        split = _split(record_key(r))
        if split is not None:
            _open(split, data, rows)
    ran = {r["run"].inputs for r in records} - {None}
    if rows and ran and hf_data.datasets_fingerprint(s.fingerprint for s in rows.values()) not in ran:
        names = ", ".join(sorted({raw for raw, _ in rows}))
        raise AvarcError(f"{where}: {names} is not the dataset the run read (its content changed since, so its rows "
                         "are other images); put back the run's dataset, or classify the dataset as it is now")
    return rows


def record_file(record: Record) -> str:
    """The file a record's image is read from: its absolute ``file``, or the dataset its row names."""
    key = record_key(record)
    split = _split(key)
    return split[0] if split is not None else key


def run_profile(run: RunIdentity, where: str = "run") -> Profile | None:
    """The run's schedule as a profile (σ and the resolved stages its records hold; None for records written before
    they held it)."""
    schedule = run.schedule
    if schedule is None:
        return None
    try:
        stages = tuple(Stage(int(sc), int(n), int(keep), None if m is None else float(m))
                       for sc, n, keep, m in schedule["stages"])
        return Profile(name=run.profile, stages=stages, sigma=float(schedule["sigma"]), temperature=run.temperature)
    except (TypeError, ValueError, KeyError) as e:
        raise AvarcError(f"{where}: the run's schedule is damaged ({type(e).__name__}); pass the run's profile with "
                         "-p") from None
