"""Real vendor-format slides: the test files of openslide-python's source distribution (an Aperio SVS cropped from
OpenSlide's CMU-1 test slide, a generic tiled TIFF saved at screen resolution, slides whose tiles cannot be decoded).

``.ci/run`` downloads that sdist from PyPI and sets ``MPAMATCH_VENDOR_SLIDES`` to its ``tests/fixtures`` folder (with
``MPAMATCH_REQUIRE_VENDOR_SLIDES=1``, so a failed download fails here instead of skipping); elsewhere:

    pip download --no-deps --no-binary :all: openslide-python==1.4.7 -d /tmp/osd
    tar xzf /tmp/osd/*.tar.gz -C /tmp/osd
    export MPAMATCH_VENDOR_SLIDES=/tmp/osd/openslide_python-1.4.7/tests/fixtures
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from bundle.errors import BundleInputError
from bundle.wsi.slide import Slide, model_mpp


@pytest.fixture(scope="module")
def fixtures() -> Path:
    folder = os.environ.get("MPAMATCH_VENDOR_SLIDES")
    if folder and (Path(folder) / "small.svs").is_file():
        return Path(folder)
    if os.environ.get("MPAMATCH_REQUIRE_VENDOR_SLIDES") == "1":
        pytest.fail(f"MPAMATCH_VENDOR_SLIDES={folder!r} holds no small.svs (openslide-python's test fixtures)")
    pytest.skip("MPAMATCH_VENDOR_SLIDES is not set (see this module's docstring)")


def test_aperio_svs_is_read_with_its_resolution_and_pixels(fixtures):
    import openslide

    path = fixtures / "small.svs"
    with Slide(path) as slide:
        assert slide.backend == "openslide"
        assert slide.mpp == pytest.approx((0.499, 0.499))  # from the Aperio header (MPP = 0.4990)
        assert [(level.height, level.width) for level in slide.levels] == [(16, 16)]
        choice = slide.choose_level(model_mpp(0.5))  # 1.24 µm/px: read level 0, shrink by 0.499 / 1.24
        assert choice.level == 0 and choice.scale == pytest.approx(0.499 / 1.24)
        region = slide.read(0, 4, 2, 8, 10)
    reference = openslide.OpenSlide(str(path))
    assert reference.properties["openslide.vendor"] == "aperio"
    expected = np.asarray(reference.read_region((2, 4), 0, (10, 8)).convert("RGB"))  # OpenSlide: (x, y), (w, h)
    assert region.shape == (8, 10, 3) and np.array_equal(region, expected)
    assert region.std() > 0  # real tissue pixels, not a blank fill


def test_screen_resolution_tiff_needs_mpp_and_then_reads_its_pyramid(fixtures):
    path = fixtures / "boxes.tiff"
    with pytest.raises(BundleInputError) as error:
        Slide(path)
    assert str(error.value).startswith(f"{path}: the slide's pixel size 352.8 x 352.8 µm is not a microscope scan's")
    assert "pass --mpp" in str(error.value)
    with Slide(path, mpp=0.5) as slide:
        assert slide.mpp_source == "--mpp"
        sizes = [(level.height, level.width) for level in slide.levels]
        assert sizes == [(250, 300), (125, 150), (62, 75), (31, 37)]
        assert slide.choose_level(1.0).level == 1 and slide.choose_level(1.0).scale == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["unopenable.tiff", "unreadable.svs"])
def test_slides_whose_tiles_cannot_be_decoded_give_one_error_naming_them(fixtures, name):
    path = fixtures / name
    with pytest.raises(BundleInputError) as error:
        with Slide(path, mpp=0.5) as slide:
            slide.read(0, 0, 0, 1, 1)
    assert str(error.value).startswith(f"{path}: cannot read level 0 at (0, 0)")
    assert "\n" not in str(error.value)
