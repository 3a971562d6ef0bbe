"""Gland polygons as GeoJSON that QuPath (0.4/0.5) imports as objects (File > Import objects, or drag and drop).

Why polygons: a pathologist reviews, edits and measures glands in QuPath, which reads vector objects, not masks.

Geometry. A mask pixel ``(r, c)`` covers the square ``[c, c+1) x [r, r+1)`` of its level; each connected object
becomes the exact union of its pixel squares (a Polygon, holes as interior rings, or a MultiPolygon when parts touch
only at a corner under 8-connectivity), built from the row runs of the object with shapely, so filling the polygons
back at pixel centres gives the mask again, pixel for pixel. Coordinates are then mapped to level 0, the frame QuPath
uses (pixels, origin at the top left of the full-resolution image): ``x = x0 + col * sx``, ``y = y0 + row * sy``.

Feature layout (QuPath's own GeoJSON reader/writer, ``qupath.lib.io.QuPathTypeAdapters`` and ``GsonTools``)::

    {"type": "Feature", "id": "<uuid4>", "geometry": {...},
     "properties": {"objectType": "annotation" | "detection", "classification": {"name": "Gland", "color": [r, g, b]},
                    "isLocked": false, "measurements": {"Area px^2 (level 0)": ..., "Area µm^2": ..., ...}}}

QuPath rejects a ``classification`` object that has a name but no ``color``, so a colour is always written.

Tiles. :class:`PolygonCollector` takes the predicted tiles one by one and keeps only polygons (never masks). Each
tile contributes its *core* window only; the cores of all tiles must not overlap (they may leave gaps, e.g. where
there is no tissue), so that no object is counted twice. Objects cut by core borders are merged at the end into one
polygon, exactly as if the whole slide had been polygonised at once.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import shapely
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from shapely import affinity
from shapely.geometry import mapping
from skimage.measure import label, regionprops

from bundle.errors import BundleInputError

__all__ = [
    "DEFAULT_CLASS_COLORS",
    "DEFAULT_CLASS_NAMES",
    "PolygonCollector",
    "feature_collection",
    "mask_to_features",
    "mask_to_geometries",
    "write_feature_collection",
]

DEFAULT_CLASS_NAMES: dict[int, str] = {1: "Gland"}
DEFAULT_CLASS_COLORS: dict[str, tuple[int, int, int]] = {"Gland": (0, 170, 60)}
# colours for classes without one of their own (QuPath needs a colour with every classification)
_PALETTE = ((200, 0, 0), (0, 90, 220), (230, 150, 0), (150, 0, 200), (0, 180, 180), (120, 120, 120))
OBJECT_TYPES = ("annotation", "detection")


def mask_to_geometries(
    mask: np.ndarray, *, connectivity: int = 2, min_area_px: float = 0
) -> list[tuple[int, shapely.Geometry]]:
    """``(class value, geometry)`` per connected object of each non-zero class, in the mask's own pixel frame.

    Geometries are exact pixel outlines (integer vertices, no collinear vertices). ``connectivity`` 2 is
    8-connectivity (the GlaS convention used by the evaluation), 1 is 4-connectivity. Objects of fewer than
    ``min_area_px`` pixels are dropped.
    """
    mask = _check_mask(mask)
    _check_connectivity(connectivity)
    out: list[tuple[int, shapely.Geometry]] = []
    for value in np.unique(mask):
        if value == 0:
            continue
        labels = label(mask == value, connectivity=connectivity)
        for region in regionprops(labels):
            if region.area < min_area_px:
                continue
            row0, col0 = region.slice[0].start, region.slice[1].start
            out.append((int(value), _pixels_to_geometry(region.image, row0, col0)))
    return out


def mask_to_features(
    mask: np.ndarray,
    *,
    offset: Sequence[float] = (0.0, 0.0),
    scale: float | Sequence[float] = 1.0,
    mpp: float | Sequence[float] | None = None,
    class_names: Mapping[int, str] | None = None,
    class_colors: Mapping[str, Sequence[int]] | None = None,
    object_type: str = "annotation",
    min_area_px: float = 0,
    simplify_tolerance: float = 0.0,
    connectivity: int = 2,
) -> list[dict]:
    """QuPath GeoJSON features, one per connected object of each non-zero class of a class mask.

    Args:
        mask: 2-D integer class mask at the working level; 0 is background.
        offset: level-0 position ``(x0, y0)`` of the mask's top-left corner.
        scale: level-0 pixels per mask pixel, ``(sx, sy)`` or one number (the level's downsample).
        mpp: the slide's level-0 microns per pixel, ``(x, y)`` or one number; None writes pixel measurements only.
        class_names: class value -> QuPath class name (default ``{1: "Gland"}``; other values become ``Class <v>``).
        class_colors: class name -> RGB; classes without one get a fixed palette colour.
        object_type: ``"annotation"`` (editable in QuPath) or ``"detection"`` (lighter, for many objects).
        min_area_px: drop objects of fewer mask pixels.
        simplify_tolerance: Douglas-Peucker tolerance in mask pixels (topology preserved); 0 keeps exact outlines.
        connectivity: 2 (8-connected objects) or 1 (4-connected).
    """
    collector = PolygonCollector(
        offset=offset,
        scale=scale,
        mpp=mpp,
        class_names=class_names,
        class_colors=class_colors,
        object_type=object_type,
        min_area_px=min_area_px,
        simplify_tolerance=simplify_tolerance,
        connectivity=connectivity,
    )
    collector.add_mask(mask)
    return collector.features()


class PolygonCollector:
    """Polygons of a whole slide, tile by tile, merged across tile borders; only polygons are kept in memory.

    Tiles are placed on the working-level pixel grid: ``origin=(col, row)`` is where the tile's ``mask[0, 0]`` lies
    on that grid (integers, so that neighbouring tiles share exact edges), and the grid itself is mapped to level 0
    by ``offset`` and ``scale`` as in :func:`mask_to_features`. A tile read at level-0 location ``(X, Y)`` with
    downsample ``d`` has ``origin = (round(X / d), round(Y / d))`` when ``offset`` is (0, 0) and ``scale`` is ``d``.

    ``core=(row_start, col_start, row_stop, col_stop)`` (in the tile's own pixels, default: the whole tile) is the
    part of the tile this tile answers for, e.g. the centre of an overlapping tile whose margins only gave the
    network context. Core windows of different tiles must not overlap; objects crossing them are merged by
    :meth:`features`.
    """

    def __init__(
        self,
        *,
        offset: Sequence[float] = (0.0, 0.0),
        scale: float | Sequence[float] = 1.0,
        mpp: float | Sequence[float] | None = None,
        class_names: Mapping[int, str] | None = None,
        class_colors: Mapping[str, Sequence[int]] | None = None,
        object_type: str = "annotation",
        min_area_px: float = 0,
        simplify_tolerance: float = 0.0,
        connectivity: int = 2,
    ) -> None:
        self.offset = _pair(offset, "offset", positive=False)
        self.scale = _pair(scale, "scale")
        self.mpp = None if mpp is None else _pair(mpp, "mpp")
        self.class_names = dict(DEFAULT_CLASS_NAMES if class_names is None else class_names)
        self.class_colors = dict(DEFAULT_CLASS_COLORS if class_colors is None else class_colors)
        if object_type not in OBJECT_TYPES:
            raise BundleInputError(f"object_type must be one of {OBJECT_TYPES}, got {object_type!r}")
        self.object_type = object_type
        self.min_area_px = _non_negative(min_area_px, "min_area_px")
        self.simplify_tolerance = _non_negative(simplify_tolerance, "simplify_tolerance")
        _check_connectivity(connectivity)
        self.connectivity = connectivity
        # per class: finished polygons (inside their core) and polygons touching a core border (merged at the end),
        # all in working-level grid coordinates
        self._inner: dict[int, list[shapely.Geometry]] = {}
        self._border: dict[int, list[shapely.Geometry]] = {}

    def add_mask(
        self,
        mask: np.ndarray,
        *,
        origin: Sequence[int] = (0, 0),
        core: Sequence[int] | None = None,
    ) -> None:
        """Polygonise the core window of one tile's class mask (see the class docstring for ``origin``/``core``)."""
        mask = _check_mask(mask)
        col0, row0 = _grid_origin(origin)
        if core is None:
            core = (0, 0, mask.shape[0], mask.shape[1])
        r0, c0, r1, c1 = _check_core(core, mask.shape)
        window = mask[r0:r1, c0:c1]
        for value, geometry in mask_to_geometries(window, connectivity=self.connectivity):
            xmin, ymin, xmax, ymax = geometry.bounds
            # an object reaching the core's edge may continue in a neighbouring tile
            touches = xmin <= 0 or ymin <= 0 or xmax >= window.shape[1] or ymax >= window.shape[0]
            geometry = affinity.translate(geometry, col0 + c0, row0 + r0)
            if touches:
                self._border.setdefault(value, []).append(geometry)
            elif geometry.area >= self.min_area_px:
                # final already: simplified now, so that only the light outline stays in memory
                self._inner.setdefault(value, []).append(self._simplify(geometry))

    def geometries(self) -> list[tuple[int, shapely.Geometry]]:
        """``(class value, geometry)`` after merging across tiles (and simplifying), in working-level grid
        coordinates, sorted by class then position."""
        out = [(value, g) for value, geoms in self._inner.items() for g in geoms]
        for value, geoms in self._border.items():
            out += [(value, self._simplify(g)) for g in self._merge(geoms) if g.area >= self.min_area_px]
        out.sort(key=lambda item: (item[0], item[1].bounds[1], item[1].bounds[0]))
        return out

    def features(self) -> list[dict]:
        """QuPath GeoJSON features of everything collected so far (level-0 coordinates)."""
        return [self._feature(value, geometry) for value, geometry in self.geometries()]

    def write(self, path: str | os.PathLike) -> Path:
        """Write the features as one FeatureCollection (see :func:`write_feature_collection`)."""
        return write_feature_collection(self.features(), path)

    def _merge(self, geoms: list[shapely.Geometry]) -> list[shapely.Geometry]:
        """Union the polygons that are connected across core borders (edge-sharing, or corner-touching under
        8-connectivity), found with an STRtree; polygons of one tile never touch, so only cross-tile pairs pair up."""
        if len(geoms) < 2:
            return list(geoms)
        tree = shapely.STRtree(geoms)
        left, right = tree.query(geoms, predicate="intersects")
        keep = left < right
        left, right = left[keep], right[keep]
        if self.connectivity == 1 and len(left):
            # a shared corner point does not connect 4-connected objects
            shared = shapely.intersection(np.asarray(geoms, dtype=object)[left], np.asarray(geoms, dtype=object)[right])
            edge = shapely.get_dimensions(shared) >= 1
            left, right = left[edge], right[edge]
        n = len(geoms)
        graph = coo_matrix((np.ones(len(left), dtype=np.int8), (left, right)), shape=(n, n))
        count, group = connected_components(graph, directed=False)
        members: list[list[shapely.Geometry]] = [[] for _ in range(count)]
        for index, g in enumerate(group):
            members[g].append(geoms[index])
        return [parts[0] if len(parts) == 1 else shapely.simplify(shapely.union_all(parts), 0.0) for parts in members]

    def _simplify(self, geometry: shapely.Geometry) -> shapely.Geometry:
        if self.simplify_tolerance > 0:
            return geometry.simplify(self.simplify_tolerance, preserve_topology=True)
        return geometry

    def _feature(self, value: int, geometry: shapely.Geometry) -> dict:
        sx, sy = self.scale
        x0, y0 = self.offset
        geometry = affinity.affine_transform(geometry, [sx, 0.0, 0.0, sy, x0, y0])
        # RFC 7946 ring order (exterior counter-clockwise in x/y); QuPath accepts either
        geometry = shapely.orient_polygons(shapely.normalize(geometry), exterior_cw=False)
        name = self.class_names.get(value, f"Class {value}")
        color = self.class_colors.get(name) or _PALETTE[value % len(_PALETTE)]
        return {
            "type": "Feature",
            "id": str(uuid.uuid4()),
            "geometry": _geojson_geometry(geometry),
            "properties": {
                "objectType": self.object_type,
                "classification": {"name": name, "color": [int(c) for c in color]},
                "isLocked": False,
                "measurements": self._measurements(geometry),
            },
        }

    def _measurements(self, geometry: shapely.Geometry) -> dict[str, float]:
        """Area and perimeter of the written (level-0) polygon; perimeters of exact pixel outlines are staircase
        lengths, about 4/pi times the smooth outline's, so prefer area, or simplify for perimeters."""
        out = {"Area px^2 (level 0)": float(geometry.area), "Perimeter px (level 0)": float(geometry.length)}
        if self.mpp is not None:
            mx, my = self.mpp
            out["Area µm^2"] = float(geometry.area * mx * my)
            # anisotropic pixels: measure the outline in microns rather than scaling its pixel length
            out["Perimeter µm"] = float(affinity.scale(geometry, mx, my, origin=(0, 0)).length)
        return out


def feature_collection(features: Iterable[dict]) -> dict:
    """A GeoJSON FeatureCollection of ``features`` (QuPath's multi-object export/import layout)."""
    return {"type": "FeatureCollection", "features": list(features)}


def write_feature_collection(features: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write ``features`` as a FeatureCollection to ``path`` (UTF-8), all or nothing.

    The JSON goes to a temporary file in the same folder, which is renamed onto ``path`` only when complete, so
    QuPath (or a reader polling the folder) never sees a half-written file and an older file survives a failure.
    """
    path = Path(path)
    collection = feature_collection(features)
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as handle:
            tmp_name = handle.name
            # one dumps, not dump: only the one-shot call uses the C encoder (several times faster on a slide's
            # thousands of polygons); the text is the size of the polygons already held
            handle.write(json.dumps(collection, ensure_ascii=False, allow_nan=False, separators=(",", ":")))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as exc:
        raise BundleInputError(f"cannot write GeoJSON file {path}: {exc}") from exc
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
    return path


def _pixels_to_geometry(pixels: np.ndarray, row0: int, col0: int) -> shapely.Geometry:
    """Exact outline of a boolean pixel set: the union of its row runs, runs repeated on consecutive rows stacked
    into one rectangle first (fewer boxes for GEOS), then collinear vertices removed."""
    height, width = pixels.shape
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = pixels
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, stops = np.nonzero(step == -1)  # row-major order pairs each run's start with its stop
    order = np.lexsort((rows, stops, starts))
    rows, starts, stops = rows[order], starts[order], stops[order]
    new_box = np.ones(len(rows), dtype=bool)
    new_box[1:] = (starts[1:] != starts[:-1]) | (stops[1:] != stops[:-1]) | (rows[1:] != rows[:-1] + 1)
    first = np.flatnonzero(new_box)
    last = np.append(first[1:], len(rows)) - 1
    boxes = shapely.box(col0 + starts[first], row0 + rows[first], col0 + stops[first], row0 + rows[last] + 1)
    return shapely.simplify(shapely.union_all(boxes), 0.0)


def _geojson_geometry(geometry: shapely.Geometry) -> dict:
    """GeoJSON geometry dict with plain lists (JSON-ready, comparable in tests)."""

    def lists(item):
        return [lists(x) for x in item] if isinstance(item, (list, tuple)) else item

    geo = mapping(geometry)
    return {"type": geo["type"], "coordinates": lists(geo["coordinates"])}


def _check_mask(mask) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise BundleInputError(f"the class mask must be 2-D (rows, columns), got shape {mask.shape}")
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    if not np.issubdtype(mask.dtype, np.integer):
        raise BundleInputError(f"the class mask must hold integer class values, got dtype {mask.dtype}")
    return mask


def _check_connectivity(connectivity: int) -> None:
    if connectivity not in (1, 2):
        raise BundleInputError(f"connectivity must be 1 (4-connected) or 2 (8-connected), got {connectivity!r}")


def _pair(value, option: str, *, positive: bool = True) -> tuple[float, float]:
    """``(x, y)`` from one number or a pair; finite, and > 0 for scales and pixel sizes."""
    values = (value, value) if np.isscalar(value) else tuple(value)
    try:
        x, y = (float(v) for v in values)
    except (TypeError, ValueError):
        raise BundleInputError(f"{option} must be a number or an (x, y) pair, got {value!r}") from None
    if not (math.isfinite(x) and math.isfinite(y)) or (positive and (x <= 0 or y <= 0)):
        raise BundleInputError(f"{option} must be finite{' and > 0' if positive else ''}, got {value!r}")
    return x, y


def _non_negative(value, option: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number >= 0):
        raise BundleInputError(f"{option} must be a number >= 0, got {value!r}")
    return number


def _grid_origin(origin) -> tuple[int, int]:
    col, row = _pair(origin, "origin", positive=False)
    if col != int(col) or row != int(row):
        raise BundleInputError(f"origin must be whole working-level pixels (col, row), got {origin!r}")
    return int(col), int(row)


def _check_core(core, shape) -> tuple[int, int, int, int]:
    try:
        r0, c0, r1, c1 = (int(v) for v in core)
    except (TypeError, ValueError):
        raise BundleInputError(f"core must be (row_start, col_start, row_stop, col_stop), got {core!r}") from None
    if not (0 <= r0 < r1 <= shape[0] and 0 <= c0 < c1 <= shape[1]):
        raise BundleInputError(f"core {core!r} is not a non-empty window of the tile of shape {tuple(shape)}")
    return r0, c0, r1, c1
