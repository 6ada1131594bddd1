"""Classification schedules ("profiles"): which scales, how many smoothing samples and how many surviving
candidates each stage uses, read from YAML.

A profile file looks like::

    description: A-VARC+ (paper)
    sigma: 0.1
    stages:
      - {scales: 6, keep: 10}
      - {scales: 10, keep: 3}
      - {scales: 10, samples: 3}

``scales`` is a count of leading scales, ``all`` (every scale of the model) or ``all-N`` (all but the last N),
so one file fits models of different geometries; :meth:`Profile.resolve` turns it into numbers for one model.
An optional ``temperature`` (written by ``avarc tune``) calibrates the posterior when ``--temperature`` is not given.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    PositiveInt,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from ..choices import OOD_SCORES
from ..engine.profile import _ALL, OodRule, Profile, Stage
from ..errors import AvarcError, did_you_mean, schema_problem
from .files import write_text


def _fail(where: str, problem: str) -> AvarcError:
    return AvarcError(f"{where}: {problem}")


def _scales(value: int | str) -> int | str:
    if isinstance(value, str):
        if not _ALL.fullmatch(value.strip()):
            raise ValueError(f"{value!r} is not a number, `all` or `all-N`; fix the profile")
        return value.strip()
    if value < 1:
        raise ValueError(f"must be a number ≥ 1, `all` or `all-N`, got {value!r}; fix the profile")
    return value


class StageFile(BaseModel):
    """One stage of a profile file: ``scales`` (a count, ``all`` or ``all-N``), ``samples``, ``keep`` and an
    optional ``exit_margin`` in nats."""

    model_config = ConfigDict(strict=True, extra="forbid")

    scales: Annotated[int | str, AfterValidator(_scales), WithJsonSchema({"anyOf": [
        {"type": "integer", "minimum": 1}, {"type": "string", "pattern": r"^\s*all(\s*-\s*\d+)?\s*$"}]})]
    samples: PositiveInt = 1
    keep: PositiveInt = 1
    exit_margin: Annotated[FiniteFloat, Field(gt=0)] | None = None


class OodFile(BaseModel):
    """``ood:`` of a profile file (written by ``avarc calibrate-ood``): the deciding score, the coverage the
    thresholds were fitted for and one threshold per score."""

    model_config = ConfigDict(strict=True, extra="forbid")

    score: Literal[OOD_SCORES]                # type: ignore[valid-type]
    coverage: Annotated[FiniteFloat, Field(gt=0, le=1)]
    thresholds: Annotated[dict[Literal[OOD_SCORES], FiniteFloat], Field(min_length=1)]  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _has_threshold(self) -> OodFile:
        if self.score not in self.thresholds:
            raise ValueError(f"score: {self.score!r} has no threshold; fit the rule with `avarc calibrate-ood`")
        return self


class ProfileFile(BaseModel):
    """A profile YAML file, the one declaration its reader (:func:`parse_profile`) and writer (:func:`profile_yaml`)
    use, published as ``schemas/profile.schema.json``."""

    model_config = ConfigDict(strict=True, extra="forbid")

    name: str | None = None
    description: str = ""
    sigma: Annotated[FiniteFloat, Field(ge=0)] = 0.1
    temperature: Annotated[FiniteFloat, Field(gt=0)] | None = None
    guard_margin: Annotated[FiniteFloat, Field(ge=0)] | None = None
    stages: Annotated[list[StageFile], Field(min_length=1)]
    ood: OodFile | None = None


def _where(loc: list[str | int]) -> str:
    """A problem's place in a profile: ``stage 2: samples``, ``sigma``, ``ood: score``."""
    if len(loc) >= 2 and loc[0] == "stages" and isinstance(loc[1], int):
        loc = [f"stage {loc[1] + 1}", *loc[2:]]
    return ": ".join(map(str, loc))


def parse_profile(doc, name: str, source: str) -> Profile:
    """A YAML document (already loaded) → validated Profile; every error names ``source``, the stage and the field."""
    if not isinstance(doc, dict):
        raise _fail(source, "a profile must be a mapping with a `stages:` list; see the shipped profiles")
    try:
        f = ProfileFile.model_validate(doc)
    except ValidationError as e:
        loc, problem = schema_problem(e)
        fix = "" if "fix" in problem or "avarc" in problem else "; fix the profile"
        if problem == "unknown field":
            known = StageFile if loc[:1] == ["stages"] else OodFile if loc[:1] == ["ood"] else ProfileFile
            fix = f"; use {', '.join(known.model_fields)}"
        raise _fail(source, f"{_where(loc)}: {problem}{fix}" if loc else f"{problem}{fix}") from None
    stages = tuple(Stage(st.scales, st.samples, st.keep, st.exit_margin) for st in f.stages)
    for i, (a, b) in enumerate(zip(stages, stages[1:]), 2):
        if b.keep > a.keep:
            raise _fail(f"{source}: stage {i}", f"keep: {b.keep} is more than stage {i - 1} keeps ({a.keep}); "
                                                "candidates only shrink from stage to stage")
    if stages[-1].keep != 1:
        raise _fail(f"{source}: stage {len(stages)}", f"keep: must be 1 in the last stage (its best candidate is "
                                                      f"the prediction), got {stages[-1].keep}")
    if stages[-1].exit_margin is not None:
        raise _fail(f"{source}: stage {len(stages)}", "exit_margin: the last stage has nothing left to skip; remove it")
    ood = OodRule(f.ood.score, f.ood.coverage, tuple(f.ood.thresholds.items())) if f.ood is not None else None
    return Profile(name=f.name if f.name is not None else name, stages=stages, sigma=f.sigma,
                   description=f.description.strip(), source=source, temperature=f.temperature,
                   guard_margin=f.guard_margin, ood=ood)


def profile_yaml(profile: Profile, comment: str = "") -> str:
    """A profile as the YAML ``load_profile`` reads back to the same schedule (built through :class:`ProfileFile`, so
    a profile that would not read back is never written); ``comment`` becomes ``#`` lines on top."""
    ood = OodFile(score=profile.ood.score, coverage=profile.ood.coverage,
                  thresholds=dict(profile.ood.thresholds)) if profile.ood is not None else None
    f = ProfileFile(name=profile.name, description=profile.description, sigma=profile.sigma,
                    temperature=profile.temperature, guard_margin=profile.guard_margin, ood=ood,
                    stages=[StageFile(scales=st.scales, samples=st.samples, keep=st.keep, exit_margin=st.exit_margin)
                            for st in profile.stages])
    doc = f.model_dump(exclude_none=True, exclude={"stages"})
    head = "".join(f"# {line}\n".replace("# \n", "#\n") for line in comment.splitlines())
    body = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100)
    stages = "".join("  - {" + ", ".join(f"{k}: {v}" for k, v in _stage_fields(st)) + "}\n" for st in profile.stages)
    return head + body + "stages:\n" + stages


def _stage_fields(st: Stage) -> list[tuple[str, object]]:
    fields: list[tuple[str, object]] = [("scales", st.scales), ("samples", st.samples), ("keep", st.keep)]
    return fields + ([("exit_margin", repr(st.exit_margin))] if st.exit_margin is not None else [])


def write_profile(profile: Profile, path: str | os.PathLike, comment: str = "", force: bool = False) -> Path:
    """Write a profile YAML atomically; an existing file needs ``force``."""
    return write_text(path, profile_yaml(profile, comment), force=force)


def _shipped_dir():
    return resources.files("avarc.profiles")


def shipped_names() -> list[str]:
    return sorted(p.name[:-5] for p in _shipped_dir().iterdir() if p.name.endswith(".yaml"))


MAX_PROFILE_BYTES = 1 << 20


class _BoundedLoader(yaml.SafeLoader):
    """YAML without aliases: a profile never needs them, and nested aliases expand exponentially (a few hundred bytes
    to billions of nodes), so a hostile file is refused at its first alias instead of exhausting memory."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a profile",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)


def _read(text: str, name: str, source: str) -> Profile:
    if len(text) > MAX_PROFILE_BYTES:
        raise _fail(source, f"is {len(text)} characters, too large for a profile; check the file")
    try:
        doc = yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 — a SafeLoader without aliases
    except RecursionError:
        raise _fail(source, "invalid YAML (nested too deeply); fix the file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise _fail(source, f"invalid YAML{at} ({problem}); fix the file") from None
    return parse_profile(doc, name, source)


def load_profile(name_or_path: str | os.PathLike) -> Profile:
    """A shipped profile by name (``a-varc-plus``) or a YAML file path."""
    key = str(name_or_path)
    if key in shipped_names():
        return _read(_shipped_dir().joinpath(f"{key}.yaml").read_text(), key, f"profile {key}")
    path = Path(key)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise _fail(str(path), f"cannot read the profile ({e.__class__.__name__}); check the file") from None
        return _read(text, path.stem, str(path))
    if path.suffix.lower() in (".yaml", ".yml") or len(path.parts) > 1:
        raise AvarcError(f"{key}: no such profile file; check the path, or use a shipped profile: "
                         f"{', '.join(shipped_names())}")
    beside = [f"{key}{ext}" for ext in (".yaml", ".yml") if Path(f"{key}{ext}").is_file()]
    hint = f" (did you mean the file {beside[0]!r}?)" if beside else did_you_mean(key, shipped_names())
    raise AvarcError(f"unknown profile {key!r}{hint}; use one of {', '.join(shipped_names())} or a YAML file path",
                     option="profile")


def list_profiles() -> list[Profile]:
    """Every shipped profile, validated."""
    return [load_profile(n) for n in shipped_names()]


def default_profile_name(model) -> str:
    """The profile a model is classified with when none is given: its metadata's ``default_profile`` (the bundled
    ``digits`` names ``digits``), else ``a-varc-plus`` for the 10-scale official geometries and ``varc`` otherwise."""
    name = model.meta.get("default_profile")
    if name:
        return str(name)
    return "a-varc-plus" if len(model.spec.var.patch_nums) >= 10 else "varc"
