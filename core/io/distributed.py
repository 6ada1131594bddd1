"""Running a classification over many images, on one process or many (``torchrun``: env ``RANK``/``WORLD_SIZE``).

Rank r takes images r, r+W, r+2W, … of the list; all ranks step through their shards in lock-step, and after
every step the records are gathered on rank 0 in input order. With one process this is the plain loop.
``classify`` and ``explain`` share this loop (:meth:`core.Classifier.classify_items` / ``explain_items``).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as tdist

from ..engine.runtime import resolve_device
from ..errors import AvarcError
from .data import Item

T = TypeVar("T")
X = TypeVar("X")
IMAGES_PER_STEP = 32
MAX_IMAGES_PER_STEP = 256


def images_per_step(batch_size: int | None, num_candidates: int, pairs_per_forward: int | None = None) -> int:
    """Images classified together: as in the reference evaluation, as many as fill one forward of ``batch_size``
    pairs at the first stage (at least one). With the forward size left to the budget: ``IMAGES_PER_STEP`` on a CPU
    (larger steps buy nothing there); on a GPU (``pairs_per_forward``: what its memory budget fits at the first
    stage) as many as fill that forward, from ``IMAGES_PER_STEP`` to ``MAX_IMAGES_PER_STEP``, so the device stays busy
    between the host's reads and the encoder has a batch worth overlapping with the scoring."""
    if batch_size is not None:
        return max(1, batch_size // num_candidates)
    if pairs_per_forward is None:
        return IMAGES_PER_STEP
    return min(MAX_IMAGES_PER_STEP, max(IMAGES_PER_STEP, pairs_per_forward // num_candidates))


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
                box[0] = ("error", (e.template, e.option, e.fix))     # whole, so every rank words it alike
        tdist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise AvarcError(*value)
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


def run(items: Sequence[Item], load: Callable[[Item], X], step: Callable[[list[Item], Any], list[T]],
        dist: Dist = Dist(), per_step: int = IMAGES_PER_STEP,
        ahead: Callable[[list[X]], Any] | None = None) -> Iterator[list[T]]:
    """The one batch loop: ``load`` each item (threads, two steps ahead), then ``step`` a batch of items with what was
    loaded → one result per item. ``ahead``, if given, is called on each step's loaded items one step early, before
    the step in front of it runs (the classifier starts their encode there, to overlap the scoring), and ``step``
    gets what it returned. On rank 0 each yielded batch is every rank's step, in input order; other ranks get empty
    batches (they must still iterate to the end)."""
    shard = list(enumerate(items))[dist.rank::dist.world]
    steps = math.ceil(math.ceil(len(items) / dist.world) / per_step)
    begin = ahead or (lambda loaded: loaded)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        batches = [shard[k * per_step:(k + 1) * per_step] for k in range(steps)]
        pending = [pool.map(load, [it for _, it in b]) for b in batches[:2]]
        started = begin(list(pending.pop(0))) if batches else None
        for k, batch in enumerate(batches):
            current = started
            if k + 1 < steps:
                loaded = list(pending.pop(0))
                if k + 2 < steps:
                    pending.append(pool.map(load, [it for _, it in batches[k + 2]]))
                started = begin(loaded)
            results = step([it for _, it in batch], current)
            merged = [r for part in dist.gather(list(zip((i for i, _ in batch), results))) for r in part]
            yield [res for _, res in sorted(merged, key=lambda ir: ir[0])] if dist.is_main else []
