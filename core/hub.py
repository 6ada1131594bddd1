"""Finding (and, later, fetching) registry models through the Hugging Face hub cache or a plain directory."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .registry import ModelEntry


def find_local(e: "ModelEntry", model_dir: str | os.PathLike | None = None) -> Path | None:
    """A model's file if it is already on this machine: in ``model_dir`` (plain files) or the HF cache. No network."""
    from huggingface_hub import try_to_load_from_cache

    if model_dir is not None:
        plain = Path(model_dir) / Path(e.filename).name
        return plain if plain.is_file() else None
    cached = try_to_load_from_cache(e.repo_id, e.filename)
    return Path(cached) if isinstance(cached, str) else None
