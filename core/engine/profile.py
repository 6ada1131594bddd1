"""A classification schedule ("profile"): which scales, how many smoothing samples and how many surviving candidates
each stage uses. Read from YAML by ``core.io.profiles``; here only what the engine needs to run one."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..errors import AvarcError

GUARD_NATS_PER_TOKEN = 1.5e-3   # default guard margin per scored token; see Profile.guard_margin
GUARD_NATS_PER_ROOT_TOKEN = 0.035   # … and per √token: rounding errors of a few tokens do not cancel
_ALL = re.compile(r"all(?:\s*-\s*(\d+))?")


@dataclass(frozen=True)
class Stage:
    """Score the surviving candidates on the first ``scales`` scales, averaging ``samples`` samples (1 clean +
    samples−1 noisy neighbours), keep the best ``keep``; an image whose best candidate leads the runner-up by at
    least ``exit_margin`` nats stops after this stage."""

    scales: int | str
    samples: int = 1
    keep: int = 1
    exit_margin: float | None = None

    def describe(self) -> str:
        text = f"scales {self.scales}, {self.samples} sample{'s' * (self.samples > 1)} → keep {self.keep}"
        return text + (f", exit if lead ≥ {self.exit_margin:g} nats" if self.exit_margin is not None else "")


@dataclass(frozen=True)
class OodRule:
    """Abstention, fitted by ``avarc calibrate-ood``: an image whose OOD ``score`` is below that score's threshold is
    answered "none of these"; each threshold accepts ``coverage`` of the in-distribution images it was fitted on."""

    score: str
    coverage: float
    thresholds: tuple[tuple[str, float], ...]

    def threshold(self, score: str) -> float | None:
        return dict(self.thresholds).get(score)


@dataclass(frozen=True)
class Profile:
    name: str
    stages: tuple[Stage, ...]
    sigma: float = 0.1
    description: str = ""
    source: str = ""      # the file it was read from (for error messages)
    temperature: float | None = None   # softmax temperature of the posterior (fitted by `avarc tune`)
    guard_margin: float | None = None
    """Precision guard: in bf16/fp16, an image whose best two final candidates are closer than this many nats has
    those two re-scored in fp32, so its prediction is fp32's; 0 turns it off. The default, ``GUARD_NATS_PER_TOKEN``
    × the tokens scored, sits above the largest bf16 − fp32 error of a score difference measured on the conformance
    models, with room to spare (README, Reduced precision and the precision guard)."""
    ood: OodRule | None = None         # abstention thresholds (fitted by `avarc calibrate-ood`)

    def margin(self, num_tokens: int) -> float:
        """The guard margin in nats for scores summed over ``num_tokens`` tokens: linear in the tokens (the error of
        long sums is systematic), but never under a √n term that covers short prefixes, where a handful of tokens'
        rounding does not average out (a first stage of two scales scores five tokens of the digits model)."""
        if self.guard_margin is not None:
            return self.guard_margin
        return max(GUARD_NATS_PER_TOKEN * num_tokens, GUARD_NATS_PER_ROOT_TOKEN * num_tokens ** 0.5)

    @property
    def max_samples(self) -> int:
        return max(s.samples for s in self.stages)

    def describe(self) -> str:
        return "; ".join(s.describe() for s in self.stages)

    def resolve(self, num_scales: int) -> Profile:
        """Numeric ``scales`` for a model with ``num_scales`` scales; an error if a stage asks for more."""
        stages = []
        for i, st in enumerate(self.stages, 1):
            s = _resolve_scales(st.scales, num_scales)
            if not 1 <= s <= num_scales:
                raise AvarcError(f"{self.source or self.name}: stage {i}: scales: {st.scales} does not fit a model "
                                 f"with {num_scales} scales; use a profile made for this model, or `all`")
            stages.append(replace(st, scales=s))
        return replace(self, stages=tuple(stages))


def _resolve_scales(scales: int | str, num_scales: int) -> int:
    if isinstance(scales, int):
        return scales
    m = _ALL.fullmatch(scales)
    assert m is not None, f"scales: {scales!r} passed the profile's check"
    return num_scales - int(m.group(1) or 0)


