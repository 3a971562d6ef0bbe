"""What training and inference load: datalists (load, validate, write) and the checks a loaded datalist gets, image
and mask readers, the one TIFF decoder, MONAI transforms the bundle adds, and the training samplers.

Dataset preparation (``python -m bundle.prepare``) and the embedded synthetic dataset are in :mod:`bundle.prepare`;
CutMix, which works on batches already on the device, is in :mod:`bundle.engine.cutmix`. Only the datalist helpers
are imported eagerly (no torch); ``checks``, ``readers``, ``transforms``, ``sampling`` and ``tiff`` load on first use.
"""

from __future__ import annotations

import importlib

from .datalist import DATALIST_FILENAME, PATH_KEYS, absolute_path, load_datalist, unlabeled_pool, write_datalist

__all__ = [
    "DATALIST_FILENAME",
    "PATH_KEYS",
    "absolute_path",
    "load_datalist",
    "unlabeled_pool",
    "checks",
    "readers",
    "sampling",
    "tiff",
    "transforms",
    "write_datalist",
]

_LAZY = {"checks", "readers", "sampling", "tiff", "transforms"}


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
