"""The JSONL record, one per image: the public output of ``avarc classify`` and the input of ``--resume``,
``report`` and ``tune``. Its schema (a ``TypedDict``), the run identity every record carries, the one writer
(:func:`record_line`: strict JSON) and the one reader (:func:`parse_line` / :func:`read_records`: every field
checked, so a damaged file is one line, never a traceback)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence, TypedDict

from ..engine.model import Model
from ..engine.profile import Profile
from ..engine.stages import Prediction
from ..errors import AvarcError
from ..models.checkpoints import file_sha256
from .data import Item
from .files import absolute
from .registry import is_registry_name


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
    key: str                # what seeded the image's smoothing noise (its path below the input folder, a row's path)
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
             build: dict | None = None, **settings) -> dict:
    """The ``run`` key of every record: the run's identity. ``fingerprint`` covers the model, its weights, the resolved
    schedule, σ, the seed, the candidate classes and every setting that changes a record (``settings``: weights,
    dtype, temperature, top-k, labels mode) and the abstention rule; each setting is also a field, so a mismatch can
    be named. ``schedule`` (σ and the resolved stages) and ``build`` (``vae_file``, ``extension_files``: the files
    given) say how to rebuild the computation (``explain --from``); their content is in the fingerprint already."""
    schedule = [[s.scales, s.samples, s.keep, s.exit_margin] for s in profile.stages]
    abstain = [[profile.ood.score, sorted(profile.ood.thresholds)]] if profile.ood is not None else []
    blob = json.dumps([model_id, schedule, profile.sigma, seed, sorted(candidates), extra or {}, settings, *abstain],
                      sort_keys=True)
    return {"model": model_id, "profile": profile.name, "seed": seed, **settings, **(build or {}),
            "schedule": {"sigma": profile.sigma, "stages": schedule},
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
        "key": item.key,
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
    return {"path": item.path, "file": item.file, "key": item.key, "label": item.label,
            "label_name": item.label_name or (names[item.label] if item.label is not None else None),
            "pred": None, "pred_name": None, "label_rank": None, "topk": [], "stages": [], "exited_after": None,
            "posterior": [], "ood": None, "status": "skipped", "error": reason, "run": run}


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


