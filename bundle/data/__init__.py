"""Data handling: datalists (load, validate, embedded default), dataset preparation, readers, transforms, CutMix.

Only the datalist helpers are imported eagerly (no torch), so ``python -m bundle.prepare`` starts fast; the torch
based modules ``readers``, ``transforms`` and ``cutmix`` load on first use.
"""

from __future__ import annotations

import importlib

from .datalist import DATALIST_FILENAME, PATH_KEYS, ensure_dataset, load_datalist, write_datalist

__all__ = [
    "DATALIST_FILENAME",
    "PATH_KEYS",
    "cutmix",
    "ensure_dataset",
    "glas",
    "load_datalist",
    "readers",
    "synthetic",
    "transforms",
    "write_datalist",
]

_LAZY = {"cutmix", "glas", "readers", "synthetic", "transforms"}


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
