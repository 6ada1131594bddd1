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

import math
import os
from importlib import resources
from pathlib import Path

import yaml

from ..engine.profile import _ALL, OodRule, Profile, Stage
from ..errors import AvarcError, did_you_mean
from .files import write_text

STAGE_FIELDS = ("scales", "samples", "keep", "exit_margin")
PROFILE_FIELDS = ("name", "description", "sigma", "temperature", "stages", "guard_margin", "ood")


def _fail(where: str, problem: str) -> AvarcError:
    return AvarcError(f"{where}: {problem}")


def _int_field(value, where: str, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(where, f"{name}: must be an integer ≥ {minimum}, got {value!r}; fix the profile")
    return value


def _parse_stage(raw, where: str) -> Stage:
    if not isinstance(raw, dict):
        raise _fail(where, f"must be a mapping like {{scales: 6, keep: 10}}, got {raw!r}; fix the profile")
    unknown = [k for k in raw if k not in STAGE_FIELDS]
    if unknown:
        raise _fail(where, f"{unknown[0]}: unknown field; use {', '.join(STAGE_FIELDS)}")
    if "scales" not in raw:
        raise _fail(where, "scales: missing; give a number of scales, `all` or `all-N`")
    scales = raw["scales"]
    if isinstance(scales, str):
        if not _ALL.fullmatch(scales.strip()):
            raise _fail(where, f"scales: {scales!r} is not a number, `all` or `all-N`; fix the profile")
        scales = scales.strip()
    else:
        scales = _int_field(scales, where, "scales")
    margin = raw.get("exit_margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin) or margin <= 0):
        raise _fail(where, f"exit_margin: must be a positive number of nats or null, got {margin!r}; fix the profile")
    return Stage(scales=scales, samples=_int_field(raw.get("samples", 1), where, "samples"),
                 keep=_int_field(raw.get("keep", 1), where, "keep"),
                 exit_margin=float(margin) if margin is not None else None)


def parse_profile(doc, name: str, source: str) -> Profile:
    """A YAML document (already loaded) → validated Profile; every error names ``source``, the stage and the field."""
    if not isinstance(doc, dict):
        raise _fail(source, "a profile must be a mapping with a `stages:` list; see the shipped profiles")
    unknown = [k for k in doc if k not in PROFILE_FIELDS]
    if unknown:
        raise _fail(source, f"{unknown[0]}: unknown field; use {', '.join(PROFILE_FIELDS)}")
    raw_stages = doc.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise _fail(source, "stages: must be a non-empty list of {scales, samples, keep, exit_margin}")
    stages = tuple(_parse_stage(raw, f"{source}: stage {i}") for i, raw in enumerate(raw_stages, 1))
    for i, (a, b) in enumerate(zip(stages, stages[1:]), 2):
        if b.keep > a.keep:
            raise _fail(f"{source}: stage {i}", f"keep: {b.keep} is more than stage {i - 1} keeps ({a.keep}); "
                                                "candidates only shrink from stage to stage")
    if stages[-1].keep != 1:
        raise _fail(f"{source}: stage {len(stages)}", f"keep: must be 1 in the last stage (its best candidate is "
                                                      f"the prediction), got {stages[-1].keep}")
    if stages[-1].exit_margin is not None:
        raise _fail(f"{source}: stage {len(stages)}", "exit_margin: the last stage has nothing left to skip; remove it")
    sigma = doc.get("sigma", 0.1)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise _fail(source, f"sigma: must be a number ≥ 0, got {sigma!r}; fix the profile")
    guard = doc.get("guard_margin")
    if guard is not None and (isinstance(guard, bool) or not isinstance(guard, (int, float)) or not math.isfinite(guard)
                              or guard < 0):
        raise _fail(source, f"guard_margin: must be a number of nats ≥ 0 (0: no guard) or null (the default), "
                            f"got {guard!r}; fix the profile")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise _fail(source, "description: must be a string")
    temperature = doc.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not math.isfinite(temperature) or temperature <= 0):
        raise _fail(source, f"temperature: must be a positive number or null, got {temperature!r}; fix the profile")
    return Profile(name=str(doc.get("name", name)), stages=stages, sigma=float(sigma), description=description.strip(),
                   source=source, temperature=float(temperature) if temperature is not None else None,
                   guard_margin=None if guard is None else float(guard), ood=_parse_ood(doc.get("ood"), source))


def _number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _parse_ood(raw, source: str) -> OodRule | None:
    """``ood: {score: NAME, coverage: 0.95, thresholds: {NAME: value, …}}`` (written by ``avarc calibrate-ood``)."""
    if raw is None:
        return None
    example = "{score: ratio, coverage: 0.95, thresholds: {ratio: 1.2}}"
    if not isinstance(raw, dict) or not isinstance(raw.get("thresholds"), dict) or not raw["thresholds"]:
        raise _fail(source, f"ood: must be a mapping like {example}; fix the profile or fit it with "
                            "`avarc calibrate-ood`")
    bad = [k for k, v in raw["thresholds"].items() if not isinstance(k, str) or not _number(v)]
    coverage = raw.get("coverage")
    if bad or not _number(coverage) or not 0 < coverage <= 1 or raw.get("score") not in raw["thresholds"]:
        raise _fail(source, f"ood: needs a score that has a numeric threshold and a coverage in (0, 1], like "
                            f"{example}; fix the profile")
    return OodRule(str(raw["score"]), float(coverage), tuple((k, float(v)) for k, v in raw["thresholds"].items()))


def profile_yaml(profile: Profile, comment: str = "") -> str:
    """A profile as the YAML ``load_profile`` reads back to the same schedule; ``comment`` becomes ``#`` lines on
    top."""
    doc = {"name": profile.name, "description": profile.description, "sigma": profile.sigma}
    if profile.temperature is not None:
        doc["temperature"] = profile.temperature
    if profile.guard_margin is not None:
        doc["guard_margin"] = profile.guard_margin
    if profile.ood is not None:
        doc["ood"] = {"score": profile.ood.score, "coverage": profile.ood.coverage,
                      "thresholds": dict(profile.ood.thresholds)}
    head = "".join(f"# {line}\n".replace("# \n", "#\n") for line in comment.splitlines())
    body = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100)
    stages = "".join("  - {" + ", ".join(f"{k}: {v}" for k, v in _stage_fields(st)) + "}\n" for st in profile.stages)
    return head + body + "stages:\n" + stages


def _stage_fields(st: Stage) -> list[tuple[str, object]]:
    fields = [("scales", st.scales), ("samples", st.samples), ("keep", st.keep)]
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
