"""Running a classification over many images, on one process or many (``torchrun``: env ``RANK``/``WORLD_SIZE``).

Rank r takes images r, r+W, r+2W, … of the list; all ranks step through their shards in lock-step, and after
every step the records are gathered on rank 0 in input order. With one process this is the plain loop.
Unreadable images become skipped records here; everything else about an image is decided by
:func:`core.classifier.classify`.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as tdist

from .classifier import Scorer, classify, noise_generator
from .data import Item
from .errors import AvarcError
from .model import Model, resolve_device
from .preprocess import preprocess_image
from .profiles import Profile
from .results import ok_record, skipped_record

T = TypeVar("T")
IMAGES_PER_STEP = 32


def images_per_step(batch_size: int | None, num_candidates: int) -> int:
    """Images classified together: as in the reference evaluation, as many as fill one forward of ``batch_size``
    pairs at the first stage (at least one); ``IMAGES_PER_STEP`` when the forward size is left to the budget."""
    return IMAGES_PER_STEP if batch_size is None else max(1, batch_size // num_candidates)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (rank 0 of 1 when not under torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def from_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and hand its result (or its AvarcError) to every rank."""
        if not self.active:
            return fn()
        box: list = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except AvarcError as e:
                box[0] = ("error", str(e))
        tdist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise AvarcError(value)
        return value


def init(device: str = "auto") -> Dist:
    """Join the torchrun job if there is one (gloo on CPU, nccl on CUDA); a no-op for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    dist = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = resolve_device(rank_device(dist, device)).type == "cuda"
    if not tdist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(dist.local_rank)
        tdist.init_process_group("nccl" if use_cuda else "gloo")
    return dist


def rank_device(dist: Dist, device: str) -> str:
    """Under torchrun, ``auto``/``cuda`` mean this rank's GPU (``cuda:LOCAL_RANK``)."""
    if dist.active and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{dist.local_rank}"
    return device


def close(dist: Dist) -> None:
    if dist.active and tdist.is_initialized():
        tdist.destroy_process_group()


def _load(item: Item, model: Model) -> torch.Tensor | str:
    """An image tensor, or the reason it cannot be read (a bad file must not stop the run)."""
    try:
        return preprocess_image(item.path, model.spec.image_size, model.spec.preprocess)
    except AvarcError as e:
        return str(e)
    except Exception as e:  # decoders raise many types (DecompressionBombError, MemoryError, …); record, go on
        return f"{item.path}: not a readable image ({type(e).__name__}: {e})"


def run(model: Model, items: Sequence[Item], candidates: Sequence[int], profile: Profile, seed: int,
        names: Sequence[str], run_key: dict, dist: Dist = Dist(), scorer: Scorer | None = None,
        temperature: float = 1.0, topk: int = 5, per_step: int = IMAGES_PER_STEP) -> Iterator[list[dict]]:
    """Classify ``items`` → batches of records. On rank 0 each batch is every rank's step, in input order; other
    ranks get empty batches (they must still iterate to the end)."""
    shard = list(enumerate(items))[dist.rank::dist.world]
    steps = math.ceil(math.ceil(len(items) / dist.world) / per_step)
    scorer = scorer or Scorer(model)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        batches = [shard[k * per_step:(k + 1) * per_step] for k in range(steps)]
        pending = pool.map(lambda it: _load(it, model), [it for _, it in batches[0]]) if batches else iter(())
        for k, batch in enumerate(batches):
            loaded = list(pending)
            if k + 1 < steps:    # decode the next step's images while this one is scored
                pending = pool.map(lambda it: _load(it, model), [it for _, it in batches[k + 1]])
            records = _classify_step(model, batch, loaded, candidates, profile, seed, names, run_key, scorer,
                                     temperature, topk)
            merged = [r for part in dist.gather(records) for r in part]
            yield [rec for _, rec in sorted(merged, key=lambda ir: ir[0])] if dist.is_main else []


def _classify_step(model: Model, batch: list[tuple[int, Item]], loaded: list, candidates: Sequence[int],
                   profile: Profile, seed: int, names: Sequence[str], run_key: dict, scorer: Scorer,
                   temperature: float, topk: int) -> list[tuple[int, dict]]:
    out = [(i, skipped_record(it, x, names, run_key)) for (i, it), x in zip(batch, loaded) if isinstance(x, str)]
    good = [(i, it, x) for (i, it), x in zip(batch, loaded) if not isinstance(x, str)]
    if good:
        latents = model.encode(torch.stack([x for _, _, x in good]))
        gens = [noise_generator(seed, it.key) for _, it, _ in good]
        preds = classify(model, latents, candidates, profile, gens, scorer, temperature)
        out += [(i, ok_record(it, p, names, run_key, topk)) for (i, it, _), p in zip(good, preds)]
    return out
