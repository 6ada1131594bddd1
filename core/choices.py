"""The fixed sets of values that options take, in one torch-free leaf: core checks against them and the CLI builds
its ``Literal`` types from them before it imports torch (so ``--help`` answers at once)."""
from __future__ import annotations

DTYPES = ("auto", "fp32", "bf16", "fp16")          # "auto" or a key of core.engine.runtime.DTYPES
ENCODERS = ("torch", "onnx")                       # VQ-VAE encoder backends
LABELS = ("auto", "folders", "none")               # where true labels come from
INITS = ("null", "mean")                           # a new class's first embedding row (add-class)
COLORMAPS = ("turbo", "jet")                       # explain's heatmap colours
METRICS_STARTS = ("blank", "blur")                 # where explain --metrics insertion starts, deletion fills
OOD_SCORES = ("likelihood", "ratio", "posterior")  # what decides abstention (core.tasks.ood)
