"""``Classifier``: the one door. Every construction decision (weights, extensions, profile, device, dtype,
preprocessing, encoder backend) is made once in :meth:`Classifier.from_pretrained`; ``classify``, ``explain`` and
``add_classes`` then take raw images and return plain results. Every ``avarc`` command goes through it.

    clf = Classifier.from_pretrained("digits")         # a registry model is downloaded on first use
    pred = clf.classify("a.png")                       # one path, PIL image, numpy array or tensor → one result
    preds = clf.classify(["a.png", "b.png", "dir/"])   # a list (folders, datasets expand to their images) → a list
    print(pred.top[0].name, pred.top[0].p, pred.path, pred.to_dict())

Smoothing noise is seeded per image from ``seed`` and the image's own content (its clean tokens), so the same
pixels get the same result however they are passed, and whatever batch, order or shard they are in.
"""
from __future__ import annotations

import functools
import numbers
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Concatenate, Iterator, Mapping, ParamSpec, Sequence, TypeVar, cast

import numpy as np
import torch
from PIL import Image

from .engine.encode_ahead import EncodeAhead, Encoding
from .engine.flops import image_gflops
from .engine.graphs import ForwardGraphs
from .engine.likelihood import memory_budget, pairs_per_chunk
from .engine.model import Model
from .engine.profile import Profile
from .engine.runtime import DTYPES, resolve_compile, resolve_device, resolve_dtype, resolve_threads
from .engine.sampling import Sampling, decode, generate_tokens
from .engine.schedule import classify as run_schedule
from .engine.schedule import noise_generator
from .engine.scoring import Scorer
from .engine.stages import Prediction, Skipped
from .engine.torch_state import torch_settings
from .errors import FIX, AvarcError, NeedsDownload
from .io import distributed
from .io.data import ClassSpace, Item
from .io.files import absolute
from .io.hub import find_local
from .io.image_inputs import Entry, ImageInput, Images, Label, gather, labels_for
from .io.loading import finish, resolve_model
from .io.preprocess import open_image, pixels_to_tensor, preprocess_pil, tensor_pixels
from .io.profiles import default_profile_name, load_profile
from .io.records import (
    Record,
    RunIdentity,
    model_identity,
    ok_record,
    run_identity,
    skipped_record,
    text,
    weights_identity,
)
from .io.registry import entry, fetch, is_registry_name, with_vaes
from .models.specs import ModelSpec
from .tasks.counterfactual import Counterfactual, check_keep_scales
from .tasks.explain import Explanation, Target, check_scales, explain_images, explain_tokens
from .tasks.incremental import Extension, add_classes, apply_extension, load_extension, read_class_folders
from .tasks.ood import DEFAULT_OOD_SCORE, check_score, decide, ood_scores
from .tasks.samples import Samples

IMAGES_PER_STEP = 16


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _in_settings(method: Callable[Concatenate[Classifier, _P], _R]) -> Callable[Concatenate[Classifier, _P], _R]:
    """A public method run in :meth:`Classifier.settings`: on the classifier's threads, torch's state put back. Its
    ``seed``, which every noise key takes, is checked at the door (a string would seed the noise silently)."""
    @functools.wraps(method)
    def run(self: Classifier, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        seed = kwargs.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):      # numpy's integers too
            raise AvarcError(f"must be a whole number, got {seed!r}", option="seed")
        with self.settings():
            return method(self, *args, **kwargs)
    return run


@dataclass
class Classifier:
    """A loaded model with its extensions applied and its schedule resolved. Build it with :meth:`from_pretrained`."""

    model: Model
    profile: Profile                        # resolved for this model's scales
    source: str = ""                        # the model argument it was built from (registry name, folder or file)
    batch_size: int | None = None           # (sequence, class) pairs per forward; None: sized to a memory budget
    files: list[Path] = field(default_factory=list)     # the files it was loaded from (weights, metadata, extensions)
    threads: int = 1                        # CPU threads each call runs on (torch's count is put back after it)
    build: dict = field(default_factory=dict)   # the VQ-VAE and extension files as given, resolved (records keep it)
    _space: ClassSpace | None = field(default=None, init=False, repr=False)

    @classmethod
    @torch_settings()       # loading may set torch's state (a compile, a oneDNN probe, random weights): put it back
    def from_pretrained(cls, model: str | os.PathLike | Model = "digits", *, vae: str | os.PathLike | None = None,
                        extensions: Sequence[str | os.PathLike | Extension] = (),
                        profile: str | os.PathLike | Profile | None = None,
                        device: str | torch.device = "auto", dtype: str | torch.dtype = "auto", encoder: str = "torch",
                        model_dir: str | os.PathLike | None = None, trust_pickle: bool = False,
                        patch_nums: Sequence[int] | None = None, batch_size: int | None = None,
                        threads: int | None = None, compile: bool | None = None,  # noqa: A002 (torch's word)
                        cuda_graphs: bool = False, local_files_only: bool = False) -> Classifier:
        """``model``: a registry name (``digits``, ``d16``, ``d20-cca`` …), a model directory or a VAR checkpoint
        file (``vae``: its VQ-VAE; ``patch_nums``: its scales when they cannot be read off the file).
        ``extensions``: files from ``add_classes(...).save`` (or the objects), applied in order. ``profile``: a
        shipped name, a YAML file or a Profile (default: the model's own). ``dtype``: ``auto``, ``fp32``, ``bf16``,
        ``fp16`` or a torch dtype (a :class:`Model` passed built keeps its own). ``threads``: CPU threads of every call
        (default: the usable cores, one for a tiny model; see :func:`core.engine.runtime.resolve_threads`); the
        process's own torch settings are put back after each call.
        ``compile``: fuse the engine with torch.compile (default: on CUDA with Triton). ``cuda_graphs``: replay the
        engine's small forwards as CUDA graphs (CUDA only; :mod:`core.engine.graphs`). A registry model not on this
        machine is downloaded (as ``avarc download`` does) unless ``local_files_only``."""
        extensions = _check_arguments(model, extensions, batch_size, dtype)
        chosen = profile if isinstance(profile, Profile) or profile is None else load_profile(profile)
        dev = resolve_device(device)
        if cuda_graphs and dev.type != "cuda":
            raise AvarcError(f"CUDA graphs need a CUDA device and this run is on {dev.type}; leave the option out "
                             "(nothing else would change)", option="cuda_graphs")
        dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(str(dtype), dev)
        if isinstance(model, Model):       # built by hand (bench's random weights): only the run-time choices apply
            m = finish(model, encoder, None, resolve_compile(compile, dev))
            model = "python"
        else:
            if not local_files_only:
                _download_missing([n for n in (model, vae) if n is not None and is_registry_name(n)], model_dir)
            m = resolve_model(model, vae, dev, dt, model_dir, trust_pickle, encoder,
                              tuple(patch_nums) if patch_nums else None, resolve_compile(compile, dev))
        m.graphs = ForwardGraphs() if cuda_graphs else None
        for ext in extensions:
            apply_extension(m, ext if isinstance(ext, Extension) else load_extension(ext),
                            "extension" if isinstance(ext, Extension) else str(ext))
        if chosen is None:
            default = entry(str(model)).default_profile if is_registry_name(model) else None
            chosen = load_profile(default or default_profile_name(m))
        files = [f for f in (m.var_file, m.vae_file, m.var_file and m.var_file.with_name("meta.json")) if f is not None]
        files += [Path(e) for e in extensions if not isinstance(e, Extension)]
        build = {"vae_file": None if vae is None else str(vae) if is_registry_name(vae) else text(absolute(vae)),
                 "extension_files": [text(absolute(e)) for e in extensions if not isinstance(e, Extension)]}
        return cls(m, chosen.resolve(len(m.spec.var.patch_nums)), str(model), batch_size, files,
                   resolve_threads(m.spec.var, threads), build)

    def settings(self) -> AbstractContextManager[None]:
        """A block that runs on this classifier's threads and leaves torch's settings as it found them (every
        public call runs in one; so can a caller driving :attr:`model` directly, as ``bench`` does)."""
        return torch_settings(self.threads)

    def __repr__(self) -> str:
        return (f"Classifier({self.source!r}: {self.model.num_classes} classes, {self.spec.image_size}px, profile "
                f"{self.profile.name!r} ({len(self.profile.stages)} stages), {self.device} {str(self.dtype)[6:]}"
                f"{f', {len(self.extensions)} extensions' if self.extensions else ''})")

    # what a user reaches for
    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    @property
    def extensions(self) -> list[Extension]:
        """The extensions applied (given, or learnt by :meth:`add_classes`), bottom first."""
        return self.model.extensions

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def space(self) -> ClassSpace:
        """Every way to name a class of this model (index, name, synset); rebuilt when classes are added."""
        if self._space is None or self._space.num_classes != self.model.num_classes:
            self._space = ClassSpace(self.model)
        return self._space

    @property
    def class_names(self) -> list[str]:
        return self.space.names

    def class_id(self, name: int | str, where: str = "class", allow_null: bool = False) -> int:
        """A class named by index, name or synset (``null``: the unconditional model, where allowed)."""
        if isinstance(name, int) and not isinstance(name, bool):
            if not 0 <= name < self.model.num_classes:
                raise AvarcError(f"{where}: class index {name} is out of range; this model has classes "
                                 f"0…{self.model.num_classes - 1}")
            return name
        name = str(name)    # not an index: a name (a bool is no index either)
        if allow_null and name.strip().lower() == "null":
            try:
                return self.space.parse(name, where)     # a model may have a class named "null"
            except AvarcError:
                return self.model.null_class
        return self.space.parse(name, where)

    def prepare(self, image: str | os.PathLike | Image.Image) -> np.ndarray:
        """An image file or PIL image → the uint8 R×R×3 pixels the model sees."""
        img = image if isinstance(image, Image.Image) else open_image(image)
        return preprocess_pil(img, self.spec.image_size, self.spec.preprocess)

    def preprocess(self, image: str | os.PathLike | Image.Image) -> torch.Tensor:
        """An image file or PIL image → the float32 3×R×R tensor in [-1, 1] the model takes (the public transform:
        stack these to pass a batch)."""
        return pixels_to_tensor(self.prepare(image))

    def _entries(self, images: Images) -> tuple[list[Entry], bool]:
        """Every form a caller passes → (one checked entry per image, whether one image was passed); folders and
        datasets expand to their images (with their paths and class-folder labels), a 4-D tensor or array to its
        rows."""
        return gather(images, self.space, self.spec.image_size)

    def _pixels(self, e: Entry) -> torch.Tensor | str:
        """An entry's model input (3×R×R in [-1, 1]), or why its file or row cannot be read."""
        if isinstance(e.image, torch.Tensor):
            return e.image
        if e.item is not None:
            px = self.load(e.item)
        else:
            assert e.image is not None      # an entry holds a file or dataset row, or an image
            px = preprocess_pil(e.image, self.spec.image_size, self.spec.preprocess)
        return px if isinstance(px, str) else pixels_to_tensor(px)

    def _steps(self, entries: Sequence[Entry], single: bool,
               out: list) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Entries in steps of IMAGES_PER_STEP → (indices of the readable ones, their stacked pixels); the others
        are set in ``out`` as :class:`Skipped` results. One image passed alone that cannot be read is its one-line
        error instead."""
        for i in range(0, len(entries), IMAGES_PER_STEP):
            read = {j: self._pixels(entries[j]) for j in range(i, min(i + IMAGES_PER_STEP, len(entries)))}
            for j, px in read.items():
                if isinstance(px, str):
                    if single:
                        raise AvarcError(px)
                    out[j] = Skipped(entries[j].path or f"#{j}", px, entries[j].label)
            good = {j: px for j, px in read.items() if not isinstance(px, str)}
            if good:
                yield list(good), torch.stack(list(good.values()))

    # classify
    @_in_settings
    def predict(self, x: torch.Tensor, candidates: Sequence[int], seed: int = 0,
                temperature: float | None = None, ood_score: str | None = None) -> list[Prediction]:
        """B, 3, R, R preprocessed images → predictions (smoothing noise seeded by ``seed`` and each image's
        content), each with its OOD scores and abstained where the profile's OOD rule says so. ``temperature`` None:
        the profile's (fitted by ``avarc tune``), else 1. ``ood_score``: the score that decides (default: the
        rule's)."""
        return self._predict(self.model.encode(x), candidates, seed, temperature, ood_score)

    def _predict(self, latents: torch.Tensor, candidates: Sequence[int], seed: int, temperature: float | None,
                 ood_score: str | None) -> list[Prediction]:
        """:meth:`predict` on encoder latents (the batch loop encodes each step while the one before is scored)."""
        temperature = temperature if temperature is not None else self.profile.temperature or 1.0
        scorer = Scorer(self.model, self.batch_size)
        preds = run_schedule(self.model, latents, candidates, self.profile, seed, scorer, temperature)
        rule = self.profile.ood
        score = check_score(ood_score or (rule.score if rule else DEFAULT_OOD_SCORE))
        names = self.class_names
        oods = ood_scores(self.model, latents, preds, self.profile, self.batch_size)
        return [replace(p, pred_name=names[p.pred], class_names=names, ood=o, abstained=decide(o, score, rule),
                        gflops=image_gflops(self.spec, p.stages, scorer.executed(i)))
                for i, (p, o) in enumerate(zip(preds, oods))]

    @_in_settings
    def classify(self, images: Images, *, labels: Sequence[Label] | Label = None,
                 candidates: Sequence[int | str] | None = None, seed: int = 0, temperature: float | None = None,
                 ood_score: str | None = None) -> Prediction | list[Prediction | Skipped]:
        """Classify a path, PIL image, numpy array (H×W×3 uint8 or 3×R×R float) or 3×R×R tensor in [-1, 1] (one
        result), or a list of these, a folder, a dataset or an N×3×R×R tensor (a list of results, each with its
        ``path`` and its class folder's ``label``; an unreadable file is a :class:`Skipped` result). ``labels``
        (true classes, one per image) fill ``Prediction.label``; ``candidates`` restricts the classes (default:
        all); ``ood_score`` picks the OOD score that decides abstention."""
        entries, single = self._entries(images)
        cands = self._candidates(candidates)
        ids = labels_for(labels, entries, single, lambda y: self.class_id(y, "label"))
        out: list = [None] * len(entries)
        for good, x in self._steps(entries, single, out):
            for j, p in zip(good, self.predict(x, cands, seed, temperature, ood_score)):
                out[j] = replace(p, label=ids[j], path=entries[j].path)
        return out[0] if single else out

    def _candidates(self, candidates: Sequence[int | str] | None) -> list[int]:
        if candidates is None:
            return list(range(self.model.num_classes))
        return [self.class_id(c, "candidate") for c in candidates]

    def run_key(self, seed: int, candidates: Sequence[int], **settings) -> RunIdentity:
        """The ``run`` key of this classifier's records: what decides every score. The model's part (both weight
        files by content, dtype, compile, extensions) is filled in here; ``settings`` add the run's (temperature,
        top-k, labels mode, OOD score, inputs; see :class:`~core.io.records.RunIdentity`)."""
        m = self.model
        return run_identity(model_identity(m, self.source), self.profile, seed, candidates,
                            weights=weights_identity(m.var_file), vae_weights=weights_identity(m.vae_file),
                            dtype=str(self.dtype).removeprefix("torch."), compile=m.compile,
                            extensions=[e.sha256 for e in self.extensions], build=self.build, **settings)

    def classify_items(self, items: Sequence[Item], candidates: Sequence[int], seed: int = 0,
                       temperature: float | None = None,
                       topk: int = 5, run_key: RunIdentity | None = None, dist: distributed.Dist = distributed.Dist(),
                       per_step: int | None = None, ood_score: str | None = None) -> Iterator[list[Record]]:
        """Items → batches of result records (unreadable images become skipped records), in input order."""
        names = self.class_names
        run = run_key or self.run_key(seed, candidates)

        encoder = EncodeAhead(self.model)
        Started = tuple[list[np.ndarray | str], Encoding | None]

        def ahead(pixels: list[np.ndarray | str]) -> Started:
            good = [pixels_to_tensor(px) for px in pixels if not isinstance(px, str)]
            with self.settings():
                return pixels, encoder.start(torch.stack(good)) if good else None

        def step(batch: list[Item], started: Started) -> list[Record]:
            pixels, encoding = started
            with self.settings():
                preds = iter(self._predict(encoder.finish(encoding), candidates, seed, temperature, ood_score)
                             if encoding is not None else ())
            return [skipped_record(it, px, names, run) if isinstance(px, str)
                    else ok_record(it, next(preds), names, run, topk)
                    for it, px in zip(batch, pixels)]

        per_step = per_step or distributed.images_per_step(self.batch_size, len(candidates), self._pairs_per_forward())
        return distributed.run(items, self.load, step, dist, per_step, ahead)

    def _pairs_per_forward(self) -> int | None:
        """On a GPU, the (sequence, class) pairs its memory budget fits in one forward of the first stage (how many
        images a step takes); None elsewhere."""
        m = self.model
        if m.device.type != "cuda":
            return None
        n_tok = m.spec.var.scale_ends()[int(self.profile.stages[0].scales) - 1]
        return pairs_per_chunk(m.spec.var, n_tok, m.budget_bytes or memory_budget(m.device), m.dtype.itemsize)

    def load(self, item: Item) -> np.ndarray | str:
        """An item's model-input pixels, or why it cannot be read (every batch loop's loader)."""
        return item.pixels(self.spec.image_size, self.spec.preprocess)

    # explain
    @_in_settings
    def explain(self, images: Images, *, a: int | str | None = None, b: int | str | None = None,
                labels: Sequence[Label] | Label = None, scales: int | None = None,
                seed: int = 0) -> Explanation | list[Explanation | Skipped]:
        """Token-wise log-likelihood-ratio maps of class ``a`` against ``b`` (``"null"``: the unconditional model),
        for the same inputs as :meth:`classify` (one input → one explanation, a list → a list, each with its
        ``path``; an unreadable file is a :class:`Skipped` result). Left open, A is the true label (from ``labels``
        or its class folder) or the prediction and B the best other class. ``.save(path)`` or ``.to_pil()`` draws
        one."""
        entries, single = self._entries(images)
        target = self.target(a, b)
        ids = labels_for(labels, entries, single, lambda y: self.class_id(y, "label"))
        out: list = [None] * len(entries)
        for good, x in self._steps(entries, single, out):
            for j, ex, px in zip(good, self.explain_tensors(x, [replace(target, label=ids[j]) for j in good], scales,
                                                            seed), x):
                if isinstance(ex, AvarcError):
                    raise ex
                out[j] = self._named(ex, tensor_pixels(px))
                out[j].path = entries[j].path
        return out[0] if single else out

    def _named(self, ex: Explanation, pixels: np.ndarray) -> Explanation:
        """An explanation with its input pixels and the display names its panels are captioned with."""
        names = [n.replace("_", " ") if self.space.imagenet else n for n in self.class_names] + ["null"]
        ex.pixels, ex.names = pixels, (names[ex.classes[0]], names[ex.classes[1]])
        ex.label_name = None if ex.label is None else names[ex.label]
        ex.pred_name = None if ex.pred is None else names[ex.pred]
        return ex

    def target(self, a: int | str | None = None, b: int | str | None = None, label: int | str | None = None,
               where: tuple[str, str, str] = ("class A", "class B", "label")) -> Target:
        """What is fixed for every image; ``where`` names the three in messages."""
        t = Target(cls=None if a is None else self.class_id(a, where[0]),
                   vs=None if b is None else self.class_id(b, where[1], allow_null=True),
                   label=None if label is None else self.class_id(label, where[2]))
        if t.cls is not None and t.cls == t.vs:
            raise AvarcError(f"{where[0]} and {where[1]} are the same class ({t.cls}); pick two different classes")
        return t

    @_in_settings
    def explain_tensors(self, x: torch.Tensor, targets: Sequence[Target], scales: int | None = None,
                        seed: int = 0) -> list[Explanation | AvarcError]:
        """B, 3, R, R preprocessed images → an explanation each (or why its class pair cannot be formed)."""
        check_scales(self.model, scales)
        return explain_images(self.model, x, targets, self.profile, seed, scales, self.batch_size)

    def explain_items(self, items: Sequence[Item], target: Target | Mapping[str, Target], scales: int | None = None,
                      seed: int = 0, per_step: int = IMAGES_PER_STEP) -> Iterator[list[tuple[Item, Explanation | str]]]:
        """Items → batches of (item, explanation with its pixels, or the reason it was skipped), in input order.
        ``target``: one for every item, or one per item's path."""
        check_scales(self.model, scales)     # before the first batch: a bad value is an error, not a skip per image

        def step(batch: list[Item], pixels: list[np.ndarray | str]) -> list[tuple[Item, Explanation | str]]:
            good = [(it, px) for it, px in zip(batch, pixels) if not isinstance(px, str)]
            fixed = [target[it.path] if isinstance(target, Mapping) else target for it, _ in good]
            targets = [t if t.label is not None else replace(t, label=it.label) for t, (it, _) in zip(fixed, good)]
            done = iter(self.explain_tensors(torch.stack([pixels_to_tensor(px) for _, px in good]), targets, scales,
                                             seed) if good else ())
            out: list[tuple[Item, Explanation | str]] = []
            for it, px in zip(batch, pixels):
                if isinstance(px, str):
                    out.append((it, px))
                    continue
                ex = next(done)
                out.append((it, f"{it.path}: {ex}" if isinstance(ex, AvarcError) else self._named(ex, px)))
            return out

        return distributed.run(items, self.load, step, per_step=per_step)

    # generate
    @_in_settings
    def generate(self, classes: Sequence[int | str], n: int = 1, *, seed: int = 0, cfg: float = 1.5, top_k: int = 0,
                 top_p: float = 0.0, on_scale: Callable[[int, int], None] | None = None) -> Samples:
        """Draw ``n`` samples of each class (index or name; added classes too), class-major in the order given, as
        one batch on one generator seeded with ``seed``: the token ids equal upstream VAR's
        ``autoregressive_infer_cfg(B, labels, seed, cfg, top_k, top_p)`` (guidance ``cfg`` rising linearly over the
        scales; 0 turns top-k / top-p off) when the classifier computes in fp32 (``dtype="fp32"``; bf16 draws from
        nearly the same distributions, not the same ids). ``.save(folder)`` writes the PNGs, a contact sheet and
        the tokens."""
        if n < 1:
            raise AvarcError(f"n {n}: ask for at least one sample per class")
        ids = [self.class_id(c, "class") for c in classes]
        if not ids:
            raise AvarcError("no classes given; name at least one class (index or name) to generate")
        sampling = Sampling(seed, cfg, top_k, top_p).check(self.spec.var.vocab_size)
        labels = torch.tensor(ids, dtype=torch.long).repeat_interleave(n)
        tokens = self.generate_tokens(labels, sampling, on_scale=on_scale)
        names = self.class_names
        return Samples(labels, tokens, decode(self.model.vae, tokens.to(self.device)).cpu(),
                       [names[y] for y in labels.tolist()])

    def classify_samples(self, samples: Samples, seed: int = 0) -> list[Prediction]:
        """Classify samples as their PNGs hold them (uint8 pixels; ``--check``)."""
        x = torch.stack([pixels_to_tensor(px) for px in samples.pixels])
        return cast("list[Prediction]", self.classify(x, seed=seed))    # a batch tensor: a list, no row skipped

    def generate_tokens(self, labels: torch.Tensor, sampling: Sampling, prefix: torch.Tensor | None = None,
                        on_scale: Callable[[int, int], None] | None = None,
                        generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Class ids (B,) → B, L token ids (CPU) drawn by the engine's VAR (``prefix``: the first scales given;
        ``generators``: one per row instead of one seeded by ``sampling.seed``)."""
        m = self.model
        return generate_tokens(m.engine_var(), m.vae.quantize, labels.to(self.device), sampling,
                               None if prefix is None else prefix.to(self.device), self.batch_size, on_scale,
                               generators).cpu()

    # counterfactuals
    @_in_settings
    def counterfactual(self, images: Images, target: int | str, *, keep_scales: int = 1, seed: int = 0,
                       cfg: float = 1.5, top_k: int = 0,
                       top_p: float = 0.0) -> Counterfactual | list[Counterfactual | Skipped]:
        """Each image as class ``target``: its own first ``keep_scales`` scales kept, the rest drawn under its
        predicted class and under ``target`` from the same seed (sampling settings as :meth:`generate`), both
        decoded, the counterfactual classified and its tokens explained (target vs predicted). Inputs as for
        :meth:`classify`; ``.save(folder, stem)`` writes the counterfactual and its panel."""
        entries, single = self._entries(images)
        t = self.class_id(target, "counterfactual class")
        sampling = Sampling(seed, cfg, top_k, top_p).check(self.spec.var.vocab_size)
        out: list = [None] * len(entries)
        for good, x in self._steps(entries, single, out):
            for j, c in zip(good, self.counterfactual_tensors(x, [t] * x.shape[0], keep_scales, sampling)):
                out[j] = c
        return out[0] if single else out

    def counterfactual_tensors(self, x: torch.Tensor, targets: Sequence[int], keep_scales: int,
                               sampling: Sampling) -> list[Counterfactual]:
        """B, 3, R, R preprocessed images and a target class each → their counterfactuals (see
        :meth:`counterfactual`); the smoothing noise and each image's draws are seeded by ``sampling.seed`` and the
        image's own content, as in classify, so a counterfactual does not depend on the batch it is drawn in."""
        check_keep_scales(keep_scales, len(self.spec.var.patch_nums))
        cands = list(range(self.model.num_classes))
        preds = [p.pred for p in self.predict(x, cands, sampling.seed)]
        tokens = self.model.tokenize(x).cpu()
        prefix = tokens[:, :self.spec.var.scale_ends()[keep_scales - 1]] if keep_scales else None
        as_pred, as_target = (self.generate_tokens(torch.tensor(list(ids)), sampling, prefix,
                                                   generators=[noise_generator(sampling.seed, row) for row in tokens])
                              for ids in (preds, targets))    # the same draws for both: they differ by class alone
        B = x.shape[0]
        drawn = decode(self.model.vae, torch.cat((tokens, as_pred, as_target)).to(self.device)).cpu()
        px = drawn.mul(255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        judged = self.predict(torch.stack([pixels_to_tensor(p) for p in px[2 * B:]]), cands, sampling.seed)
        exps = explain_tokens(self.model, as_target, list(zip(targets, preds)), chunk=self.batch_size)
        names = self.class_names
        return [Counterfactual(tensor_pixels(x[i]), px[i], px[B + i], px[2 * B + i], preds[i], targets[i],
                               keep_scales, exps[i], judged[i].pred, dict(judged[i].posterior).get(targets[i], 0.0),
                               (names[preds[i]], names[targets[i]]), names[judged[i].pred]) for i in range(B)]

    # add classes
    @_in_settings
    def add_classes(self, classes: Mapping[str, str | os.PathLike | Sequence[ImageInput] | torch.Tensor], *,
                    steps: int = 600, lr: float = 0.1, batch_size: int = 32, augment_sigma: float = 0.0,
                    init: str = "null", seed: int = 0, holdout: float = 0.2, on_step=None) -> Extension:
        """Learn new classes from their own images only (a folder, image list or N, 3, R, R tensor per name): only
        their embedding rows train, old classes stay bit-identical. The classifier keeps them; ``.save(path)`` the
        returned extension to use it again with ``extensions=``."""
        images = {}
        for name, imgs in classes.items():
            if isinstance(imgs, (str, os.PathLike)):
                images.update(read_class_folders({name: imgs}, self.spec.image_size, self.spec.preprocess).images)
            else:
                entries, _ = self._entries(imgs)
                read = [self._pixels(e) for e in entries]
                bad = next((r for r in read if isinstance(r, str)), None)
                if bad is not None:
                    raise AvarcError(f"class {name!r}: {bad}")
                images[name] = torch.stack([r for r in read if not isinstance(r, str)])
        base = self.source.lower() if is_registry_name(self.source) else None
        added = add_classes(self.model, images, steps=steps, lr=lr, batch_size=batch_size, augment_sigma=augment_sigma,
                            init=init, seed=seed, holdout=holdout, base_name=base, on_step=on_step)
        return added.extension



def _check_arguments(model: object, extensions: Sequence[str | os.PathLike | Extension], batch_size: object,
                     dtype: object) -> list:
    """``from_pretrained``'s arguments that would otherwise fail deep inside, refused in one line each; the
    extensions as a list."""
    if not isinstance(model, (str, os.PathLike, Model)):
        raise AvarcError(f"takes a registry name (digits, d16 …), a model folder or a VAR checkpoint file, got "
                         f"{model!r}", option="model")
    if isinstance(extensions, (str, os.PathLike, Extension)):
        raise AvarcError(f"extensions takes a list; pass extensions=[{os.fspath(extensions)!r}]"
                         if not isinstance(extensions, Extension) else "extensions takes a list; pass [extension]",
                         option="extensions")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise AvarcError(f"must be a positive whole number (or None: sized to memory), got {batch_size!r}",
                         option="batch_size")
    if isinstance(dtype, torch.dtype) and dtype not in DTYPES.values():
        raise AvarcError(f"{str(dtype).removeprefix('torch.')} is not a dtype the model runs in; use auto, "
                         f"{', '.join(DTYPES)}", option="dtype")
    return list(extensions)


def _download_missing(names: Sequence[str | os.PathLike], model_dir: str | os.PathLike | None) -> None:
    """Fetch the registry models (and their VQ-VAEs) not on this machine, as ``avarc download`` does; a failure
    names the model asked for (not only its VQ-VAE) and the download that makes it available."""
    for name in map(str, names):
        for e in with_vaes([name]):
            if e.hub is not None and find_local(e.hub, model_dir) is None:     # not bundled
                try:
                    fetch(e, model_dir)
                except AvarcError as err:
                    raise AvarcError(f"model {name!r} is not on this machine ({err}); {FIX}",
                                     fix=NeedsDownload(name, model_dir)) from None
