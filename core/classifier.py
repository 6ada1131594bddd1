"""``Classifier``: the one door. Every construction decision (weights, extensions, profile, device, dtype,
preprocessing, encoder backend) is made once in :meth:`Classifier.from_pretrained`; ``classify``, ``explain`` and
``add_classes`` then take raw images and return plain results. Every ``avarc`` command goes through it.

    clf = Classifier.from_pretrained("digits")         # a registry model is downloaded on first use
    pred = clf.classify("a.png")                       # one path, PIL image or 3×R×R tensor in [-1, 1] → one result
    preds = clf.classify(["a.png", "b.png", "dir/"])   # a list (folders expand to their images) → a list
    print(pred.top[0].name, pred.top[0].p, pred.to_dict())

Smoothing noise is seeded per image from ``seed`` and the image's key (a file's name, an in-memory image's
position, or an :class:`~core.io.data.Item`'s key), so results do not depend on batching, order or sharding.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .engine.flops import image_gflops
from .engine.model import Model
from .engine.profile import Profile
from .engine.runtime import resolve_compile, resolve_device, resolve_dtype, set_threads
from .engine.sampling import Sampling, decode, generate_tokens
from .engine.schedule import classify as run_schedule
from .engine.schedule import noise_generator
from .engine.scoring import Scorer
from .engine.stages import Prediction
from .errors import AvarcError
from .io import distributed
from .io.data import ClassSpace, Item, collect
from .io.hub import find_local
from .io.loading import finish, resolve_model
from .io.preprocess import open_image, pixels_to_tensor, preprocess_pil, tensor_pixels
from .io.profiles import default_profile_name, load_profile
from .io.records import model_identity, ok_record, run_info, skipped_record
from .io.registry import entry, fetch, is_registry_name, with_vaes
from .models.specs import ModelSpec
from .tasks.counterfactual import Counterfactual, check_keep_scales
from .tasks.explain import Explanation, Target, check_scales, explain_images, explain_tokens
from .tasks.incremental import Extension, add_classes, apply_extension, load_extension, read_class_folders
from .tasks.ood import DEFAULT_OOD_SCORE, check_score, decide, ood_scores
from .tasks.samples import Samples

ImageInput = Union[str, os.PathLike, Image.Image, torch.Tensor]
Images = Union[ImageInput, Sequence[ImageInput]]
IMAGES_PER_STEP = 16


@dataclass
class Classifier:
    """A loaded model with its extensions applied and its schedule resolved. Build it with :meth:`from_pretrained`."""

    model: Model
    profile: Profile                        # resolved for this model's scales
    source: str = ""                        # the model argument it was built from (registry name, folder or file)
    batch_size: int | None = None           # (sequence, class) pairs per forward; None: sized to a memory budget
    files: list[Path] = field(default_factory=list)     # the files it was loaded from (weights, metadata, extensions)
    _space: ClassSpace | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike | Model = "digits", *, vae: str | os.PathLike | None = None,
                        extensions: Sequence[str | os.PathLike | Extension] = (),
                        profile: str | os.PathLike | Profile | None = None,
                        device: str | torch.device = "auto", dtype: str | torch.dtype = "auto", encoder: str = "torch",
                        model_dir: str | os.PathLike | None = None, trust_pickle: bool = False,
                        patch_nums: Sequence[int] | None = None, batch_size: int | None = None,
                        threads: int | None = None, compile: bool | None = None,  # noqa: A002 (torch's word)
                        local_files_only: bool = False) -> Classifier:
        """``model``: a registry name (``digits``, ``d16``, ``d20-cca`` …), a model directory or a VAR checkpoint
        file (``vae``: its VQ-VAE; ``patch_nums``: its scales when they cannot be read off the file).
        ``extensions``: files from ``add_classes(...).save`` (or the objects), applied in order. ``profile``: a
        shipped name, a YAML file or a Profile (default: the model's own). ``dtype``: ``auto``, ``fp32``, ``bf16``,
        ``fp16`` or a torch dtype (a :class:`Model` passed built keeps its own). ``threads``: CPU threads (default:
        see :func:`core.engine.runtime.set_threads`).
        ``compile``: fuse the engine with torch.compile (default: on CUDA with Triton). A registry model not on this
        machine is downloaded (as ``avarc download`` does) unless ``local_files_only``."""
        chosen = profile if isinstance(profile, Profile) or profile is None else load_profile(profile)
        dev = resolve_device(device)
        dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(str(dtype), dev)
        if isinstance(model, Model):       # built by hand (bench's random weights): only the run-time choices apply
            m = finish(model, encoder, None, resolve_compile(compile, dev))
            model = "python"
        else:
            if not local_files_only:
                _download_missing([n for n in (model, vae) if n is not None and is_registry_name(n)], model_dir)
            m = resolve_model(model, vae, dev, dt, model_dir, trust_pickle, encoder,
                              tuple(patch_nums) if patch_nums else None, resolve_compile(compile, dev))
        set_threads(m.spec.var, threads)
        for ext in extensions:
            apply_extension(m, ext if isinstance(ext, Extension) else load_extension(ext),
                            "extension" if isinstance(ext, Extension) else str(ext))
        if chosen is None:
            default = entry(str(model)).default_profile if is_registry_name(model) else None
            chosen = load_profile(default or default_profile_name(m))
        files = [f for f in (m.var_file, m.vae_file, m.var_file and m.var_file.with_name("meta.json")) if f is not None]
        files += [Path(e) for e in extensions if not isinstance(e, Extension)]
        return cls(m, chosen.resolve(len(m.spec.var.patch_nums)), str(model), batch_size, files)

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
        if allow_null and name.strip().lower() == "null":
            try:
                return self.space.parse(name, where)     # a model may have a class named "null"
            except AvarcError:
                return self.model.null_class
        return self.space.parse(name, where)

    def prepare(self, image: ImageInput) -> np.ndarray:
        """An image file or PIL image → the uint8 R×R×3 pixels the model sees."""
        img = image if isinstance(image, Image.Image) else open_image(image)
        return preprocess_pil(img, self.spec.image_size, self.spec.preprocess)

    def preprocess(self, image: str | os.PathLike | Image.Image) -> torch.Tensor:
        """An image file or PIL image → the float32 3×R×R tensor in [-1, 1] the model takes (the public transform:
        stack these to pass a batch)."""
        return pixels_to_tensor(self.prepare(image))

    def _inputs(self, images: Images) -> tuple[list[ImageInput], bool]:
        """Every form a caller passes → (one input per image, whether one image was passed). A folder stands for
        its images (recursively, sorted); a 4-D tensor for its rows."""
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            return list(images), False
        if isinstance(images, (str, os.PathLike, Image.Image, torch.Tensor)):
            if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
                return self._inputs([images])[0], False
            return [images], True
        out: list[ImageInput] = []
        for x in images:
            if isinstance(x, (str, os.PathLike)) and Path(x).is_dir():
                out += [it.path for it in collect([x], self.space, "none").items]
            else:
                out.append(x)
        return out, False

    def _tensors(self, images: Sequence[ImageInput]) -> torch.Tensor:
        return torch.stack([self._checked(x) if isinstance(x, torch.Tensor) else self.preprocess(x) for x in images])

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        """A preprocessed image as given, or one line on what is wrong with it and the form expected."""
        R = self.spec.image_size
        form = (f"a float 3×{R}×{R} tensor in [-1, 1] (clf.preprocess(image) makes one; or pass the path or PIL "
                "image itself)")
        if not x.is_floating_point():
            raise AvarcError(f"a {str(x.dtype)[6:]} tensor was passed; this model takes {form}")
        if tuple(x.shape) != (3, R, R):
            raise AvarcError(f"a tensor of shape {tuple(x.shape)} was passed; this model takes {form}")
        lo, hi = x.min().item(), x.max().item()
        if lo < -1.001 or hi > 1.001 or lo >= 0.0:
            raise AvarcError(f"tensor values lie in [{lo:.3g}, {hi:.3g}]{' (it looks like [0, 1])' if lo >= 0 else ''};"
                             f" this model takes {form}; a [0, 1] tensor becomes one with x * 2 - 1")
        return x.float()

    @staticmethod
    def _keys(images: Sequence[ImageInput], keys: Sequence[str] | None) -> list[str]:
        if keys is not None:
            return list(keys)
        return [Path(x).name if isinstance(x, (str, os.PathLike)) else str(i) for i, x in enumerate(images)]

    # classify
    def predict(self, x: torch.Tensor, keys: Sequence[str], candidates: Sequence[int], seed: int = 0,
                temperature: float | None = None, ood_score: str | None = None) -> list[Prediction]:
        """B, 3, R, R preprocessed images → predictions (one noise generator per image, from seed and key), each
        with its OOD scores and abstained where the profile's OOD rule says so. ``temperature`` None: the
        profile's (fitted by ``avarc tune``), else 1. ``ood_score``: the score that decides (default: the rule's)."""
        gens = [noise_generator(seed, k) for k in keys]
        temperature = temperature if temperature is not None else self.profile.temperature or 1.0
        latents = self.model.encode(x)
        scorer = Scorer(self.model, self.batch_size)
        preds = run_schedule(self.model, latents, candidates, self.profile, gens, scorer, temperature)
        rule = self.profile.ood
        score = check_score(ood_score or (rule.score if rule else DEFAULT_OOD_SCORE))
        names = self.class_names
        oods = ood_scores(self.model, latents, preds, self.profile, self.batch_size)
        return [replace(p, pred_name=names[p.pred], class_names=names, ood=o, abstained=decide(o, score, rule),
                        gflops=image_gflops(self.spec, p.stages, scorer.executed(i)))
                for i, (p, o) in enumerate(zip(preds, oods))]

    def classify(self, images: Images, *, labels: Sequence[int | str | None] | int | str | None = None,
                 candidates: Sequence[int | str] | None = None, seed: int = 0, temperature: float | None = None,
                 keys: Sequence[str] | None = None, ood_score: str | None = None) -> Prediction | list[Prediction]:
        """Classify a path, PIL image, 3×R×R tensor in [-1, 1] (one result), or a list of these, a folder or an
        N×3×R×R tensor (a list of results). ``labels`` (true classes) fill ``Prediction.label``; ``candidates``
        restricts the classes (default: all); ``ood_score`` picks the OOD score that decides abstention."""
        inputs, single = self._inputs(images)
        cands = self._candidates(candidates)
        keys = self._keys(inputs, keys)
        labels = [labels] if single and (labels is None or isinstance(labels, (int, str))) else labels
        ids = [None if y is None else self.class_id(y, "label") for y in labels] if labels else [None] * len(keys)
        out: list[Prediction] = []
        for i in range(0, len(keys), IMAGES_PER_STEP):
            x = self._tensors(inputs[i:i + IMAGES_PER_STEP])
            out += self.predict(x, keys[i:i + IMAGES_PER_STEP], cands, seed, temperature, ood_score)
        out = [replace(p, label=y) for p, y in zip(out, ids)]
        return out[0] if single else out

    def _candidates(self, candidates: Sequence[int | str] | None) -> list[int]:
        if candidates is None:
            return list(range(self.model.num_classes))
        return [self.class_id(c, "candidate") for c in candidates]

    def run_key(self, seed: int, candidates: Sequence[int], **settings) -> dict:
        """The ``run`` key of this classifier's records (what decides every score; ``settings`` as ``run_info``)."""
        extra = {"extensions": [e.sha256 for e in self.extensions]} if self.extensions else None
        return run_info(model_identity(self.model, self.source), self.profile, seed, candidates, extra, **settings)

    def classify_items(self, items: Sequence[Item], candidates: Sequence[int], seed: int = 0,
                       temperature: float | None = None,
                       topk: int = 5, run_key: dict | None = None, dist: distributed.Dist = distributed.Dist(),
                       per_step: int | None = None, ood_score: str | None = None) -> Iterator[list[dict]]:
        """Items → batches of result records (unreadable images become skipped records), in input order."""
        names = self.class_names
        run = run_key or self.run_key(seed, candidates)

        def step(batch: list[Item], pixels: list[np.ndarray | str]) -> list[dict]:
            good = [(it, px) for it, px in zip(batch, pixels) if not isinstance(px, str)]
            preds = iter(self.predict(torch.stack([pixels_to_tensor(px) for _, px in good]), [it.key for it, _ in good],
                                      candidates, seed, temperature, ood_score) if good else ())
            return [skipped_record(it, px, names, run) if isinstance(px, str)
                    else ok_record(it, next(preds), names, run, topk)
                    for it, px in zip(batch, pixels)]

        per_step = per_step or distributed.images_per_step(self.batch_size, len(candidates))
        return distributed.run(items, self.load, step, dist, per_step)

    def load(self, item: Item) -> np.ndarray | str:
        """An item's model-input pixels, or why it cannot be read (every batch loop's loader)."""
        return item.pixels(self.spec.image_size, self.spec.preprocess)

    # explain
    def explain(self, images: Images, *, a: int | str | None = None, b: int | str | None = None,
                labels: Sequence[int | str | None] | int | str | None = None, scales: int | None = None, seed: int = 0,
                keys: Sequence[str] | None = None) -> Explanation | list[Explanation]:
        """Token-wise log-likelihood-ratio maps of class ``a`` against ``b`` (``"null"``: the unconditional model),
        for the same inputs as :meth:`classify` (one input → one explanation, a list → a list). Left open, A is the
        true label (from ``labels``) or the prediction and B the best other class. ``.save(path)`` or
        ``.to_pil()`` draws one."""
        inputs, single = self._inputs(images)
        target = self.target(a, b)
        keys = self._keys(inputs, keys)
        labels = [labels] if single and (labels is None or isinstance(labels, (int, str))) else labels
        labels = list(labels) if labels else [None] * len(keys)
        targets = [replace(target, label=None if y is None else self.class_id(y, "label")) for y in labels]
        out: list[Explanation] = []
        for i in range(0, len(keys), IMAGES_PER_STEP):
            x = self._tensors(inputs[i:i + IMAGES_PER_STEP])
            for ex, px in zip(self.explain_tensors(x, targets[i:i + IMAGES_PER_STEP], keys[i:i + IMAGES_PER_STEP],
                                                   scales, seed), x):
                if isinstance(ex, AvarcError):
                    raise ex
                out.append(self._named(ex, tensor_pixels(px)))
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

    def explain_tensors(self, x: torch.Tensor, targets: Sequence[Target], keys: Sequence[str],
                        scales: int | None = None,
                        seed: int = 0) -> list[Explanation | AvarcError]:
        """B, 3, R, R preprocessed images → an explanation each (or why its class pair cannot be formed)."""
        gens = [noise_generator(seed, k) for k in keys]
        return explain_images(self.model, x, targets, self.profile, gens, check_scales(self.model, scales),
                              self.batch_size)

    def explain_items(self, items: Sequence[Item], target: Target | Mapping[str, Target], scales: int | None = None,
                      seed: int = 0, per_step: int = IMAGES_PER_STEP) -> Iterator[list[tuple[Item, Explanation | str]]]:
        """Items → batches of (item, explanation with its pixels, or the reason it was skipped), in input order.
        ``target``: one for every item, or one per item's path."""
        check_scales(self.model, scales)     # before the first batch: a bad value is an error, not a skip per image

        def step(batch: list[Item], pixels: list[np.ndarray | str]) -> list[tuple[Item, Explanation | str]]:
            good = [(it, px) for it, px in zip(batch, pixels) if not isinstance(px, str)]
            fixed = [target[it.path] if isinstance(target, Mapping) else target for it, _ in good]
            targets = [t if t.label is not None else replace(t, label=it.label) for t, (it, _) in zip(fixed, good)]
            done = iter(self.explain_tensors(torch.stack([pixels_to_tensor(px) for _, px in good]), targets,
                                             [it.key for it, _ in good], scales, seed) if good else ())
            out = []
            for it, px in zip(batch, pixels):
                ex = px if isinstance(px, str) else next(done)
                if isinstance(ex, AvarcError):
                    ex = f"{it.path}: {ex}"
                elif isinstance(ex, Explanation):
                    ex = self._named(ex, px)
                out.append((it, ex))
            return out

        return distributed.run(items, self.load, step, per_step=per_step)

    # generate
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
        """Classify samples as their PNGs hold them (uint8 pixels), keyed by their file names (``--check``)."""
        x = torch.stack([pixels_to_tensor(px) for px in samples.pixels])
        return self.classify(x, keys=samples.files(), seed=seed)

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
    def counterfactual(self, images: Images, target: int | str, *, keep_scales: int = 1, seed: int = 0,
                       cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
                       keys: Sequence[str] | None = None) -> Counterfactual | list[Counterfactual]:
        """Each image as class ``target``: its own first ``keep_scales`` scales kept, the rest drawn under its
        predicted class and under ``target`` from the same seed (sampling settings as :meth:`generate`), both
        decoded, the counterfactual classified and its tokens explained (target vs predicted). Inputs as for
        :meth:`classify`; ``.save(folder, stem)`` writes the counterfactual and its panel."""
        inputs, single = self._inputs(images)
        t = self.class_id(target, "counterfactual class")
        keys = self._keys(inputs, keys)
        sampling = Sampling(seed, cfg, top_k, top_p).check(self.spec.var.vocab_size)
        out: list[Counterfactual] = []
        for i in range(0, len(keys), IMAGES_PER_STEP):
            x = self._tensors(inputs[i:i + IMAGES_PER_STEP])
            out += self.counterfactual_tensors(x, [t] * x.shape[0], keys[i:i + IMAGES_PER_STEP], keep_scales, sampling)
        return out[0] if single else out

    def counterfactual_tensors(self, x: torch.Tensor, targets: Sequence[int], keys: Sequence[str], keep_scales: int,
                               sampling: Sampling) -> list[Counterfactual]:
        """B, 3, R, R preprocessed images and a target class each → their counterfactuals (see
        :meth:`counterfactual`); the smoothing noise and each image's draws are seeded by ``sampling.seed`` and its
        key, as in classify, so a counterfactual does not depend on the batch it is drawn in."""
        check_keep_scales(keep_scales, len(self.spec.var.patch_nums))
        cands = list(range(self.model.num_classes))
        preds = [p.pred for p in self.predict(x, keys, cands, sampling.seed)]
        tokens = self.model.tokenize(x).cpu()
        prefix = tokens[:, :self.spec.var.scale_ends()[keep_scales - 1]] if keep_scales else None
        as_pred, as_target = (self.generate_tokens(torch.tensor(list(ids)), sampling, prefix,
                                                   generators=[noise_generator(sampling.seed, k) for k in keys])
                              for ids in (preds, targets))    # the same draws for both: they differ by class alone
        B = x.shape[0]
        drawn = decode(self.model.vae, torch.cat((tokens, as_pred, as_target)).to(self.device)).cpu()
        px = drawn.mul(255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        judged = self.predict(torch.stack([pixels_to_tensor(p) for p in px[2 * B:]]),
                              [f"{k}.counterfactual" for k in keys], cands, sampling.seed)
        exps = explain_tokens(self.model, as_target, list(zip(targets, preds)), chunk=self.batch_size)
        names = self.class_names
        return [Counterfactual(tensor_pixels(x[i]), px[i], px[B + i], px[2 * B + i], preds[i], targets[i],
                               keep_scales, exps[i], judged[i].pred, dict(judged[i].posterior).get(targets[i], 0.0),
                               (names[preds[i]], names[targets[i]]), names[judged[i].pred]) for i in range(B)]

    # add classes
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
                inputs, _ = self._inputs(imgs)
                images[name] = self._tensors(inputs)
        base = self.source.lower() if is_registry_name(self.source) else None
        added = add_classes(self.model, images, steps=steps, lr=lr, batch_size=batch_size, augment_sigma=augment_sigma,
                            init=init, seed=seed, holdout=holdout, base_name=base, on_step=on_step)
        return added.extension



def _download_missing(names: Sequence[str | os.PathLike], model_dir: str | os.PathLike | None) -> None:
    """Fetch the registry models (and their VQ-VAEs) not on this machine, as ``avarc download`` does."""
    for e in with_vaes([str(n) for n in names]):
        if not e.bundled and find_local(e.hub, model_dir) is None:
            fetch(e, model_dir)
