"""The library's images, checked at the door: every form a Python caller passes (a path, folder, dataset, PIL
image, tensor, numpy array, or a list of these) → one :class:`Entry` per image, or one AvarcError line naming what
is wrong and the form expected, before any model work. Files, folders and datasets are read as the CLI reads them
(:func:`~avarc.io.data.collect`), so each entry keeps its path (or dataset row) and its class folder's label.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from ..errors import AvarcError
from . import hf_data
from .data import ClassSpace, Item, check_inputs, collect

ImageInput = Union[str, os.PathLike, Image.Image, torch.Tensor, np.ndarray]
Images = Union[ImageInput, Sequence[ImageInput]]
Label = Union[int, str, None]
FORMS = ("a path, a folder, a dataset, a PIL image, a float 3×R×R tensor in [-1, 1], a numpy array (H×W×3 uint8 "
         "pixels or 3×R×R float in [-1, 1]), or a list of these")


@dataclass(frozen=True)
class Entry:
    """One image of a library call: a file or dataset row (``item``, with its path and folder label), or an image
    given in memory (``image``: a PIL image or a checked float 3×R×R tensor)."""

    item: Item | None = None
    image: Image.Image | torch.Tensor | None = None

    @property
    def path(self) -> str | None:
        return None if self.item is None else self.item.path

    @property
    def label(self) -> int | None:
        return None if self.item is None else self.item.label


def check_tensor(x: torch.Tensor, size: int) -> torch.Tensor:
    """A preprocessed image as given (float32), or one line on what is wrong with it and the form expected."""
    form = (f"a float 3×{size}×{size} tensor in [-1, 1] (clf.preprocess(image) makes one; or pass the path or PIL "
            "image itself)")
    if not x.is_floating_point():
        raise AvarcError(f"a {str(x.dtype).removeprefix('torch.')} tensor was passed; this model takes {form}")
    if tuple(x.shape) != (3, size, size):
        raise AvarcError(f"a tensor of shape {tuple(x.shape)} was passed; this model takes {form}")
    if not torch.isfinite(x).all():
        raise AvarcError(f"the tensor holds {int((~torch.isfinite(x)).sum())} NaN or infinite values; this model "
                         f"takes {form}")
    lo, hi = x.min().item(), x.max().item()
    if lo < -1.001 or hi > 1.001 or lo >= 0.0:
        raise AvarcError(f"tensor values lie in [{lo:.3g}, {hi:.3g}]{' (it looks like [0, 1])' if lo >= 0 else ''};"
                         f" this model takes {form}; a [0, 1] tensor becomes one with x * 2 - 1")
    return x.detach().float().cpu()


def _array(a: np.ndarray, size: int) -> list[Image.Image | torch.Tensor]:
    """H×W×C uint8 pixels → a PIL image; 3×R×R float → a checked tensor; a 4-D array → its rows."""
    if a.ndim == 4:
        return [x for row in a for x in _array(row, size)]
    if a.ndim == 3 and a.dtype == np.uint8 and a.shape[-1] in (1, 3, 4):
        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)]
    if a.ndim == 3 and np.issubdtype(a.dtype, np.floating) and a.shape[0] == 3:
        return [check_tensor(torch.from_numpy(np.ascontiguousarray(a)), size)]
    if a.ndim == 2 and a.dtype == np.uint8:
        return [Image.fromarray(a)]
    raise AvarcError(f"a numpy array of shape {a.shape} and dtype {a.dtype} was passed; pass H×W×3 uint8 pixels "
                     f"(as np.asarray(Image.open(f)) gives) or a float 3×{size}×{size} array in [-1, 1]")


def _refuse(x: object) -> AvarcError:
    if isinstance(x, (bytes, bytearray, memoryview)):
        return AvarcError("encoded image bytes were passed; decode them first (PIL.Image.open(io.BytesIO(data))) "
                          f"or pass {FORMS}")
    return AvarcError(f"cannot classify {'None' if x is None else 'a ' + type(x).__name__}; pass {FORMS}")


def _one(x: object, space: ClassSpace, size: int) -> tuple[list[Entry], bool]:
    """One element of a call → its entries, and whether it stands for one image (not a folder, dataset or stack)."""
    if isinstance(x, (str, os.PathLike)):
        path = Path(x)
        check_inputs([x])
        if path.is_dir() or hf_data.is_dataset(x):
            return [Entry(item=it) for it in collect([x], space, "auto").items], False
        return [Entry(item=Item(path=str(x)))], True
    if isinstance(x, Image.Image):
        if min(x.size) == 0:
            raise AvarcError(f"an empty ({x.size[0]}×{x.size[1]}) PIL image was passed; pass {FORMS}")
        return [Entry(image=x)], True
    if isinstance(x, torch.Tensor):
        if x.ndim == 4:
            return [Entry(image=check_tensor(row, size)) for row in x], False
        return [Entry(image=check_tensor(x, size))], True
    if isinstance(x, np.ndarray):
        return [Entry(image=im) for im in _array(x, size)], x.ndim != 4
    raise _refuse(x)


def gather(images: Images, space: ClassSpace, size: int) -> tuple[list[Entry], bool]:
    """Every image of a call, checked, and whether one image (→ one result) was passed."""
    if isinstance(images, (list, tuple)):
        out = []
        for x in images:
            if isinstance(x, (list, tuple)):
                raise AvarcError(f"a nested {type(x).__name__} was passed inside the list; pass {FORMS}")
            out += _one(x, space, size)[0]
        if not out:
            raise AvarcError(f"no images were passed; pass {FORMS}")
        return out, False
    return _one(images, space, size)


def labels_for(labels: Sequence[Label] | Label, entries: Sequence[Entry], single: bool,
               parse) -> list[int | None]:
    """The true class of each entry: the caller's ``labels`` (one per image, checked), else its class folder's.
    ``parse(label)`` turns a name or index into a class index."""
    if labels is None:
        return [e.label for e in entries]
    if isinstance(labels, (str, int)) or single:
        if len(entries) != 1:
            raise AvarcError(f"one label ({labels!r}) was given for {len(entries)} images; pass a list with one "
                             "label per image (None where unknown)")
        labels = [labels] if isinstance(labels, (str, int)) else labels
    if not isinstance(labels, Sequence):
        raise AvarcError(f"labels must be a list with one label per image, not a {type(labels).__name__}")
    if len(labels) != len(entries):
        raise AvarcError(f"{len(labels)} labels were given for {len(entries)} images (folders expanded to their "
                         "images); pass one label per image (None where unknown)")
    return [e.label if y is None else parse(y) for y, e in zip(labels, entries)]
