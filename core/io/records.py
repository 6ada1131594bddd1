"""The JSONL record, one per image: the public output of ``avarc classify`` and the input of ``--resume``,
``report`` and ``explain --from``. Its schema (:data:`RECORD`: one strict pydantic ``TypedDict`` per ``status``;
published as ``schemas/record.schema.json``), the run identity every record carries (:class:`RunIdentity`), the one
writer (:func:`record_line`: checked by the schema, strict JSON) and the one reader (:func:`parse_record` /
:func:`read_records`: checked by the same schema, so a damaged file is one line naming the field, never a
traceback)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Literal, Sequence, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    TypeAdapter,
    ValidationError,
    with_config,
)
from typing_extensions import NotRequired, TypedDict

from ..choices import OOD_SCORES
from ..engine.model import Model
from ..engine.profile import Profile
from ..engine.stages import Prediction
from ..errors import AvarcError, schema_problem
from ..models.checkpoints import file_sha256
from .data import Item
from .files import absolute
from .registry import is_registry_name

SCHEMA_VERSION = 2      # 1: records before the declared schema (no ``schema`` field); 2: ``schema``, topk ``stage``


STRICT = ConfigDict(strict=True, extra="allow")   # no coercion ("3" is not 3); a newer avarc's extra fields are kept


@with_config(STRICT)
class _Strict(TypedDict):
    pass


ClassId = Annotated[int, Field(ge=0)]


class StageRecord(_Strict):
    """One profile stage of a record: the candidates it scored and their scores (4 decimals)."""

    scales: Annotated[int, Field(ge=1)]
    samples: Annotated[int, Field(ge=1)]
    keep: Annotated[int, Field(ge=1)]
    candidates: Annotated[list[ClassId], Field(min_length=1)]
    scores: Annotated[list[FiniteFloat], Field(min_length=1)]


def _paired(stage: StageRecord) -> StageRecord:
    if len(stage["candidates"]) != len(stage["scores"]):
        raise ValueError("candidates and scores differ in length")
    return stage


Stage = Annotated[StageRecord, AfterValidator(_paired)]


RankedClass = TypedDict("RankedClass", {
    "class": ClassId, "name": str, "score": FiniteFloat,
    "stage": NotRequired[Annotated[int, Field(ge=1)]],                  # schema 2
    "p": NotRequired[Annotated[FiniteFloat, Field(ge=0, le=1)]]})      # schema 2
"""One ``topk`` entry, the shape of ``Prediction.to_dict()``'s ``top``: a class, its score (nats), the 1-based stage
that scored it last (the last stage for its candidates; an earlier one for a class pruned there, whose score counts
fewer scales or samples, so compare scores within a stage) and its posterior probability (0 when pruned)."""
PosteriorClass = TypedDict("PosteriorClass", {
    "class": ClassId, "name": str, "p": Annotated[FiniteFloat, Field(ge=0, le=1)]})
with_config(STRICT)(RankedClass)       # the functional form ("class" is a keyword), configured in place
with_config(STRICT)(PosteriorClass)


class Gflops(_Strict):
    """The image's compute in GFLOPs: ``executed`` (reuse and early exits counted) and ``paper`` (the paper's
    convention)."""

    executed: Annotated[FiniteFloat, Field(ge=0)]
    paper: Annotated[FiniteFloat, Field(ge=0)]


class OodRecord(_Strict):
    """An image's out-of-distribution scores (``avarc.tasks.ood``, higher = more in-distribution) and the rule's
    deciding ``score`` and ``threshold`` (null: no rule)."""

    likelihood: FiniteFloat
    ratio: FiniteFloat
    posterior: FiniteFloat
    score: Literal[OOD_SCORES]                # type: ignore[valid-type]
    threshold: FiniteFloat | None
    log_px: NotRequired[list[FiniteFloat]]
    log_px_per_token: NotRequired[list[FiniteFloat]]
    tokens: NotRequired[int]
    log_px_given_pred: NotRequired[FiniteFloat]
    log_px_given_null: NotRequired[FiniteFloat]


class RunIdentity(BaseModel):
    """The run's identity, the ``run`` key of every record: every input of the computation, so ``--resume`` adds only
    records of the same computation. ``fingerprint`` hashes all of it; each part is also a field, so a mismatch can be
    named. Records of older releases lack the newer fields (None)."""

    model_config = ConfigDict(frozen=True, extra="allow", strict=True)

    model: str
    profile: str
    seed: int
    fingerprint: str
    weights: str | None = None           # the VAR weights' SHA-256 (``sha256:`` + 16 hex digits)
    vae_weights: str | None = None       # the VQ-VAE weights' SHA-256
    dtype: str | None = None
    compile: bool | None = None
    temperature: FiniteFloat | None = None
    topk: int | None = None
    labels: str | None = None
    ood_score: str | None = None         # the OOD score the rule decides on (``--ood-score``)
    extensions: list[str] = []           # each extension's rows' SHA-256, bottom first
    inputs: str | None = None            # a local dataset's files' SHA-256 (a hub one's own fingerprint); None: files
    threads: int | None = None           # the CPU threads it ran on: kept beside the identity, not in the fingerprint
    # How to rebuild the computation (``explain --from``), beside the identity: their content is in the fingerprint
    schedule: dict | None = None         # {sigma, stages: [[scales, samples, keep, exit_margin], …]}, resolved
    vae_file: str | None = None          # the VQ-VAE given (``--vae``), resolved; None: the model's own
    extension_files: list[str] = []      # the extension files given (``-e``), resolved


class _Common(_Strict):
    schema: NotRequired[int]             # SCHEMA_VERSION; absent: 1
    path: str
    file: NotRequired[str]               # the resolved absolute path (or dataset row): the ``--resume`` key
    label: ClassId | None
    label_name: str | None
    accepted: NotRequired[list[ClassId]]  # ObjectNet: every class the image counts right for
    run: RunIdentity


class _Scored(_Common):
    """What a scored image's record holds, prediction or not."""

    label_rank: Annotated[int, Field(ge=1)] | None
    topk: list[RankedClass]
    stages: Annotated[list[Stage], Field(min_length=1)]
    exited_after: Annotated[int, Field(ge=1)] | None
    posterior: list[PosteriorClass]
    gflops: NotRequired[Gflops | None]
    error: None


class OkRecord(_Scored):
    """A classified image."""

    status: Literal["ok"]
    pred: ClassId
    pred_name: str
    ood: NotRequired[OodRecord | None]


class AbstainedRecord(_Scored):
    """An image the profile's OOD rule answered "none of these" for: its ranking and scores are kept, ``pred`` is
    null."""

    status: Literal["abstained"]
    pred: None
    pred_name: None
    ood: OodRecord


class SkippedRecord(_Common):
    """An image that could not be read; ``error`` says why."""

    status: Literal["skipped"]
    error: str
    pred: NotRequired[None]
    pred_name: NotRequired[None]
    label_rank: NotRequired[None]
    topk: NotRequired[list[RankedClass]]
    stages: NotRequired[list[Stage]]
    exited_after: NotRequired[None]
    posterior: NotRequired[list[PosteriorClass]]
    gflops: NotRequired[None]
    ood: NotRequired[None]


Record = Union[OkRecord, AbstainedRecord, SkippedRecord]
"""One image's result: the one JSON line per image that classify writes and resume, report, explain ``--from`` and the
metrics read, through :func:`record_line` and :func:`parse_record` (the only writer and reader)."""
RECORD = TypeAdapter(Annotated[Record, Field(discriminator="status")])
RECORD_STATUSES = ("ok", "abstained", "skipped")


def model_identity(model: Model, arg: str) -> str:
    """The model's name a person knows it by: a registry name as given, else the VAR file's resolved path (what
    ``avarc report`` loads the architecture from)."""
    if is_registry_name(str(arg)):
        return str(arg)
    name = model.meta.get("name")
    if name:
        return str(name)
    return text(absolute(model.var_file)) if model.var_file is not None else text(arg)


def weights_identity(file: str | os.PathLike | None) -> str | None:
    """Weights by content (``sha256:`` and 16 hex digits): another file of the same size is another run."""
    if file is None or not Path(file).is_file():
        return None
    return "sha256:" + file_sha256(file)[:16]


IDENTITY = ("model", "weights", "vae_weights", "profile", "seed", "dtype", "compile", "temperature", "topk", "labels",
            "ood_score", "extensions", "inputs")


def run_identity(model_id: str, profile: Profile, seed: int, candidates: Sequence[int], build: dict | None = None,
                 **settings) -> RunIdentity:
    """The run's identity. ``fingerprint`` covers the model, both weight files, the resolved schedule (stages, σ,
    guard margin, OOD thresholds), the seed, the candidate classes and every setting that changes a record
    (``settings``: the other :class:`RunIdentity` fields). ``build`` (``vae_file``, ``extension_files``: the files
    given) and ``schedule`` say how to rebuild the run (``explain --from``); their content is in the fingerprint."""
    schedule = [[s.scales, s.samples, s.keep, s.exit_margin] for s in profile.stages]
    abstain = [[profile.ood.score, sorted(profile.ood.thresholds)]] if profile.ood is not None else []
    blob = json.dumps([model_id, schedule, profile.sigma, profile.guard_margin, seed, sorted(candidates), settings,
                       *abstain], sort_keys=True)
    return RunIdentity(model=model_id, profile=profile.name, seed=seed, **settings, **(build or {}),
                       schedule={"sigma": profile.sigma, "stages": schedule},
                       fingerprint=hashlib.sha256(blob.encode("utf-8", "surrogateescape")).hexdigest()[:16])


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


def ok_record(item: Item, p: Prediction, names: Sequence[str], run: RunIdentity, topk: int) -> Record:
    """A classified image's record; an abstained one keeps its ranking, posterior and ``ood`` scores, only ``pred``
    and ``pred_name`` are null."""
    label = item.record_label(p.label_rank)
    return {  # type: ignore[misc, return-value]  # OkRecord or AbstainedRecord by p.abstained: mypy cannot pick one
        "schema": SCHEMA_VERSION,
        "path": item.path,
        "file": item.file,
        "label": label,
        "label_name": item.label_name or (names[label] if label is not None else None),
        **({"accepted": list(item.accepted)} if item.accepted else {}),
        "pred": None if p.abstained else p.pred,
        "pred_name": None if p.abstained else names[p.pred],
        "label_rank": p.label_rank(label) if label is not None else None,
        "topk": [c.to_dict() for c in p.top[:topk]],
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


def skipped_record(item: Item, reason: str, names: Sequence[str], run: RunIdentity) -> Record:
    return {"schema": SCHEMA_VERSION, "path": item.path, "file": item.file, "label": item.label,
            "label_name": item.label_name or (names[item.label] if item.label is not None else None),
            "pred": None, "pred_name": None, "label_rank": None, "topk": [], "stages": [], "exited_after": None,
            "posterior": [], "ood": None, "status": "skipped", "error": reason, "run": run}


class NotARecord(ValueError):
    """A line that is not a result record; the message says what is wrong with it, in one line."""


def parse_record(line: bytes | str) -> Record:
    """One results line as a record, checked by the schema (:data:`RECORD`); :class:`NotARecord` names the first
    problem (not JSON, a NaN, a missing field, a wrong type or an unknown status)."""
    try:
        text = line.decode("utf-8", "surrogateescape") if isinstance(line, bytes) else line
        return RECORD.validate_python(json.loads(text, parse_constant=_no_constant))
    except RecursionError:
        raise NotARecord("nested too deeply") from None
    except ValidationError as e:
        raise NotARecord(_problem(e)) from None
    except ValueError:
        raise NotARecord("not JSON") from None


def parse_line(line: bytes) -> Record | None:
    """One results line as a record, or None when it is not one."""
    try:
        return parse_record(line)
    except NotARecord:
        return None


def _problem(error: ValidationError) -> str:
    loc, msg = schema_problem(error, tags=RECORD_STATUSES)
    return f"{'.'.join(map(str, loc))}: {msg}" if loc else msg


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


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
        try:
            records.append(parse_record(line))
        except NotARecord as e:
            if number == len(lines) and not data.endswith(b"\n"):
                break
            raise AvarcError(f"{path}: line {number} is not an avarc result record ({e}; damaged or hand-edited); "
                             "fix or remove that line, or pass a file written by `avarc classify --out`",
                             option=option) from None
    if not records:
        raise AvarcError(f"{path}: holds no records; pass a file written by `avarc classify --out`", option=option)
    return records


def unique_records(records: Sequence[Record]) -> tuple[list[Record], int]:
    """One record per image, the last (a skipped image retried by ``--resume``, or a line copied twice, leaves
    several), in the order of first appearance; and how many records were left out."""
    last = {record_key(r): r for r in records}
    return list(last.values()), len(records) - len(last)


def record_line(record: Record) -> bytes:
    """A record as one line of strict JSON, checked by the schema it is read back with (so whatever is written reads
    back), in UTF-8; a path holding a surrogate-escaped byte is written with ``\\u`` escapes, so the line stays valid
    UTF-8. A classified record holding a non-finite number becomes a skipped record saying so."""
    try:
        doc = RECORD.dump_python(RECORD.validate_python(record), mode="json", by_alias=True)
    except ValidationError as e:
        if record.get("status") == "skipped":
            raise ValueError(f"not a valid record: {_problem(e)}") from None
        return record_line({**record, "pred": None, "pred_name": None, "label_rank": None, "topk": [], "stages": [],
                            "exited_after": None, "posterior": [], "ood": None, "gflops": None, "status": "skipped",
                            "error": "the model gave non-finite scores (damaged weights or extension?)"})
    try:
        return (json.dumps(doc, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(doc, allow_nan=False) + "\n").encode("ascii")
