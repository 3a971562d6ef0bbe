"""Resuming a killed whole-slide run (``--resume true``): a run interrupted after a few tiles continues with only the
missing tiles computed, and its outputs equal an uninterrupted run's (same pyramid levels, same polygons); changed
settings and leftover work without ``--resume`` are refused with one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from test_wsi_segment import case, workflow  # noqa: F401  (the test slide and the config run)

from bundle.errors import BundleInputError

DONE_BEFORE_KILL = 3


class Counting:
    """The config's inferer, counting its calls; raises KeyboardInterrupt (a kill) on call ``fail_at`` if given."""

    def __init__(self, inner, fail_at: int | None = None) -> None:
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def __call__(self, batch, predictor):
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise KeyboardInterrupt
        self.calls += 1
        return self.inner(batch, predictor)

    def __getattr__(self, name):  # the inferer's settings, as the manifest reads them
        return getattr(self.inner, name)


def segmenter(case, out, fail_at=None, **overrides):  # noqa: F811
    seg = workflow(case, out, save_probabilities=True, **overrides).parser.get_parsed_content("wsi_segmenter")
    name = "inferer" if seg.glass_inferer is None else "glass_inferer"  # the one tiles go through
    seg.counter = Counting(getattr(seg, name), fail_at)
    setattr(seg, name, seg.counter)
    return seg


def levels(path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        return [level.asarray() for level in tif.series[0].levels]


def features(path) -> list[dict]:
    """The features without their ids (random UUIDs)."""
    return [{k: v for k, v in f.items() if k != "id"} for f in json.loads(Path(path).read_text())["features"]]


@pytest.fixture(scope="module")
def runs(case):  # noqa: F811
    reference = segmenter(case, case["folder"] / "reference")
    summary = reference.run()[0]
    out = case["folder"] / "resumed"
    killed = segmenter(case, out, fail_at=DONE_BEFORE_KILL)
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    work = out / ".glas.partial"
    left = sorted(p.name for p in work.iterdir())
    return {
        "reference": case["folder"] / "reference",
        "summary": summary,
        "calls": reference.counter.calls,
        "out": out,
        "work": work,
        "left": left,
    }


def test_a_killed_run_keeps_its_finished_tiles(runs):
    assert runs["calls"] == len(runs["summary"]["selection"].boxes) > DONE_BEFORE_KILL
    assert (
        len([n for n in runs["left"] if n.startswith("tile_")]) == DONE_BEFORE_KILL and "manifest.json" in runs["left"]
    )
    assert not any(n.endswith(".tmp.npz") for n in runs["left"])
    assert not list(runs["out"].glob("glas*"))  # no outputs, no scratch files


def test_leftover_work_is_refused_without_resume(case, runs):  # noqa: F811
    with pytest.raises(BundleInputError, match=r"partly segmented glas.tif.*--resume true.*--overwrite True") as err:
        segmenter(case, runs["out"]).run()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("change", ["tile", "tta", "checkpoint"])
def test_changed_settings_are_refused(case, runs, tmp_path, change):  # noqa: F811
    if change == "tile":
        seg, what = segmenter(case, runs["out"], resume="true", wsi_tile_size=384), "tile_size"
    elif change == "tta":
        seg, what = segmenter(case, runs["out"], resume="true", tta="flips"), "tta"
    else:
        other = tmp_path / "other.pt"
        shutil.copy(case["checkpoint"], other)
        seg, what = segmenter(case, runs["out"], resume=True), "checkpoint"
        seg.weights.load_path = str(other)  # --ckpt_path of another file
    with pytest.raises(BundleInputError, match=rf"cannot resume glas.tif: {what} .*--overwrite True") as err:
        seg.run()
    assert "\n" not in str(err.value) and seg.counter.calls == 0


def test_resume_computes_only_the_missing_tiles_and_equals_a_whole_run(case, runs):  # noqa: F811
    seg = segmenter(case, runs["out"], resume="true")
    seg.run()
    assert seg.counter.calls == runs["calls"] - DONE_BEFORE_KILL
    assert not runs["work"].exists()
    for name in ("glas_mask.tif", "glas_prob.tif"):
        resumed, reference = levels(runs["out"] / name), levels(runs["reference"] / name)
        assert len(resumed) == len(reference) > 1
        for a, b in zip(resumed, reference):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    resumed, reference = (features(folder / "glas.geojson") for folder in (runs["out"], runs["reference"]))
    assert resumed and resumed == reference  # same geometries, properties and order
    # resuming again: the slide is done, nothing runs
    again = segmenter(case, runs["out"], resume=True)
    assert again.run() == [] and again.counter.calls == 0
