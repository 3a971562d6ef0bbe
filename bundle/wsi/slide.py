"""Open a whole-slide image through MONAI's ``WSIReader`` and choose the pyramid level for the model's resolution.

Conventions (the same as MONAI's ``WSIReader``): sizes, locations and pixel sizes are ``(y, x)``; a region is read
with ``get_data(wsi, location=(top, left) in LEVEL-0 pixels, size=(height, width) in pixels OF THE LEVEL, level)``.
:meth:`Slide.read` takes the region in the level's own pixels and converts the location itself.

Resolution: microns per level-0 pixel come from the slide (OpenSlide's ``openslide.mpp-x/y``, which it derives from
the vendor metadata or from a TIFF's resolution tags in cm/inch; for the tifffile backend the OME ``PhysicalSizeX/Y``
or the resolution tags in cm/inch), or from the user's ``--mpp``. A TIFF without units (tifffile's default 1/1,
unit NONE) or at screen resolution (72 dpi = 353 µm/px) has no usable resolution: the user must pass ``--mpp``.

GlaS, the training data, is 20x at 0.620 µm/px (Sirinukunwattana et al. 2017: scanned at 0.465 µm/px, rescaled to
0.620); a model with ``image_scale`` 0.5 therefore works at 1.24 µm/px (:func:`model_mpp`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bundle.errors import BundleInputError

__all__ = ["GLAS_MPP", "Level", "LevelChoice", "Slide", "model_mpp"]

GLAS_MPP = 0.62
"""Microns per pixel of the GlaS images the model is trained on (20x)."""

BACKENDS = ("auto", "openslide", "tifffile", "cucim")
# a level-0 pixel size outside this range is not a microscope scan's (72 dpi TIFFs give 353 µm/px)
MPP_RANGE = (0.05, 20.0)
# cap on one decoded level kept by the tifffile backend (it decodes whole levels); 1.5 G pixels = 4.5 GB RGB
_TIFFFILE_MAX_PIXELS = 1_500_000_000


def model_mpp(image_scale: float, training_mpp: float = GLAS_MPP) -> float:
    """Microns per pixel the model works at: the training images' resolution divided by ``image_scale``."""
    return float(training_mpp) / float(image_scale)


class Level(NamedTuple):
    """One pyramid level: its size in pixels, its downsample from level 0 and its pixel size, all ``(y, x)``."""

    index: int
    height: int
    width: int
    downsample: tuple[float, float]
    mpp: tuple[float, float]


class LevelChoice(NamedTuple):
    """The level to read and the factor to resize its pixels by to reach the target resolution (< 1 shrinks)."""

    level: int
    scale: float


def _check_mpp_override(mpp) -> tuple[float, float]:
    values = mpp if isinstance(mpp, (tuple, list)) else (mpp, mpp)
    try:
        pair = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
        raise BundleInputError(f"--mpp must be a positive number (µm per level-0 pixel) or a (y, x) pair, got {mpp!r}")
    return pair  # type: ignore[return-value]


class Slide:
    """A whole-slide image opened with MONAI's ``WSIReader``; use as a context manager or call :meth:`close`.

    Args:
        path: the slide file (.svs, .ndpi, .mrxs, .scn, .vms, tiled .tif/.tiff, OME-TIFF, ...).
        backend: ``"auto"`` (OpenSlide for what it can read, tifffile for other TIFFs and for OME-TIFF pyramids in
            SubIFDs, which OpenSlide sees as one level), ``"openslide"``, ``"tifffile"`` or ``"cucim"``.
        mpp: microns per level-0 pixel, overriding the slide's (``--mpp``); a number or ``(y, x)``.

    ``mpp`` is ``(y, x)`` in µm per level-0 pixel; ``levels`` lists the pyramid, finest first.
    """

    def __init__(self, path: str | os.PathLike, backend: str = "auto", mpp: float | tuple[float, float] | None = None):
        self.path = Path(path)
        override = None if mpp is None else _check_mpp_override(mpp)
        if backend not in BACKENDS:
            raise BundleInputError(f"slide backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if not self.path.is_file():
            raise BundleInputError(f"slide not found: {self.path} (expected a whole-slide image file)")
        self.backend = self._pick_backend(backend)
        self._cache: tuple[int, np.ndarray] | None = None
        self._reader, self._wsi = self._open()
        try:
            self.levels = self._read_levels(override)
        except BundleInputError:
            self.close()
            raise
        except Exception as exc:  # a reader's own error on a damaged file
            self.close()
            raise BundleInputError(f"{self.path}: cannot read the slide's pyramid ({_reason(exc)})") from exc
        self.mpp = self.levels[0].mpp
        self.mpp_source = "--mpp" if override is not None else "slide"

    # ------------------------------------------------------------------ opening
    def _pick_backend(self, backend: str) -> str:
        if backend != "auto":
            return backend
        import openslide

        try:
            vendor = openslide.OpenSlide.detect_format(str(self.path))
        except Exception:  # OpenSlide refuses some damaged files here already
            vendor = None
        if vendor is not None and vendor != "generic-tiff":
            return "openslide"
        tiff_levels = _tifffile_level_count(self.path)
        if vendor == "generic-tiff":
            # OpenSlide reads top-level IFD pyramids only; an OME-TIFF pyramid in SubIFDs needs tifffile
            return "tifffile" if tiff_levels > _openslide_level_count(self.path) else "openslide"
        if tiff_levels > 0:
            return "tifffile"
        raise BundleInputError(
            f"{self.path}: not a whole-slide image OpenSlide or tifffile can read (vendor formats .svs, .ndpi, .mrxs, "
            ".scn, .vms, .vmu, .bif, DICOM, tiled TIFF; pyramidal TIFF/OME-TIFF); the file may be damaged or truncated"
        )

    def _open(self):
        from monai.data import WSIReader

        if self.backend == "cucim":
            try:
                import cucim  # noqa: F401
            except ImportError:
                raise BundleInputError(
                    "slide backend 'cucim' needs the cucim package, which is not installed; use 'openslide' or 'auto'"
                ) from None
        reader = WSIReader(backend=self.backend, channel_dim=-1)
        try:
            with _quiet():
                wsi = reader.read(str(self.path))
        except Exception as exc:
            raise BundleInputError(f"{self.path}: cannot open as a whole-slide image ({_reason(exc)})") from exc
        return reader, wsi

    def _read_levels(self, override: tuple[float, float] | None) -> list[Level]:
        if self.backend == "tifffile":
            with _quiet():
                sizes = self._tifffile_sizes()
        else:
            count = self._reader.get_level_count(self._wsi)
            sizes = [tuple(int(v) for v in self._reader.get_size(self._wsi, i)) for i in range(count)]
        if not sizes or min(min(s) for s in sizes) <= 0:
            raise BundleInputError(f"{self.path}: the slide has no image levels")
        mpp0 = override if override is not None else self._slide_mpp()
        levels = []
        for i, (h, w) in enumerate(sizes):
            if self.backend == "tifffile":
                ds = (sizes[0][0] / h, sizes[0][1] / w)
            else:  # the backend's own (OpenSlide's is exact for vendor pyramids, e.g. 4.0003)
                d = float(self._reader.get_downsample_ratio(self._wsi, i))
                ds = (d, d)
            levels.append(Level(i, h, w, ds, (mpp0[0] * ds[0], mpp0[1] * ds[1])))
        return levels

    def _tifffile_sizes(self) -> list[tuple[int, int]]:
        series = self._wsi.series[0]
        shapes = [level.shape for level in series.levels]
        axes = series.axes
        if axes not in ("YXS", "YX") or (axes == "YXS" and shapes[0][-1] not in (3, 4)):
            raise BundleInputError(
                f"{self.path}: not an RGB brightfield slide (tifffile sees axes {axes}, shape {shapes[0]}); "
                "multi-channel or z-stack images are not supported"
            )
        # a TIFF cut short still opens; its tiles then point past the end of the file
        size = self.path.stat().st_size
        for level in series.levels:
            for page in level.pages:
                if page is None:
                    continue
                ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts)]
                if not ends or max(ends) > size or 0 in page.databytecounts:
                    raise BundleInputError(f"{self.path}: the TIFF is truncated or damaged (image data is missing)")
        return [(int(s[0]), int(s[1])) for s in shapes]

    def _slide_mpp(self) -> tuple[float, float]:
        mpp = None
        if self.backend == "tifffile":
            mpp = self._tifffile_mpp()
        else:
            props = getattr(self._wsi, "properties", None)
            if props is None or (props.get("openslide.mpp-x") and props.get("openslide.mpp-y")):
                try:  # MONAI's get_mpp is (y, x)
                    mpp = tuple(float(v) for v in self._reader.get_mpp(self._wsi, 0))
                except Exception:
                    mpp = None
        if mpp is None or not all(math.isfinite(v) and v > 0 for v in mpp):
            raise BundleInputError(
                f"{self.path}: the slide has no pixel size metadata; pass --mpp (µm per level-0 pixel, e.g. 0.25 "
                "for 40x, 0.5 for 20x)"
            )
        low, high = MPP_RANGE
        if not all(low <= v <= high for v in mpp):
            raise BundleInputError(
                f"{self.path}: the slide's pixel size {mpp[1]:.4g} x {mpp[0]:.4g} µm is not a microscope scan's "
                f"({low}-{high} µm per pixel; a TIFF saved at screen resolution reads 353 µm); pass --mpp "
                "(µm per level-0 pixel)"
            )
        return mpp  # type: ignore[return-value]

    def _tifffile_mpp(self) -> tuple[float, float] | None:
        import tifffile

        tif = self._wsi
        if tif.is_ome and tif.ome_metadata:
            pixels = tifffile.xml2dict(tif.ome_metadata).get("OME", {}).get("Image", {})
            pixels = (pixels[0] if isinstance(pixels, list) else pixels).get("Pixels", {})
            x, y = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeY")
            units = {pixels.get("PhysicalSizeXUnit", "µm"), pixels.get("PhysicalSizeYUnit", "µm")}
            if x and y and units <= {"µm", "um"}:
                return float(y), float(x)
        page = tif.pages[0]
        unit = page.tags.get("ResolutionUnit")
        if unit is None or unit.value not in (2, 3):  # inch, centimeter; NONE has no physical size
            return None
        return tuple(float(v) for v in self._reader.get_mpp(tif, 0))  # type: ignore[return-value]

    # ------------------------------------------------------------------ levels
    def level(self, index: int) -> Level:
        """The level ``index``; a level the slide does not have is an input error listing the ones it has."""
        if not isinstance(index, (int, np.integer)) or not 0 <= index < len(self.levels):
            available = ", ".join(f"{lv.index} ({lv.width}x{lv.height} px)" for lv in self.levels)
            raise BundleInputError(f"{self.path}: level {index!r} does not exist; available levels: {available}")
        return self.levels[int(index)]

    def choose_level(self, target_mpp: float, rtol: float = 0.05) -> LevelChoice:
        """The coarsest level that is not coarser than ``target_mpp``, and the scale from it to the target.

        Rule: among the levels whose pixel size (mean of y and x) is at most ``target_mpp * (1 + rtol)``, take the
        coarsest, so the model never sees less detail than it was trained at and no more pixels are read than
        needed; ``rtol`` (MONAI's default mpp tolerance, 5%) lets a 40x scan's level at 1.008 µm/px serve 1.0.
        ``scale = level_mpp / target_mpp`` resizes tiles of that level to the target (< 1 shrinks). A slide
        coarser than the target at level 0 gives level 0 and ``scale > 1`` (the model then sees upsampled pixels).
        """
        try:
            target = float(target_mpp)
        except (TypeError, ValueError):
            target = float("nan")
        if not (math.isfinite(target) and target > 0):
            raise BundleInputError(f"target resolution must be a positive number of µm per pixel, got {target_mpp!r}")
        mean = [sum(lv.mpp) / 2 for lv in self.levels]
        fine = [i for i, m in enumerate(mean) if m <= target * (1 + rtol)]
        index = max(fine, key=lambda i: mean[i]) if fine else min(range(len(mean)), key=lambda i: mean[i])
        return LevelChoice(index, mean[index] / target)

    # ------------------------------------------------------------------ reading
    def read(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        """RGB uint8 ``(height, width, 3)`` at ``level``, ``top``/``left`` in that level's pixels.

        Parts outside the slide (and transparent parts of sparse vendor slides) come back white, like glass, so
        edge tiles need no special case.
        """
        lv = self.level(level)
        height, width, top, left = int(height), int(width), int(top), int(left)
        if height <= 0 or width <= 0:
            raise ValueError(f"region size must be positive, got {height}x{width}")
        out = np.full((height, width, 3), 255, np.uint8)
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + height, lv.height), min(left + width, lv.width)
        if y1 <= y0 or x1 <= x0:
            return out
        try:
            patch = self._read_inside(lv, y0, x0, y1 - y0, x1 - x0)
        except BundleInputError:
            raise
        except Exception as exc:
            raise BundleInputError(
                f"{self.path}: cannot read level {lv.index} at ({y0}, {x0}) size {y1 - y0}x{x1 - x0}: {_reason(exc)}"
            ) from exc
        out[y0 - top : y1 - top, x0 - left : x1 - left] = patch
        return out

    def _read_inside(self, lv: Level, top: int, left: int, height: int, width: int) -> np.ndarray:
        if self.backend == "tifffile":
            # MONAI's tifffile reader decodes the whole level on every get_data call; decode it once and keep it
            if self._cache is None or self._cache[0] != lv.index:
                self._cache = None
                if lv.height * lv.width > _TIFFFILE_MAX_PIXELS:
                    raise BundleInputError(
                        f"{self.path}: level {lv.index} ({lv.width}x{lv.height} px) is too large for the tifffile "
                        "backend, which decodes whole levels; convert it to a tiled pyramidal TIFF that OpenSlide reads"
                    )
                with _quiet():
                    data = self._wsi.series[0].levels[lv.index].asarray()
                self._cache = (lv.index, data if data.ndim == 3 else np.repeat(data[..., None], 3, axis=-1))
            return np.ascontiguousarray(self._cache[1][top : top + height, left : left + width, :3])
        # MONAI: location = (top, left) in level-0 pixels, size = (height, width) in the level's pixels
        location = (round(top * lv.downsample[0]), round(left * lv.downsample[1]))
        patch, _ = self._reader.get_data(
            self._wsi, location=location, size=(height, width), level=lv.index, mode="RGBA"
        )
        patch = np.asarray(patch)
        rgb, alpha = patch[..., :3].astype(np.float32), patch[..., 3:].astype(np.float32) / 255.0
        if np.all(alpha == 1.0):
            return np.ascontiguousarray(patch[..., :3]).astype(np.uint8, copy=False)
        return np.clip(rgb * alpha + 255.0 * (1.0 - alpha) + 0.5, 0, 255).astype(np.uint8)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Release the file (OpenSlide handle or TIFF file) and the decoded level."""
        self._cache = None
        wsi, self._wsi = getattr(self, "_wsi", None), None
        if wsi is not None and hasattr(wsi, "close"):
            wsi.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        lv = self.levels[0]
        return f"Slide({str(self.path)!r}, backend={self.backend!r}, {lv.width}x{lv.height} px, mpp={self.mpp})"


@contextlib.contextmanager
def _quiet():
    """Silence the readers' warnings and tifffile's log lines about a damaged file; the input error says it once."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _tifffile_level_count(path: Path) -> int:
    """Levels of the first image series tifffile finds; 0 for a file that is not a readable TIFF."""
    import tifffile

    try:
        with _quiet(), tifffile.TiffFile(path) as tif:
            return len(tif.series[0].levels) if tif.series else 0
    except Exception:
        return 0


def _openslide_level_count(path: Path) -> int:
    import openslide

    try:
        with openslide.OpenSlide(str(path)) as slide:
            return slide.level_count
    except Exception:
        return 0
