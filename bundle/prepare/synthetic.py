"""The embedded default dataset: small synthetic H&E-like colon tissue images with exact gland masks.

It lets the bundle run end to end without downloading anything (``ensure_dataset`` writes it at the default
dataset location when that has no datalist). Each image shows pink, fibrous eosin stroma with scattered nuclei and a
few glands: irregular blobs with a whitish lumen surrounded by a ring of epithelium whose dark hematoxylin nuclei
line the basal rim. The mask is the gland region (epithelium + lumen). Stain colours, brightness, gland count and
size vary between images, and the stroma also holds gland-free white spaces (vessels, tears), so the task is
learnable but not trivial. Generation is deterministic: the same seed gives byte-identical files.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass

import numpy as np
from PIL import Image
from skimage.filters import gaussian

from bundle.data.datalist import DATALIST_FILENAME, absolute_path, write_datalist
from bundle.errors import BundleInputError

logger = logging.getLogger(__name__)

__all__ = ["SYNTHETIC_CLASS_NAMES", "ensure_dataset", "generate_synthetic_dataset", "render_synthetic_case"]

SYNTHETIC_CLASS_NAMES = ("background", "gland")

# optical-density vectors of hematoxylin and eosin (Ruifrok & Johnston), perturbed per image
_HEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29])
_EOSIN_OD = np.array([0.07, 0.99, 0.11])
_MIN_IMAGE_SIZE = 32
# harmonics of the radial wobble of glands and holes
_HARMONICS = np.array([2, 3, 4, 5, 7])
_WOBBLE_ANGLES = np.linspace(-np.pi, np.pi, 721)


@dataclass(frozen=True)
class _Stain:
    hematoxylin: np.ndarray  # unit optical-density vector
    eosin: np.ndarray
    brightness: float


def _random_stain(rng: np.random.Generator) -> _Stain:
    def perturb(vector: np.ndarray, scale: float) -> np.ndarray:
        v = np.clip(vector + rng.normal(0.0, scale, 3), 0.02, None)
        return v / np.linalg.norm(v)

    return _Stain(perturb(_HEMATOXYLIN_OD, 0.08), perturb(_EOSIN_OD, 0.06), float(rng.uniform(0.85, 1.1)))


def _upsample_linear(field: np.ndarray, size: int, factor: int) -> np.ndarray:
    """Linearly interpolate a coarse ``field`` whose samples are ``factor`` pixels apart onto ``size x size``."""
    position = np.arange(size, dtype=np.float32) / factor
    left = np.minimum(position.astype(int), field.shape[0] - 2)
    weight = (position - left.astype(np.float32))[:, None]
    field = field[left] * (1.0 - weight) + field[left + 1] * weight
    return field[:, left] * (1.0 - weight.T) + field[:, left + 1] * weight.T


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-deviation noise smoothed with a Gaussian of about ``sigma`` pixels.

    Wide smoothing is done on a coarser grid and upsampled linearly, which looks the same and is much cheaper.
    """
    factor = max(1, int(sigma // 2))
    coarse = -(-size // factor) + 1
    field = gaussian(rng.standard_normal((coarse, coarse), dtype=np.float32), sigma=sigma / factor, mode="wrap")
    field = _upsample_linear(field, size, factor) if factor > 1 else field[:size, :size]
    return (field - field.mean()) / (field.std() + 1e-8)


def _fibres(rng: np.random.Generator, size: int, angle: float) -> np.ndarray:
    """Wavy fibre-like streaks in [0, 1] along ``angle``: a sinusoid phase-warped by smooth noise, in patches."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(4.0, 7.0) * size / 256
    warp = rng.uniform(4.0, 9.0) * _smooth_noise(rng, size, sigma=size / 8)
    warp += 1.5 * _smooth_noise(rng, size, sigma=size / 40)
    phase = (rows * float(np.sin(angle)) - cols * float(np.cos(angle))) * float(2 * np.pi / period) + warp
    streaks = (0.5 + 0.5 * np.sin(phase)) ** 3
    patches = np.clip(0.5 + 0.45 * _smooth_noise(rng, size, sigma=size / 24), 0, 1)
    return streaks * patches


@dataclass(frozen=True)
class _Blob:
    """An irregular closed shape: a rotated ellipse whose radius wobbles with a few low harmonics.

    In the ellipse's own normalised coordinates the outline is ``radius = wobble(t)`` at polar angle ``t``, so each
    pixel's *relative radius* (its radius divided by the outline's) says exactly whether it is inside (<= 1), and
    scaled copies of the shape (lumen, a safety margin) are thresholds of the same field.
    """

    center: tuple[float, float]
    radii: tuple[float, float]  # semi-axes along the rotated row and column directions
    angle: float
    wobble_table: np.ndarray  # outline radius at _WOBBLE_ANGLES

    @classmethod
    def random(
        cls, rng: np.random.Generator, center: tuple[float, float], radii: tuple[float, float], irregularity: float
    ) -> _Blob:
        amplitudes = rng.normal(0.0, irregularity / _HARMONICS)
        phases = rng.uniform(0, 2 * np.pi, len(_HARMONICS))
        angle = rng.uniform(0, np.pi)
        terms = amplitudes[:, None] * np.cos(_HARMONICS[:, None] * _WOBBLE_ANGLES[None] + phases[:, None])
        return cls(center, radii, angle, np.clip(1.0 + terms.sum(axis=0), 0.6, 1.4))

    def wobble(self, theta: np.ndarray) -> np.ndarray:
        """Outline radius (relative to the ellipse) at polar angles ``theta``."""
        return np.interp(theta, _WOBBLE_ANGLES, self.wobble_table, period=2 * np.pi)

    def relative_radius(self, size: int, reach: float = 1.0) -> tuple[tuple[slice, slice], np.ndarray]:
        """Window of the tile around the shape (``reach`` times its largest extent) and the relative radius there."""
        extent = 1.4 * max(self.radii) * reach + 1
        top, left = max(0, int(self.center[0] - extent)), max(0, int(self.center[1] - extent))
        bottom, right = min(size, int(self.center[0] + extent) + 1), min(size, int(self.center[1] + extent) + 1)
        top, left = min(top, bottom), min(left, right)  # an empty window when the shape is off the tile
        d_rows = np.arange(top, bottom, dtype=np.float32)[:, None] - np.float32(self.center[0])
        d_cols = np.arange(left, right, dtype=np.float32)[None, :] - np.float32(self.center[1])
        cos, sin = np.float32(np.cos(self.angle)), np.float32(np.sin(self.angle))
        along = (d_rows * cos + d_cols * sin) / np.float32(self.radii[0])
        across = (d_cols * cos - d_rows * sin) / np.float32(self.radii[1])
        field = np.hypot(along, across) / self.wobble(np.arctan2(along, across)).astype(np.float32)
        return (slice(top, bottom), slice(left, right)), field

    def points(self, theta: np.ndarray, fraction: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Rows and columns of the points at polar angles ``theta`` and ``fraction`` of the outline's radius."""
        radius = self.wobble(theta) * fraction
        along = self.radii[0] * radius * np.sin(theta)
        across = self.radii[1] * radius * np.cos(theta)
        rows = self.center[0] + along * np.cos(self.angle) - across * np.sin(self.angle)
        cols = self.center[1] + along * np.sin(self.angle) + across * np.cos(self.angle)
        return rows, cols

    def perimeter(self) -> float:
        rows, cols = self.points(np.linspace(0, 2 * np.pi, 65))
        return float(np.hypot(np.diff(rows), np.diff(cols)).sum())


def _stamp_nuclei(
    concentration: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    major: np.ndarray,
    minor: np.ndarray,
    angles: np.ndarray,
    strength: np.ndarray,
) -> None:
    """Raise ``concentration`` to ``strength`` inside soft-edged ellipses (nuclei), all nuclei at once.

    Nucleus ``i`` is centred at ``(rows[i], cols[i])`` with semi-axes ``major[i]`` along the direction ``angles[i]``
    (radians from the row axis towards the column axis) and ``minor[i]`` across it.
    """
    if len(rows) == 0:
        return
    size = concentration.shape[0]
    reach = int(np.ceil(major.max())) + 1
    offsets = np.arange(-reach, reach + 1)
    d_rows, d_cols = np.meshgrid(offsets, offsets, indexing="ij")
    pixel_rows = np.round(rows)[:, None].astype(int) + d_rows.ravel()[None]
    pixel_cols = np.round(cols)[:, None].astype(int) + d_cols.ravel()[None]
    delta_rows = pixel_rows - rows[:, None]
    delta_cols = pixel_cols - cols[:, None]
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
    along = (delta_rows * cos + delta_cols * sin) / major[:, None]
    across = (-delta_rows * sin + delta_cols * cos) / minor[:, None]
    radius = np.sqrt(along**2 + across**2)
    # full strength inside, a one-pixel-wide soft rim
    value = strength[:, None] * np.clip((1.0 - radius) * np.minimum(major, minor)[:, None] + 0.5, 0.0, 1.0)
    keep = (value > 0) & (pixel_rows >= 0) & (pixel_rows < size) & (pixel_cols >= 0) & (pixel_cols < size)
    np.maximum.at(concentration.reshape(-1), pixel_rows[keep] * size + pixel_cols[keep], value[keep])


class _Nuclei:
    """Nucleus ellipses collected while a tile is laid out, stamped all at once at the end."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(self, rows: np.ndarray, cols: np.ndarray, major: np.ndarray, minor: np.ndarray, angles: np.ndarray) -> None:
        self.parts.append((rows, cols, major, minor, angles))

    def render(self, rng: np.random.Generator, size: int) -> np.ndarray:
        density = np.zeros((size, size), dtype=np.float32)
        if self.parts:
            rows, cols, major, minor, angles = (np.concatenate(column) for column in zip(*self.parts))
            _stamp_nuclei(density, rows, cols, major, minor, angles, rng.uniform(0.75, 1.15, len(rows)))
        return density


def _place_glands(rng: np.random.Generator, size: int, nuclei: _Nuclei) -> tuple[np.ndarray, ...]:
    """Lay out 2-8 non-touching glands and add their epithelial nuclei.

    Returns the gland region, the lumen region and the glands grown by a small margin (kept free of stroma holes).
    """
    scale = size / 256
    gland = np.zeros((size, size), dtype=bool)
    lumen = np.zeros((size, size), dtype=bool)
    margin = np.zeros((size, size), dtype=bool)
    gap = 4 * scale
    wanted = int(rng.integers(2, 9))
    mean_radius = rng.uniform(26, 48) * scale
    for _ in range(wanted * 8):
        if wanted == 0:
            break
        radius = mean_radius * rng.uniform(0.6, 1.35)
        radii = (radius, radius * rng.uniform(0.5, 1.0))
        border = 0.3 * radius  # centres may sit near or past the border, so some glands are cut by it
        center = (rng.uniform(-border, size + border), rng.uniform(-border, size + border))
        blob = _Blob.random(rng, center, radii, irregularity=0.2)
        inside = 0 <= center[0] < size and 0 <= center[1] < size
        if inside and margin[int(center[0]), int(center[1])]:
            continue  # centred on an earlier gland: skip the exact test
        window, relative_radius = blob.relative_radius(size, reach=1 + gap / radii[1])
        region = relative_radius <= 1.0
        grown = relative_radius <= 1.0 + gap / radii[1]
        if region.sum() < 0.2 * np.pi * radii[0] * radii[1] or (grown & gland[window]).any():
            continue  # mostly outside the tile, or touching an earlier gland
        lumen_fraction = rng.uniform(0.2, 0.6)
        gland[window] |= region
        lumen[window] |= relative_radius <= lumen_fraction
        margin[window] |= grown

        # crowded nuclei in the basal part of the epithelium, elongated towards the gland centre
        count = int(blob.perimeter() / (rng.uniform(3.2, 4.5) * scale))
        theta = rng.uniform(0, 2 * np.pi, count)
        rows, cols = blob.points(theta, 1.0 - (1.0 - lumen_fraction) * rng.uniform(0.2, 0.55, count))
        radial = np.arctan2(cols - center[1], rows - center[0])
        nuclei.add(
            rows,
            cols,
            rng.uniform(3.0, 4.6, count) * scale,
            rng.uniform(1.6, 2.4, count) * scale,
            radial + rng.normal(0, 0.25, count),
        )
        wanted -= 1
    return gland, lumen, margin


def _stroma_holes(rng: np.random.Generator, size: int, keep_free: np.ndarray) -> np.ndarray:
    """0-3 small gland-free white spaces (vessels, tears), so that "white" alone does not mean gland."""
    scale = size / 256
    holes = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(0, 4))):
        radius = rng.uniform(4, 14) * scale
        center = (rng.uniform(0, size), rng.uniform(0, size))
        blob = _Blob.random(rng, center, (radius, radius * rng.uniform(0.3, 1)), irregularity=0.32)
        window, relative_radius = blob.relative_radius(size)
        holes[window] |= relative_radius <= 1.0
    return holes & ~keep_free


def _add_stroma_nuclei(
    rng: np.random.Generator, size: int, gland: np.ndarray, fibre_angle: float, nuclei: _Nuclei
) -> None:
    """Scatter stroma nuclei outside the glands: fibroblasts elongated along the fibres, round lymphocytes."""
    scale = size / 256
    count = int(rng.uniform(60, 220) * scale * scale)
    rows, cols = rng.uniform(0, size, count), rng.uniform(0, size, count)
    outside = ~gland[rows.astype(int), cols.astype(int)]
    rows, cols, count = rows[outside], cols[outside], int(outside.sum())
    is_round = rng.uniform(0, 1, count) < rng.uniform(0.2, 0.7)
    major = np.where(is_round, rng.uniform(1.6, 2.4, count), rng.uniform(2.8, 4.8, count)) * scale
    minor = np.where(is_round, rng.uniform(1.4, 2.2, count), rng.uniform(0.9, 1.5, count)) * scale
    nuclei.add(rows, cols, major, minor, fibre_angle + rng.normal(0, 0.3, count))


def render_synthetic_case(seed: int, index: int, image_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Render one synthetic H&E tile and its gland mask.

    Returns ``(image, mask)``: ``image`` is uint8 ``[H, W, 3]`` RGB, ``mask`` is uint8 ``[H, W]`` with 255 on gland
    pixels (epithelium and lumen) and 0 elsewhere. The result depends only on ``(seed, index, image_size)``.
    """
    size = image_size
    rng = np.random.default_rng([seed, index])
    stain = _random_stain(rng)
    fibre_angle = rng.uniform(0, np.pi)

    # stain concentrations: stroma is eosin with fibres and a little hematoxylin
    eosin = rng.uniform(0.2, 0.32) + rng.uniform(0.12, 0.3) * _fibres(rng, size, fibre_angle)
    eosin += 0.05 * _smooth_noise(rng, size, sigma=size / 12)
    hematoxylin = rng.uniform(0.05, 0.12) + 0.025 * _smooth_noise(rng, size, sigma=size / 16)

    epithelial_nuclei, stroma_nuclei = _Nuclei(), _Nuclei()
    gland, lumen, margin = _place_glands(rng, size, epithelial_nuclei)
    holes = _stroma_holes(rng, size, margin)
    _add_stroma_nuclei(rng, size, gland, fibre_angle, stroma_nuclei)
    # each kind stays on its side of the gland outline, so the mask is exact
    nucleus_density = np.where(gland, epithelial_nuclei.render(rng, size), stroma_nuclei.render(rng, size))

    # epithelium: purplish-pink cytoplasm; lumen and holes: nearly white with faint debris
    epithelium = gland & ~lumen
    mottling = 0.05 * _smooth_noise(rng, size, sigma=2.0)
    hematoxylin = np.where(epithelium, rng.uniform(0.22, 0.38) + mottling, hematoxylin)
    eosin = np.where(epithelium, rng.uniform(0.22, 0.4) + mottling, eosin)
    white = lumen | holes
    debris = np.clip(_smooth_noise(rng, size, sigma=2.5), 0, None)
    hematoxylin = np.where(white, 0.01 + 0.03 * debris, hematoxylin)
    eosin = np.where(white, 0.025 + 0.06 * debris, eosin)
    hematoxylin = np.maximum(hematoxylin, nucleus_density * (1.0 + 3.0 * mottling))
    eosin = np.where(nucleus_density > 0.5, eosin * 0.6, eosin)

    # optical density -> RGB (Beer-Lambert), a slight blur (optics) and sensor noise
    density = hematoxylin[..., None] * stain.hematoxylin.astype(np.float32)
    density += eosin[..., None] * stain.eosin.astype(np.float32)
    rgb = np.power(np.float32(10.0), -np.clip(density, 0, None))
    rgb = gaussian(rgb, sigma=0.5 * size / 256, channel_axis=-1)
    rgb = rgb * np.float32(stain.brightness) + np.float32(0.012) * rng.standard_normal(rgb.shape, dtype=np.float32)
    image = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
    mask = np.where(gland, 255, 0).astype(np.uint8)
    return image, mask


def _save_png_atomically(array: np.ndarray, path: str) -> None:
    """Write a PNG under a temporary name, then move it into place, so readers never see half a file."""
    folder = os.path.dirname(path)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            Image.fromarray(array).save(stream, format="PNG", compress_level=1)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def generate_synthetic_dataset(
    out_dir: str,
    *,
    seed: int = 0,
    image_size: int = 256,
    num_labeled: int = 8,
    num_unlabeled: int = 24,
    num_validation: int = 4,
    num_test: int = 4,
) -> str:
    """Write the synthetic dataset to ``out_dir`` and return ``out_dir`` as an absolute path.

    Files: ``images/syn_NNN.png`` (RGB), ``masks/syn_NNN.png`` (L, 0/255; only for the training, validation and
    test images) and ``datalist.json`` with relative paths and the lists ``training``, ``unlabeled`` (images only),
    ``validation`` and ``test``. The datalist is written last, so an interrupted run leaves no datalist and can simply
    be repeated; every file is moved into place whole, so concurrent runs (one per rank) are safe.
    """
    counts = {
        "num_labeled": num_labeled,
        "num_unlabeled": num_unlabeled,
        "num_validation": num_validation,
        "num_test": num_test,
    }
    for option, value in counts.items():
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise BundleInputError(f"synthetic dataset option {option} must be a non-negative integer, got {value!r}")
    if num_labeled < 1:
        raise BundleInputError(f"synthetic dataset option num_labeled must be at least 1, got {num_labeled!r}")
    if not isinstance(image_size, (int, np.integer)) or image_size < _MIN_IMAGE_SIZE:
        raise BundleInputError(
            f"synthetic dataset option image_size must be an integer of at least {_MIN_IMAGE_SIZE}, got {image_size!r}"
        )
    out_dir = os.path.abspath(os.path.expanduser(str(out_dir)))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise BundleInputError(f"cannot write the synthetic dataset to {out_dir}: it exists and is not a folder")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "masks"), exist_ok=True)

    datalist: dict = {
        "dataset": "synthetic",
        "num_classes": len(SYNTHETIC_CLASS_NAMES),
        "class_names": list(SYNTHETIC_CLASS_NAMES),
        "seed": int(seed),
        "image_size": int(image_size),
    }
    index = 0
    for key, count, labelled in (
        ("training", num_labeled, True),
        ("unlabeled", num_unlabeled, False),
        ("validation", num_validation, True),
        ("test", num_test, True),
    ):
        items = []
        for _ in range(count):
            name = f"syn_{index:03d}"
            image, mask = render_synthetic_case(seed, index, image_size)
            _save_png_atomically(image, os.path.join(out_dir, "images", f"{name}.png"))
            item = {"image": f"images/{name}.png"}
            if labelled:
                _save_png_atomically(mask, os.path.join(out_dir, "masks", f"{name}.png"))
                item["label"] = f"masks/{name}.png"
            item["name"] = name
            items.append(item)
            index += 1
        datalist[key] = items
    write_datalist(datalist, os.path.join(out_dir, DATALIST_FILENAME))
    return out_dir


def ensure_dataset(dataset_dir: str | os.PathLike, default_dataset_dir: str | os.PathLike) -> str:
    """Return ``dataset_dir`` as an absolute path, first writing the synthetic dataset there if it is the default.

    Only when ``dataset_dir`` has no ``datalist.json`` and resolves to the same place as ``default_dataset_dir``
    is the embedded synthetic dataset generated (:func:`generate_synthetic_dataset`); any other folder is left alone,
    so that :func:`~bundle.data.datalist.load_datalist` reports what is missing. An existing datalist is never
    overwritten; the datalist is written last, so an interrupted generation is simply redone on the next call.
    """
    dataset_dir = absolute_path(dataset_dir)
    if os.path.isfile(os.path.join(dataset_dir, DATALIST_FILENAME)):
        return dataset_dir
    if os.path.realpath(dataset_dir) != os.path.realpath(absolute_path(default_dataset_dir)):
        return dataset_dir
    if os.path.exists(dataset_dir) and not os.path.isdir(dataset_dir):
        raise BundleInputError(f"default dataset folder {dataset_dir} exists but is not a folder")
    logger.info(
        "no %s in the default dataset folder %s: generating the embedded synthetic dataset there "
        "(use --dataset_dir to train on real data)",
        DATALIST_FILENAME,
        dataset_dir,
    )
    generate_synthetic_dataset(dataset_dir)
    return dataset_dir
