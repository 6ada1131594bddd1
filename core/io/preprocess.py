"""Image → model input, exactly as the official evaluation prepares it (without torchvision).

``official``: convert to RGB, resize the shorter side to round(1.125·R) with LANCZOS (longer side
int(round(1.125·R)·long/short), torchvision's rule), centre-crop R×R (torchvision's rounding), scale to [-1, 1].
``resize``: resize the whole image to R×R (LANCZOS), for models trained on uncropped images (the demo).
"""
from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import AvarcError

PREPROCESS_MODES = ("official", "resize")


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for every mode a folder may hold; 16/32-bit greyscale is scaled to 8 bits instead of clipped (non-finite
    float pixels read as 0)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        arr = np.where(np.isfinite(arr), arr, 0.0)      # a float TIFF's NaN or infinite pixels: black, no warning
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


# catch_warnings swaps the process-wide filter list, so two threads opening images at once (the batch loader's
# pool) could restore each other's filters and let a decompression bomb through: one opener at a time.
_OPEN_LOCK = threading.Lock()


def open_image(path: str | os.PathLike, data: bytes | None = None) -> Image.Image:
    """Open and fully decode an image file (or, for a dataset row named ``path``, its ``data``), turning every
    decoder failure into one AvarcError line: files and rows share the limits and the errors. Images over PIL's
    decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, about 89 megapixels) are refused, not decoded."""
    if data is None and Path(path).exists() and not Path(path).is_file():   # a FIFO or device would block or never end
        raise AvarcError(f"{path}: not a regular file; pass image files")
    try:
        with _OPEN_LOCK, warnings.catch_warnings():     # PIL checks the size in open(); decoding runs unlocked
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path if data is None else io.BytesIO(data))
        with im:
            im.load()
            return to_rgb(im)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise AvarcError(f"{path}: too large to decode safely (over {Image.MAX_IMAGE_PIXELS:,} pixels, PIL's "
                         "decompression-bomb limit); resize it") from None
    except FileNotFoundError:
        raise AvarcError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        empty = data == b"" if data is not None else Path(path).exists() and Path(path).stat().st_size == 0
        reason = ("empty" + (" file" if data is None else "") if empty else
                  "not an image format PIL reads" if isinstance(e, UnidentifiedImageError) else str(e).splitlines()[0])
        raise AvarcError(f"{path}: not a readable image ({reason})") from None


def crop_box(w: int, h: int, size: int) -> tuple[int, int, int, int]:
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return left, top, left + size, top + size


def preprocess_pil(img: Image.Image, size: int, mode: str = "official") -> np.ndarray:
    """PIL image → uint8 size×size×3 array (the exact pixels the model sees)."""
    img = to_rgb(img)
    if mode == "resize":
        return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS))
    if mode != "official":
        raise AvarcError(f"unknown preprocessing {mode!r}; use one of {', '.join(PREPROCESS_MODES)}")
    mid = round(1.125 * size)
    w, h = img.size
    if w <= h:
        new = (mid, int(mid * h / w))
    else:
        new = (int(mid * w / h), mid)
    img = img.resize(new, Image.Resampling.LANCZOS)
    return np.asarray(img.crop(crop_box(*img.size, size)))


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 H×W×3 → float32 3×H×W in [-1, 1]."""
    return torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1).float().div_(255).mul_(2).sub_(1)


def tensor_pixels(x: torch.Tensor) -> np.ndarray:
    """float 3×H×W in [-1, 1] → uint8 H×W×3 (the inverse of :func:`pixels_to_tensor`, rounded)."""
    return x.detach().float().cpu().add(1).mul(127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def preprocess_image(path_or_pil: str | os.PathLike | Image.Image, size: int, mode: str = "official") -> torch.Tensor:
    """An image file or PIL image → 3×size×size float32 tensor in [-1, 1]."""
    img = path_or_pil if isinstance(path_or_pil, Image.Image) else open_image(path_or_pil)
    return pixels_to_tensor(preprocess_pil(img, size, mode))


def load_pixels(path: str | os.PathLike, size: int, mode: str = "official") -> np.ndarray | str:
    """The model's input pixels (uint8 size×size×3), or the one-line reason the image cannot be used: inside a
    batch a bad file becomes a skipped record instead of stopping the run."""
    try:
        return preprocess_pil(open_image(path), size, mode)
    except AvarcError as e:
        return str(e)
    except Exception as e:  # decoders raise many types (DecompressionBombError, MemoryError, …); record, go on
        return f"{path}: not a readable image ({type(e).__name__}: {e})"
