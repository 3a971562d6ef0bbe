"""Dataset preparation, apart from what training and inference load: ``python -m bundle.prepare <dataset> ...``.

One module per dataset (``glas``, ``ebhi``, ``kpi``, ``monuseg``, ``folders``) turns a downloaded copy into a
datalist, with the shared file checks (``checks``), seeded splits (``splits``) and output writing (``output``);
``synthetic`` generates the embedded default dataset (``ensure_dataset`` is what ``configs/train.json`` calls before
training). ``cli`` is the command line. Modules load on first use: ``from bundle.prepare import main`` imports the
command line and every preparer, ``bundle.prepare.synthetic`` only itself.
"""

from __future__ import annotations

import importlib

__all__ = ["main"]


def __getattr__(name: str):
    if name == "main":
        return importlib.import_module(f"{__name__}.cli").main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
