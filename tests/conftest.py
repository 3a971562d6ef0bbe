"""Shared pytest fixtures: the real GlaS dataset (from $MPAMATCH_GLAS_DIR), the repository root, offline hubs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# tests never reach a model hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _require_data() -> bool:
    return os.environ.get("MPAMATCH_REQUIRE_DATA", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def glas_dir() -> Path:
    """The real GlaS copy (``images/``, ``masks/``). In CI (MPAMATCH_REQUIRE_DATA=1) a missing copy fails."""
    value = os.environ.get("MPAMATCH_GLAS_DIR", "")
    path = Path(value) if value else None
    if path is None or not (path / "images").is_dir() or not (path / "masks").is_dir():
        message = f"real GlaS data not found (MPAMATCH_GLAS_DIR={value!r}); expected images/ and masks/ in it"
        if _require_data():
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset (3 labelled, 4 unlabelled, 2 validation, 1 test image of 96 px) for workflow runs."""
    from bundle.prepare.synthetic import generate_synthetic_dataset

    out = tmp_path_factory.mktemp("synthetic") / "data"
    generate_synthetic_dataset(out, image_size=96, num_labeled=3, num_unlabeled=4, num_validation=2, num_test=1)
    return out
