"""Gland polygons as QuPath GeoJSON (``bundle.wsi.geojson``): exact outlines in level-0 coordinates, QuPath's
feature layout, merging across tiles, all-or-nothing writes, and a round trip on real GlaS masks."""

from __future__ import annotations

import json
import os
import time
import uuid

import numpy as np
import pytest
import shapely
from PIL import Image
from shapely import affinity
from shapely.geometry import shape
from skimage.draw import disk

from bundle.errors import BundleInputError
from bundle.wsi import geojson
from bundle.wsi.geojson import PolygonCollector, mask_to_features, write_feature_collection


def rasterise(features, shape_rc, *, origin=(0.0, 0.0), step=(1.0, 1.0)) -> np.ndarray:
    """How many features contain the centre of each pixel of a grid whose pixel (r, c) covers
    ``[x0 + c*step_x, x0 + (c+1)*step_x) x [y0 + r*step_y, ...)`` in level-0 coordinates (independent of the module:
    shapely point-in-polygon tests at pixel centres)."""
    out = np.zeros(shape_rc, dtype=np.int32)
    xs = origin[0] + (np.arange(shape_rc[1]) + 0.5) * step[0]
    ys = origin[1] + (np.arange(shape_rc[0]) + 0.5) * step[1]
    for feature in features:
        geometry = shape(feature["geometry"])
        minx, miny, maxx, maxy = geometry.bounds
        cols = np.flatnonzero((xs >= minx) & (xs <= maxx))
        rows = np.flatnonzero((ys >= miny) & (ys <= maxy))
        if len(cols) and len(rows):
            xx, yy = np.meshgrid(xs[cols], ys[rows])
            out[np.ix_(rows, cols)] += shapely.contains_xy(geometry, xx, yy)
    return out


def blobs(shape_rc=(120, 160), count=12, seed=0, holes=True) -> np.ndarray:
    """Random overlapping discs (class 1), some with a hole, and a few class-2 discs."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape_rc, dtype=np.uint8)
    for i in range(count):
        centre = (rng.integers(0, shape_rc[0]), rng.integers(0, shape_rc[1]))
        radius = rng.integers(4, 18)
        rr, cc = disk(centre, radius, shape=shape_rc)
        mask[rr, cc] = 2 if i % 5 == 4 else 1
        if holes and radius > 8 and i % 2 == 0:
            rr, cc = disk(centre, radius // 3, shape=shape_rc)
            mask[rr, cc] = 0
    return mask


def ring_coords(feature) -> list[list[float]]:
    assert feature["geometry"]["type"] == "Polygon"
    return feature["geometry"]["coordinates"][0]


# ---------------------------------------------------------------------------- exact geometry


def test_rectangle_ring_coordinates_in_level0():
    mask = np.zeros((6, 8), dtype=np.uint8)
    mask[2:5, 1:5] = 1  # 3 rows x 4 columns
    (feature,) = mask_to_features(mask, offset=(100, 200), scale=(2, 3))
    # x = 100 + col * 2 over columns [1, 5); y = 200 + row * 3 over rows [2, 5); exterior counter-clockwise in x/y
    assert ring_coords(feature) == [[102, 206], [110, 206], [110, 215], [102, 215], [102, 206]]
    assert len(feature["geometry"]["coordinates"]) == 1  # no holes
    assert feature["properties"]["measurements"]["Area px^2 (level 0)"] == 12 * 2 * 3
    assert feature["properties"]["measurements"]["Perimeter px (level 0)"] == 2 * (8 + 9)


def test_areas_in_square_microns():
    mask = np.zeros((6, 8), dtype=np.uint8)
    mask[2:5, 1:5] = 1
    scale1 = mask_to_features(mask, mpp=0.5)[0]["properties"]["measurements"]
    assert scale1["Area µm^2"] == pytest.approx(3.0)  # 12 px * 0.25 µm^2
    assert scale1["Perimeter µm"] == pytest.approx(14 * 0.5)
    scale2 = mask_to_features(mask, scale=2, mpp=0.5)[0]["properties"]["measurements"]
    assert scale2["Area px^2 (level 0)"] == 48  # 4x the working-level area
    assert scale2["Area µm^2"] == pytest.approx(12.0)
    anisotropic = mask_to_features(mask, mpp=(0.5, 0.25))[0]["properties"]["measurements"]
    assert anisotropic["Area µm^2"] == pytest.approx(12 * 0.125)
    assert anisotropic["Perimeter µm"] == pytest.approx(2 * 4 * 0.5 + 2 * 3 * 0.25)
    no_mpp = mask_to_features(mask)[0]["properties"]["measurements"]
    assert set(no_mpp) == {"Area px^2 (level 0)", "Perimeter px (level 0)"}


def test_ring_object_has_one_hole():
    mask = np.zeros((9, 9), dtype=np.uint8)
    mask[1:8, 1:8] = 1
    mask[3:6, 3:6] = 0
    (feature,) = mask_to_features(mask, offset=(10, 20))
    rings = feature["geometry"]["coordinates"]
    assert feature["geometry"]["type"] == "Polygon" and len(rings) == 2
    assert sorted(map(tuple, rings[1][:-1])) == [(13, 23), (13, 26), (16, 23), (16, 26)]
    assert feature["properties"]["measurements"]["Area px^2 (level 0)"] == 49 - 9
    assert shape(feature["geometry"]).is_valid


def test_two_objects_two_features_and_classes():
    mask = np.zeros((10, 12), dtype=np.uint8)
    mask[1:3, 1:3] = 1
    mask[5:9, 6:11] = 1
    mask[1:3, 8:10] = 2
    mask[7:9, 0:2] = 7
    features = mask_to_features(mask, class_names={1: "Gland", 2: "Lumen"}, class_colors={"Lumen": (1, 2, 3)})
    names = sorted(f["properties"]["classification"]["name"] for f in features)
    assert names == ["Class 7", "Gland", "Gland", "Lumen"]
    areas = sorted(f["properties"]["measurements"]["Area px^2 (level 0)"] for f in features)
    assert areas == [4, 4, 4, 20]
    lumen = next(f for f in features if f["properties"]["classification"]["name"] == "Lumen")
    assert lumen["properties"]["classification"]["color"] == [1, 2, 3]


def test_connectivity_of_corner_touching_pixels():
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[1, 1] = mask[2, 2] = 1
    (eight,) = mask_to_features(mask, connectivity=2)  # one object, two parts meeting at a corner
    assert eight["geometry"]["type"] == "MultiPolygon" and len(eight["geometry"]["coordinates"]) == 2
    four = mask_to_features(mask, connectivity=1)
    assert len(four) == 2 and all(f["geometry"]["type"] == "Polygon" for f in four)


@pytest.mark.parametrize("connectivity", [1, 2])
def test_rasterising_back_reproduces_the_mask_at_scale_1(connectivity):
    mask = blobs(seed=connectivity)
    features = mask_to_features(mask, connectivity=connectivity)
    counts = rasterise(features, mask.shape)
    assert counts.max() == 1  # no pixel claimed twice
    np.testing.assert_array_equal(counts > 0, mask > 0)
    for value in (1, 2):
        name = geojson.DEFAULT_CLASS_NAMES.get(value, f"Class {value}")
        of_class = [f for f in features if f["properties"]["classification"]["name"] == name]
        np.testing.assert_array_equal(rasterise(of_class, mask.shape) > 0, mask == value)


def test_rasterising_back_at_scale_2_with_offsets():
    mask = blobs(seed=3)
    x0, y0 = 37, 11
    features = mask_to_features(mask, offset=(x0, y0), scale=2)
    height, width = mask.shape
    level0 = rasterise(features, (2 * height, 2 * width), origin=(x0, y0)) > 0
    expected = np.kron(mask > 0, np.ones((2, 2), dtype=bool))
    iou = (level0 & expected).sum() / (level0 | expected).sum()
    assert iou > 0.98
    np.testing.assert_array_equal(level0, expected)  # exact at an integer scale

    # the checks above catch a flipped x/y, a one-pixel offset and a wrong scale
    def mutated(transform):
        moved = [dict(f, geometry=shapely.geometry.mapping(transform(shape(f["geometry"])))) for f in features]
        return rasterise(moved, (2 * height, 2 * width), origin=(x0, y0)) > 0

    flipped = mutated(lambda g: shapely.transform(g, lambda xy: (xy - [x0, y0])[:, ::-1] + [x0, y0]))
    shifted = mutated(lambda g: affinity.translate(g, 1, 0))
    rescaled = mutated(lambda g: affinity.scale(g, 1.05, 1.05, origin=(x0, y0)))
    for wrong in (flipped, shifted, rescaled):
        assert not np.array_equal(wrong, expected)


def test_fractional_scale_matches_pixel_centre_sampling():
    """A downsample like 4.0003 (OpenSlide levels): level-0 pixel centres fall in the mask pixel ``floor``."""
    mask = blobs(shape_rc=(60, 80), seed=5)
    # values for which no level-0 pixel centre falls on a mask pixel edge (that would be a tie)
    (x0, y0), (sx, sy) = (5.137, 3.291), (2.3719, 1.7341)
    features = mask_to_features(mask, offset=(x0, y0), scale=(sx, sy))
    shape_rc = (int(60 * sy) - 4, int(80 * sx) - 6)
    level0 = rasterise(features, shape_rc, origin=(x0, y0)) > 0
    rows = np.floor((np.arange(shape_rc[0]) + 0.5) / sy).astype(int)
    cols = np.floor((np.arange(shape_rc[1]) + 0.5) / sx).astype(int)
    row_ties = np.arange(shape_rc[0]) + 0.5 - np.arange(61)[:, None] * sy
    col_ties = np.arange(shape_rc[1]) + 0.5 - np.arange(81)[:, None] * sx
    assert min(np.abs(row_ties).min(), np.abs(col_ties).min()) > 1e-6
    np.testing.assert_array_equal(level0, mask[np.ix_(rows, cols)] > 0)


def test_min_area_and_simplification():
    mask = blobs(seed=7, holes=False)
    mask[0:2, 0:2] = 1  # a 4-pixel speck (may join a disc; counted below either way)
    exact = mask_to_features(mask)
    big = mask_to_features(mask, min_area_px=50)
    assert all(f["properties"]["measurements"]["Area px^2 (level 0)"] >= 50 for f in big)
    assert len(big) == sum(f["properties"]["measurements"]["Area px^2 (level 0)"] >= 50 for f in exact)
    smooth = mask_to_features(mask, simplify_tolerance=1.0)
    assert len(smooth) == len(exact)

    def vertices(features):
        return sum(len(shapely.get_coordinates(shape(f["geometry"]))) for f in features)

    assert vertices(smooth) < 0.7 * vertices(exact)
    for a, b in zip(exact, smooth):
        ga, gb = shape(a["geometry"]), shape(b["geometry"])
        assert gb.is_valid and ga.intersection(gb).area / ga.union(gb).area > 0.9


# ---------------------------------------------------------------------------- QuPath layout


def test_features_follow_qupaths_geojson_layout():
    """The layout QuPath 0.4/0.5 writes and reads (QuPathTypeAdapters.PathObjectTypeAdapter, GsonTools)."""
    mask = blobs(seed=9)
    features = mask_to_features(mask, mpp=0.25, object_type="detection")
    ids = [f["id"] for f in features]
    assert len(set(ids)) == len(ids) and all(str(uuid.UUID(i)) == i for i in ids)
    for feature in features:
        assert set(feature) == {"type", "id", "geometry", "properties"} and feature["type"] == "Feature"
        assert feature["geometry"]["type"] in {"Polygon", "MultiPolygon"}
        props = feature["properties"]
        assert props["objectType"] == "detection" and props["isLocked"] is False
        classification = props["classification"]  # QuPath refuses a name without a colour
        assert isinstance(classification["name"], str) and len(classification["color"]) == 3
        assert all(isinstance(c, int) and 0 <= c <= 255 for c in classification["color"])
        assert set(props["measurements"]) == {
            "Area px^2 (level 0)",
            "Perimeter px (level 0)",
            "Area µm^2",
            "Perimeter µm",
        }
        assert all(np.isfinite(v) for v in props["measurements"].values())
        assert shape(feature["geometry"]).is_valid
    json.dumps(features, allow_nan=False)
    assert mask_to_features(mask)[0]["properties"]["objectType"] == "annotation"


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"object_type": "cell"}, "object_type"),
        ({"mpp": 0}, "mpp"),
        ({"mpp": (0.25, float("nan"))}, "mpp"),
        ({"scale": -2}, "scale"),
        ({"offset": "zero"}, "offset"),
        ({"connectivity": 3}, "connectivity"),
        ({"simplify_tolerance": -1}, "simplify_tolerance"),
        ({"min_area_px": "big"}, "min_area_px"),
    ],
)
def test_bad_options_name_the_option(kwargs, option):
    with pytest.raises(BundleInputError, match=option):
        mask_to_features(np.ones((4, 4), dtype=np.uint8), **kwargs)


def test_bad_masks_are_refused():
    with pytest.raises(BundleInputError, match="2-D"):
        mask_to_features(np.ones((2, 4, 4), dtype=np.uint8))
    with pytest.raises(BundleInputError, match="integer"):
        mask_to_features(np.ones((4, 4), dtype=np.float32))
    assert mask_to_features(np.zeros((5, 5), dtype=np.uint8)) == []
    assert len(mask_to_features(np.ones((5, 5), dtype=bool))) == 1


# ---------------------------------------------------------------------------- tiles


def test_object_split_across_two_tiles_is_one_feature():
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[4:12, 8:22] = 1  # 8 x 14, cut by the tile border at column 15
    collector = PolygonCollector(scale=2, offset=(1000, 500), mpp=0.5)
    collector.add_mask(mask[:, :15], origin=(0, 0))
    collector.add_mask(mask[:, 15:], origin=(15, 0))
    (feature,) = collector.features()
    assert feature["geometry"]["type"] == "Polygon"
    assert ring_coords(feature) == [[1016, 508], [1044, 508], [1044, 524], [1016, 524], [1016, 508]]
    assert feature["properties"]["measurements"]["Area px^2 (level 0)"] == 8 * 14 * 4
    assert feature["properties"]["measurements"]["Area µm^2"] == pytest.approx(8 * 14 * 4 * 0.25)


@pytest.mark.parametrize("connectivity", [1, 2])
def test_overlapping_tiles_with_cores_equal_the_whole_mask(connectivity):
    """Tiles of 48 px with 8 px margins, only the 32 px cores polygonised: same objects as the whole mask at once."""
    mask = blobs(shape_rc=(96, 128), count=16, seed=11)
    mask[40:41, 31:33] = 1  # two pixels across a core corner region
    mask[63, 63] = mask[64, 64] = 1  # a diagonal contact across a core corner
    whole = mask_to_features(mask, offset=(7, 9), scale=2, connectivity=connectivity)
    collector = PolygonCollector(offset=(7, 9), scale=2, connectivity=connectivity)
    core, margin = 32, 8
    for row in range(0, 96, core):
        for col in range(0, 128, core):
            r0, c0 = max(row - margin, 0), max(col - margin, 0)
            tile = mask[r0 : row + core + margin, c0 : col + core + margin]
            collector.add_mask(tile, origin=(c0, r0), core=(row - r0, col - c0, row - r0 + core, col - c0 + core))
    tiled = collector.features()
    assert len(tiled) == len(whole)

    def key(feature):
        return feature["properties"]["classification"]["name"], json.dumps(feature["geometry"])

    for a, b in zip(sorted(whole, key=key), sorted(tiled, key=key)):
        assert a["properties"]["classification"] == b["properties"]["classification"]
        assert shape(a["geometry"]).equals(shape(b["geometry"]))
    counts = rasterise(tiled, (192, 256), origin=(7, 9))
    assert counts.max() == 1
    np.testing.assert_array_equal(counts > 0, np.kron(mask > 0, np.ones((2, 2), dtype=bool)))


def test_small_pieces_of_a_large_object_survive_min_area():
    mask = np.zeros((10, 20), dtype=np.uint8)
    mask[2:8, 8:11] = 1  # 18 px, cut into 12 + 6 at column 10
    collector = PolygonCollector(min_area_px=15)
    collector.add_mask(mask[:, :10])
    collector.add_mask(mask[:, 10:], origin=(10, 0))
    (feature,) = collector.features()
    assert feature["properties"]["measurements"]["Area px^2 (level 0)"] == 18


def test_bad_tile_placement_is_refused():
    collector = PolygonCollector()
    with pytest.raises(BundleInputError, match="origin"):
        collector.add_mask(np.ones((4, 4), dtype=np.uint8), origin=(0.5, 0))
    with pytest.raises(BundleInputError, match="core"):
        collector.add_mask(np.ones((4, 4), dtype=np.uint8), core=(0, 0, 5, 4))


# ---------------------------------------------------------------------------- writing


def test_written_file_is_a_feature_collection(tmp_path):
    mask = blobs(seed=13)
    features = mask_to_features(mask, mpp=0.5)
    path = write_feature_collection(features, tmp_path / "out" / "slide.geojson")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["type"] == "FeatureCollection" and data["features"] == features
    assert "Area µm^2" in path.read_text(encoding="utf-8")  # UTF-8, not escaped
    assert sorted(p.name for p in path.parent.iterdir()) == ["slide.geojson"]
    collector = PolygonCollector(mpp=0.5)
    collector.add_mask(mask)
    assert len(json.loads(collector.write(tmp_path / "c.geojson").read_text())["features"]) == len(features)


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "slide.geojson"
    features = mask_to_features(blobs(seed=17))

    def full_disk(fd):  # the text is in the temporary file; flushing it to disk fails
        assert os.fstat(fd).st_size > 0
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(geojson.os, "fsync", full_disk)
    with pytest.raises(BundleInputError, match="slide.geojson"):
        write_feature_collection(features, path)
    assert list(tmp_path.iterdir()) == []

    path.write_text("previous")  # an older file survives a failed rewrite
    with pytest.raises(BundleInputError, match="No space left"):
        write_feature_collection(features, path)
    assert path.read_text() == "previous" and list(tmp_path.iterdir()) == [path]


def test_unwritable_destination_names_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(BundleInputError, match="file/slide.geojson"):
        write_feature_collection([], blocker / "slide.geojson")


# ---------------------------------------------------------------------------- real data and timing


def test_real_glas_masks_round_trip(glas_dir):
    names = sorted(p.stem for p in (glas_dir / "masks").glob("*.png"))[::5]  # 33 of the 165 masks
    assert len(names) >= 30
    seconds, total_objects = 0.0, 0
    for name in names:
        mask = (np.asarray(Image.open(glas_dir / "masks" / f"{name}.png")) > 0).astype(np.uint8)
        start = time.perf_counter()
        features = mask_to_features(mask, offset=(2048, 4096), scale=1, mpp=0.62)
        seconds += time.perf_counter() - start
        total_objects += len(features)
        counts = rasterise(features, mask.shape, origin=(2048, 4096))
        assert counts.max() == 1, name
        np.testing.assert_array_equal(counts > 0, mask > 0, err_msg=name)
        area = sum(f["properties"]["measurements"]["Area px^2 (level 0)"] for f in features)
        assert area == mask.sum(), name
    print(f"\nGlaS: {len(names)} masks, {total_objects} glands polygonised in {seconds:.3f} s")


def test_timing_of_a_2048_tile_with_about_100_glands():
    rng = np.random.default_rng(0)
    mask = np.zeros((2048, 2048), dtype=np.uint8)
    for _ in range(120):
        centre = rng.integers(50, 2000, size=2)
        rr, cc = disk(tuple(centre), rng.integers(15, 50), shape=mask.shape)
        mask[rr, cc] = 1
        rr, cc = disk(tuple(centre), 6, shape=mask.shape)
        mask[rr, cc] = 0  # a lumen
    start = time.perf_counter()
    features = mask_to_features(mask, scale=4, mpp=0.25)
    seconds = time.perf_counter() - start
    assert seconds < 20  # about 0.2 s on one shared core; a generous bound for slow CI machines
    counts = rasterise(features, mask.shape, step=(4, 4))
    np.testing.assert_array_equal(counts > 0, mask > 0)

    start = time.perf_counter()  # the same area as 16 tiles of 512 px, merged across borders
    collector = PolygonCollector(scale=4, mpp=0.25)
    for row in range(0, 2048, 512):
        for col in range(0, 2048, 512):
            collector.add_mask(mask[row : row + 512, col : col + 512], origin=(col, row))
    tiled = collector.features()
    tiled_seconds = time.perf_counter() - start
    assert len(tiled) == len(features)
    print(f"\n2048x2048 tile: {len(features)} glands in {seconds:.3f} s; as 16 tiles merged: {tiled_seconds:.3f} s")
