"""avarc core: VAR image models as generative classifiers.

The door: ``Classifier.from_pretrained(name)`` then ``.classify`` / ``.explain`` / ``.add_classes``. Beneath it the
data path: image → ``preprocess_image`` → ``Model.encode`` (latent) → ``Model.tokenize_latent`` (multi-scale
tokens) → ``Model.token_logp`` (per-token log-likelihoods per class) → schedule → result records.
"""
__version__ = "0.1.0"

from .errors import AvarcError
from .classifier import Classifier
from .explain import Explanation
from .incremental import Extension
from .schedule import Prediction, classify
from .scoring import Scorer
from .profiles import Profile, Stage, list_profiles, load_profile
from .model import Model, build_model, load_model, resolve_device
from .preprocess import preprocess_image
from .specs import ModelSpec, VARSpec, VQVAESpec, infer_vae_spec, infer_var_spec, official_spec

__all__ = [
    "AvarcError", "Classifier", "Explanation", "Extension", "Model", "ModelSpec", "VARSpec", "VQVAESpec",
    "build_model", "infer_vae_spec", "infer_var_spec", "load_model", "official_spec", "preprocess_image",
    "resolve_device", "Prediction", "Profile", "Scorer", "Stage", "classify", "list_profiles", "load_profile",
]
