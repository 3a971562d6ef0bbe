"""Components of the ``pathology_mpamatch_segmentation`` MONAI bundle (MPAMatch semi-supervised segmentation).

Sub-packages are imported lazily so that ``import bundle`` stays cheap for configs that need only one part:
``bundle.data`` (what training and inference load: datalists, readers, transforms, samplers), ``bundle.prepare``
(dataset preparation and the embedded synthetic dataset), ``bundle.networks`` (TransUNet and encoders),
``bundle.text`` (text encoders and the prompt learner), ``bundle.losses`` (losses and the image prototype bank),
``bundle.engine`` (the semi-supervised trainer, CutMix and handlers), ``bundle.evaluation`` (pixel and GlaS object
metrics, the evaluation report) and ``bundle.inference`` (inputs, weight loading, writers, large images).
"""

from __future__ import annotations

import importlib

from .errors import BundleInputError

__version__ = "0.1.0"
__all__ = [
    "BundleInputError",
    "__version__",
    "data",
    "engine",
    "evaluation",
    "inference",
    "losses",
    "networks",
    "prepare",
    "text",
]

_SUBPACKAGES = {"data", "engine", "evaluation", "inference", "losses", "networks", "prepare", "text"}


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
