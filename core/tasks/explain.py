"""Token-wise explanations: which image regions made the model prefer one class over another.

A VAR's likelihood factorises over tokens, so the log-likelihood ratio of two classes is a sum of per-token
terms. For an image and classes A, B (and the null class, the model's unconditional p(x)) we keep three
per-token differences — A vs null (the pointwise mutual information of A), B vs null, and A vs B — and draw each
on the finest token grid used: scale k's p_k×p_k map is upsampled to p×p nearest-neighbour and weighted by
(p_k/p)², so a token's weight is the share of the image it covers and, when p is a multiple of every p_k, a
map's pixel sum is exactly the log-likelihood ratio in nats.

With ``num_scales`` = S < all, the maps cover the first S scales: p is the S-th scale's size and the scores are
sums over those scales' tokens. A model with a single class explains A against the null class only: B is the
null class, its map is zero and the A-vs-B map equals the A-vs-null one.
"""
from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..engine.model import Model
from ..engine.profile import Profile
from ..engine.schedule import Scorer, run_stages, sample_tokens
from ..errors import AvarcError
from ..io.files import atomic_write, check_output_file
from .heatmap import render


@dataclass(frozen=True)
class Target:
    """What is fixed for one image: the class to explain (``cls``), the class to contrast it with (``vs``), the
    image's true ``label`` (whatever is None is chosen by the classifier), and the stage to explain on: a run's
    deciding stage for ``explain --from``, else every scale and the clean tokens."""

    cls: int | None = None
    vs: int | None = None
    label: int | None = None
    scales: int | None = None       # explain on the first ``scales`` scales (None: every scale, or the caller's)
    samples: int = 1                # mean over the clean tokens and samples − 1 smoothing neighbours, as a stage
    stage: int | None = None        # the run's stage (1-based) these scales and samples reproduce (``--from``)

    @property
    def needs_ranking(self) -> bool:
        return (self.cls is None and self.label is None) or self.vs is None


@dataclass
class Explanation:
    """One image's explanation of A against B (and both against the null class)."""

    classes: tuple[int, int]        # A, B (B may be the null class)
    scores: torch.Tensor            # 3 float64: log p(x|A), log p(x|B), log p(x|null) over the scales used
    per_scale: torch.Tensor         # 3, L' float32: per-token A−null, B−null, A−B, scales concatenated coarse → fine
    maps: torch.Tensor              # 3, p, p float32: per_scale drawn on the p×p grid (see the module docstring)
    patch_nums: tuple[int, ...]     # the scales used; p = patch_nums[-1]
    pred: int | None = None         # the schedule's prediction, when it ran
    label: int | None = None        # the image's true class, when known
    pixels: np.ndarray | None = None  # R, R, 3 uint8: the input as the model saw it (for drawing the panels)
    names: tuple[str, str] | None = None     # A's and B's display names (set by ``Classifier``)
    label_name: str | None = None
    pred_name: str | None = None
    path: str | None = None         # the file (or ``DATASET[split]#ROW``) it came from; None: given in memory
    samples: int = 1                # token samples averaged (1: the clean tokens; more: a stage's smoothing)
    stage: int | None = None        # the run's stage that decided A against B on these scales and samples

    @property
    def ratios(self) -> tuple[float, float, float]:
        """Log-likelihood ratios in nats: A vs null, B vs null, A vs B."""
        a, b, null = self.scores.tolist()
        return a - null, b - null, a - b

    def __repr__(self) -> str:
        a, b = self.names or self.classes
        r_a, r_b, r_ab = self.ratios
        return (f"Explanation({a!r} vs {b!r}: {r_ab:+.2f} nats; vs null {r_a:+.2f}, {r_b:+.2f}; "
                f"maps {self.maps.shape[-1]}×{self.maps.shape[-1]})")

    def to_pil(self, colormap: str = "turbo", alpha: float = 0.5, shared_scale: bool = False) -> Image.Image:
        """The four panels ``avarc explain`` writes: the input, A vs null, B vs null and the contrast, each with a
        colour bar in nats (``shared_scale``: one scale for the three maps)."""
        if self.pixels is None:
            raise AvarcError("this explanation has no input pixels to draw on; make it with Classifier.explain")
        names = self.names or (str(self.classes[0]), str(self.classes[1]))
        notes = ([f"true: {self.label_name}"] if self.label_name is not None else []) + \
            ([f"predicted: {self.pred_name}"] if self.pred_name is not None else [])
        return render(self.pixels, self, names, colormap, alpha, ", ".join(notes), shared_scale)

    def save(self, path: str | os.PathLike, colormap: str = "turbo", alpha: float = 0.5, shared_scale: bool = False,
             image: str | None = None, exclusive: bool = False) -> Path:
        """Write the panels to ``path`` (PNG) and the raw maps beside it (same stem, ``.npz``, with ``image``: the
        input's key, which ``avarc report`` links panels by). The ``.npz`` is kept only once its ``.png`` is written,
        so a failure (a full disk) leaves neither half; ``exclusive``: refused if either exists by then (another
        run writing the same names)."""
        path = Path(path)
        for target in (path, path.with_suffix(".npz")):     # an unwritable place: one line naming it, before work
            check_output_file(target, force=None)
        panel = self.to_pil(colormap, alpha, shared_scale)
        names = self.names or (str(self.classes[0]), str(self.classes[1]))
        made = False
        try:
            with atomic_write(path.with_suffix(".npz"), exclusive=exclusive, option="out") as f:
                # numpy's stub cannot tell these names from savez's allow_pickle keyword
                np.savez(f, **npz_arrays(self, names, image))  # type: ignore[arg-type]
                with atomic_write(path, exclusive=exclusive, option="out") as g:
                    panel.save(g, format="PNG")
                made = True
        except BaseException:
            if made:
                path.unlink(missing_ok=True)    # this call's panel: its .npz could not be written
            raise
        return path


def scale_maps(per_token: torch.Tensor, patch_nums: Sequence[int]) -> torch.Tensor:
    """…, L' per-token values (L' = Σ p_k²) → …, p, p: each scale upsampled nearest-neighbour (source index
    ⌊i·p_k/p⌋, exact integer arithmetic) and weighted by (p_k/p)²."""
    p = patch_nums[-1]
    if per_token.shape[-1] != sum(k * k for k in patch_nums):
        raise ValueError(f"{per_token.shape[-1]} tokens do not fill scales {tuple(patch_nums)}")
    out = per_token.new_zeros(*per_token.shape[:-1], p, p)
    start = 0
    for k in patch_nums:
        grid = per_token[..., start:start + k * k].unflatten(-1, (k, k))
        idx = torch.arange(p) * k // p
        out += (k / p) ** 2 * grid[..., idx, :][..., idx]
        start += k * k
    return out


def explain_logp(logp: torch.Tensor, classes: tuple[int, int], patch_nums: Sequence[int],
                 pred: int | None = None, label: int | None = None) -> Explanation:
    """3, L' per-token log-probs of A, B and the null class (or samples, 3, L': their mean is explained, so each
    map's sum is a stage's score difference) → the explanation."""
    samples = logp.shape[0] if logp.ndim == 3 else 1
    scores = logp.double().mean(0).sum(-1) if logp.ndim == 3 else logp.double().sum(-1)
    logp = logp.double().mean(0).float() if logp.ndim == 3 else logp.float()
    diffs = torch.stack([logp[0] - logp[2], logp[1] - logp[2], logp[0] - logp[1]])
    return Explanation(classes=(int(classes[0]), int(classes[1])), scores=scores, per_scale=diffs,
                       maps=scale_maps(diffs, patch_nums), patch_nums=tuple(patch_nums), pred=pred, label=label,
                       samples=samples)


def check_scales(model: Model, num_scales: int | None) -> int:
    n = len(model.spec.var.patch_nums)
    if num_scales is None:
        return n
    if not 1 <= num_scales <= n:
        raise AvarcError(f"{num_scales} scales asked for, but this model has {n}; use 1…{n}", option="scales")
    return num_scales


@torch.no_grad()
def explain_tokens(model: Model, tokens: torch.Tensor, pairs: Sequence[tuple[int, int]],
                   num_scales: int | Sequence[int | None] | None = None, chunk: int | None = None,
                   preds: Sequence[int | None] | None = None, labels: Sequence[int | None] | None = None,
                   samples: Sequence[int] | None = None) -> list[Explanation]:
    """N, L clean tokens (or N, S, L sample tokens, sample 0 clean) and one (A, B) pair per image → explanations on
    the first ``num_scales`` scales (one count for all, or one per image), each the mean over its first
    ``samples`` samples (default 1: the clean tokens)."""
    N = tokens.shape[0]
    tokens = tokens if tokens.ndim == 3 else tokens.unsqueeze(1)                # N, S, L
    if len(pairs) != N:
        raise ValueError(f"{N} token sequences but {len(pairs)} class pairs")
    if N == 0:
        return []
    scales = [check_scales(model, s) for s in (num_scales if isinstance(num_scales, Sequence) else [num_scales] * N)]
    samples = list(samples) if samples is not None else [1] * N
    if max(samples) > tokens.shape[1]:
        raise ValueError(f"{max(samples)} samples asked for, {tokens.shape[1]} given")
    null = model.null_class
    scored = list(dict.fromkeys((i, j, c) for i, (a, b) in enumerate(pairs) for j in range(samples[i])
                                for c in (a, b, null)))                      # B = null: once
    bad = [c for *_, c in scored if not 0 <= c <= null]
    if bad:
        raise AvarcError(f"class {bad[0]} is out of range; this model has classes 0…{model.num_classes - 1}")
    flat = model.pair_logp(tokens[[i for i, _, _ in scored], [j for _, j, _ in scored]],
                           torch.tensor([c for *_, c in scored]), max(scales), chunk)
    at = {key: k for k, key in enumerate(scored)}
    ends = model.spec.var.scale_ends()
    preds = preds if preds is not None else [None] * N
    labels = labels if labels is not None else [None] * N
    out = []
    for i, (a, b) in enumerate(pairs):
        logp = torch.stack([flat[[at[i, j, a], at[i, j, b], at[i, j, null]], :ends[scales[i] - 1]]
                            for j in range(samples[i])])                     # samples, 3, L'
        out.append(explain_logp(logp if samples[i] > 1 else logp[0], (a, b), model.spec.var.patch_nums[:scales[i]],
                                preds[i], labels[i]))
    return out


def choose_pair(target: Target, ranking: Sequence[int] | None, null_class: int) -> tuple[int, int]:
    """(A, B): A = ``cls``, else the true label, else the best class (the best one other than ``vs`` if that is
    fixed); B = ``vs``, else the best-ranked class other than A (the runner-up, or the best wrong class when A is
    the label), else the null class when the model has no other class."""
    def best_except(c: int | None) -> int:
        if ranking is None:
            raise ValueError("a class ranking is needed to choose the pair")
        return next((r for r in ranking if r != c), null_class)

    a = target.cls if target.cls is not None else target.label if target.label is not None else best_except(target.vs)
    b = target.vs if target.vs is not None else best_except(a)
    if a == null_class:
        raise AvarcError("the null class cannot be the explained class (A); name a real class", option="a")
    if a == b:
        raise AvarcError(f"the explained class and the contrast class are the same class ({a}); pick two different "
                         "classes", option="b")
    return a, b


@torch.no_grad()
def explain_images(model: Model, images: torch.Tensor, targets: Sequence[Target], profile: Profile,
                   seed: int = 0, num_scales: int | None = None,
                   chunk: int | None = None) -> list[Explanation | AvarcError]:
    """B, 3, R, R preprocessed images → one explanation each, on its target's scales and samples (``num_scales``:
    the caller's count for all). Classes the user left open are chosen with the profile's schedule over every class;
    sample tokens are drawn with noise seeded by ``seed`` and each image's content, as in classification, so a target
    with a stage's scales and samples sees that stage's tokens. An image whose pair cannot be formed (e.g. its label
    is the ``vs`` class) gets the error instead, so it never stops a batch."""
    if len(targets) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(targets)} targets")
    ranked = [i for i, t in enumerate(targets) if t.needs_ranking]
    need = max(t.samples for t in targets)
    draws = profile.max_samples if ranked or need > 1 else 1
    if need > draws:
        raise AvarcError(f"a stage of {need} samples cannot be explained with profile {profile.name}, which draws "
                         f"{draws}; pass the run's profile")
    latents = model.encode(images)
    tokens = sample_tokens(model, latents, draws, profile.sigma, seed)         # B, draws, L
    rankings: dict[int, list[int]] = {}
    preds: list[int | None] = [None] * len(targets)
    if ranked:
        results = run_stages(model, tokens[ranked], range(model.num_classes), profile, Scorer(model, chunk))
        for i, p in zip(ranked, results):
            rankings[i], preds[i] = [c for c, _ in p.ranking], p.pred
    pairs: dict[int, tuple[int, int]] = {}
    out: dict[int, Explanation | AvarcError] = {}
    for i, t in enumerate(targets):
        try:
            pairs[i] = choose_pair(t, rankings.get(i), model.null_class)
        except AvarcError as e:
            out[i] = e
    done = list(pairs)
    scales = [num_scales or targets[i].scales for i in done]
    made = explain_tokens(model, tokens[done], [pairs[i] for i in done], scales, chunk, [preds[i] for i in done],
                          [targets[i].label for i in done], [targets[i].samples for i in done])
    for i, s, ex in zip(done, scales, made):
        ex.stage = targets[i].stage if s == targets[i].scales else None    # another count is not the run's stage
    out.update(zip(done, made))
    return [out[i] for i in range(len(targets))]


def npz_arrays(expl: Explanation, names: tuple[str, str], image: str | None = None) -> dict[str, np.ndarray]:
    """``maps`` (3, p, p), ``classes`` [A, B], ``scores`` (3), ``per_scale`` (3, L'), ``samples`` (averaged), ``names``,
    ``patch_nums`` and ``image`` (the input's resolved path, which ``avarc report`` finds the panel by) so the file
    reads on its own (plain arrays: ``np.load`` needs no pickle)."""
    return dict(maps=expl.maps.numpy().astype(np.float32), classes=np.array(expl.classes, dtype=np.int64),
                samples=np.array(expl.samples, dtype=np.int64),
                scores=expl.scores.numpy().astype(np.float64), per_scale=expl.per_scale.numpy().astype(np.float32),
                names=np.array(names, dtype=str), patch_nums=np.array(expl.patch_nums, dtype=np.int64),
                **({} if image is None else {"image": np.array(image, dtype=str)}))


def explained_panels(folder: str | os.PathLike) -> dict[str, Path]:
    """The panels an ``avarc explain --out FOLDER`` wrote, by input image key (the ``image`` its ``.npz`` holds):
    how a report links a record to its explanation whatever stem explain gave it (``x-2.png`` for a second
    ``x.png``). Unreadable or older files (no ``image``) are passed over."""
    found: dict[str, Path] = {}
    for npz in sorted(Path(folder).glob("*.npz")):
        png = npz.with_suffix(".png")
        if not npz.is_file():           # a FIFO of that name would block the read for ever
            continue
        try:
            with np.load(npz, allow_pickle=False) as z:
                key = str(z["image"]) if "image" in z.files else None
        except Exception:  # noqa: BLE001 — a damaged file among the panels only loses its own link
            continue
        if key is not None and png.is_file():
            found.setdefault(key, png)
    return found


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_stem(name: str, limit: int = 100) -> str:
    """A file-name stem that is safe on every file system: accents folded to ASCII, anything else outside
    ``A-Za-z0-9._-`` (slashes, spaces, other scripts) replaced by ``_``, no leading dot, at most ``limit`` chars."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    stem = _UNSAFE.sub("_", ascii_name).lstrip(".")[:limit].strip("_")
    return stem or "image"


def unique_stems(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Output stems named after the images' stems; a repeated stem gets ``-2``, ``-3``, … (compared ignoring case,
    for case-insensitive file systems)."""
    seen: set[str] = set()
    out = []
    for p in paths:
        base = safe_stem(Path(p).stem)
        stem, n = base, 1
        while stem.lower() in seen:
            n += 1
            stem = f"{base}-{n}"
        seen.add(stem.lower())
        out.append(stem)
    return out
