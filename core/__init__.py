"""avarc: VAR image models as generative classifiers.

The door: ``Classifier.from_pretrained(name)`` then ``.classify`` / ``.explain`` / ``.add_classes``. Beneath it the
data path: image → ``preprocess_image`` → ``Model.encode`` (latent) → ``Model.tokenize_latent`` (multi-scale
tokens) → ``Model.token_logp`` (per-token log-likelihoods per class) → schedule → result records.

The names below are imported on first use (PEP 562), so ``import avarc.errors`` or the CLI's argument parsing does
not pay for importing torch.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_WHERE = {
    "AvarcError": ".errors", "Classifier": ".classifier", "Explanation": ".tasks.explain",
    "Extension": ".tasks.incremental", "Prediction": ".engine.stages", "Skipped": ".engine.stages",
    "classify": ".engine.schedule",
    "Scorer": ".engine.scoring", "Profile": ".engine.profile", "Stage": ".engine.profile",
    "list_profiles": ".io.profiles", "load_profile": ".io.profiles", "Model": ".engine.model",
    "build_model": ".engine.model", "load_model": ".io.loading", "resolve_device": ".engine.runtime",
    "preprocess_image": ".io.preprocess", "ModelSpec": ".models.specs", "VARSpec": ".models.specs",
    "VQVAESpec": ".models.specs", "infer_vae_spec": ".models.specs", "infer_var_spec": ".models.specs",
    "official_spec": ".models.specs",
}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'avarc' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
