"""Data handling: datalists (load, validate, embedded default), dataset preparation (GlaS, EBHI-Seg, KPI, MoNuSeg,
generic folders; shared checks and splits), readers, transforms, training samplers, CutMix.

Only the datalist helpers are imported eagerly (no torch), so ``python -m bundle.prepare`` starts fast; the torch
based modules ``readers``, ``transforms``, ``sampling`` and ``cutmix`` load on first use.
"""

from __future__ import annotations

import importlib

from .datalist import DATALIST_FILENAME, PATH_KEYS, ensure_dataset, load_datalist, write_datalist

__all__ = [
    "DATALIST_FILENAME",
    "PATH_KEYS",
    "checks",
    "cutmix",
    "ebhi",
    "ensure_dataset",
    "folders",
    "glas",
    "kpi",
    "load_datalist",
    "monuseg",
    "output",
    "readers",
    "sampling",
    "splits",
    "synthetic",
    "transforms",
    "write_datalist",
]

_LAZY = {
    "checks",
    "cutmix",
    "ebhi",
    "folders",
    "glas",
    "kpi",
    "monuseg",
    "output",
    "readers",
    "sampling",
    "splits",
    "synthetic",
    "transforms",
}


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
