"""avarc core: VAR image models as generative classifiers.

The door: ``Classifier.from_pretrained(name)`` then ``.classify`` / ``.explain`` / ``.add_classes``. Beneath it the
data path: image → ``preprocess_image`` → ``Model.encode`` (latent) → ``Model.tokenize_latent`` (multi-scale
tokens) → ``Model.token_logp`` (per-token log-likelihoods per class) → schedule → result records.
"""
__version__ = "0.1.0"

from .errors import AvarcError
from .classifier import Classifier
from .tasks.explain import Explanation
from .tasks.incremental import Extension
from .engine.stages import Prediction
from .engine.schedule import classify
from .engine.scoring import Scorer
from .engine.profile import Profile, Stage
from .io.profiles import list_profiles, load_profile
from .engine.model import Model, build_model
from .io.loading import load_model
from .engine.runtime import resolve_device
from .io.preprocess import preprocess_image
from .models.specs import ModelSpec, VARSpec, VQVAESpec, infer_vae_spec, infer_var_spec, official_spec

__all__ = [
    "AvarcError", "Classifier", "Explanation", "Extension", "Model", "ModelSpec", "VARSpec", "VQVAESpec",
    "build_model", "infer_vae_spec", "infer_var_spec", "load_model", "official_spec", "preprocess_image",
    "resolve_device", "Prediction", "Profile", "Scorer", "Stage", "classify", "list_profiles", "load_profile",
]
