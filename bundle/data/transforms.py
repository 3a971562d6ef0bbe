"""MONAI transforms this bundle needs and MONAI lacks: mask values -> class indices, HED stain jitter, colour
jitter, random grayscale and a border-safe isotropic Gaussian blur for the strong views (the colour and blur ops
wrap ``torchvision.transforms.v2.functional``), and a random zoom that crops before it resizes.

Every random transform draws from MONAI's ``self.R``, so ``Compose.set_random_state``, ``set_determinism`` and
MONAI's data-loader worker seeding control it. As in MONAI, a dictionary transform applies the *same* random draw
to all of its keys; give each strong view its own transform instance to get independent colours per view.
Flips, rotations and copying of views use MONAI's own transforms (``RandFlipd``, ``RandRotate90d``, ``CopyItemsd``);
:class:`RandZoomCropd` puts MONAI's ``SpatialPad``, ``SpatialCrop`` and ``Resize`` together.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as tvf
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import MapTransform, RandomizableTransform, Resize, SpatialCrop, SpatialPad, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor, ensure_tuple_rep
from skimage.color import hed_from_rgb, rgb_from_hed

from ..errors import BundleInputError

__all__ = [
    "MaskToClass",
    "MaskToClassd",
    "RandColorJitter",
    "RandColorJitterd",
    "RandGaussianBlur",
    "RandGaussianBlurd",
    "RandGrayscale",
    "RandGrayscaled",
    "RandHEDJitter",
    "RandHEDJitterd",
    "RandZoomCropd",
    "hed_jitter",
]

_OD_FLOOR = 1e-6  # as skimage.color.rgb2hed: intensities are floored before the logarithm


def _source_name(img: Any) -> str:
    if isinstance(img, MetaTensor):
        name = img.meta.get("filename_or_obj")
        if name:
            return str(name)
    return "<in-memory mask>"


def _format_value(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class MaskToClass(Transform):
    """Turn a loaded mask ``[1, H, W]`` (or ``[3|4, H, W]`` with equal colour channels) into class indices
    ``[1, H, W]`` of dtype int64 (meta kept).

    Args:
        mode: ``"nonzero"``: every value > 0 becomes class 1 (binary 0/255 masks and instance-labelled masks
            alike); ``"values"``: ``class_values[i]`` becomes class ``i`` and any other value is an error;
            ``"threshold"``: every value > ``threshold`` becomes class 1 (grey masks with anti-aliased or JPEG edges,
            such as EBHI-Seg's labels).
        class_values: the raw values in class order for ``mode="values"``, e.g. ``[0, 255]`` or ``[0, 128, 255]``.
        threshold: the largest background value for ``mode="threshold"`` (default 127: 0..127 background,
            128..255 foreground); ignored by the other modes.

    Raises:
        BundleInputError: bad options; a mask with differing colour channels; for ``mode="values"`` a mask with
            values not in ``class_values`` (the message names the file and lists up to five of them).
    """

    backend = [TransformBackends.TORCH]
    modes = ("nonzero", "values", "threshold")

    def __init__(
        self, mode: str = "nonzero", class_values: Sequence[float] | None = None, threshold: float = 127.0
    ) -> None:
        if mode not in self.modes:
            raise BundleInputError(f"MaskToClass mode {mode!r} is not one of {', '.join(self.modes)}")
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold):
            raise BundleInputError(f"MaskToClass threshold must be a finite number, got {threshold!r}")
        if mode == "values":
            if not class_values or len(class_values) < 2:
                raise BundleInputError("MaskToClass mode 'values' needs class_values with at least two raw values")
            if len(set(float(v) for v in class_values)) != len(class_values):
                raise BundleInputError(f"MaskToClass class_values {list(class_values)} contain a value twice")
        self.mode = mode
        self.class_values = [float(v) for v in class_values] if class_values is not None else None
        self.threshold = float(threshold)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        mask = convert_to_tensor(img, track_meta=False)
        if mask.ndim < 3:
            raise BundleInputError(f"mask {_source_name(img)} has shape {tuple(mask.shape)}; expected [1, H, W]")
        if mask.shape[0] != 1:
            colour = mask[:3]
            grey = mask.shape[0] in (3, 4) and torch.equal(colour[0], colour[1]) and torch.equal(colour[0], colour[2])
            if not grey:
                raise BundleInputError(
                    f"mask {_source_name(img)} has {mask.shape[0]} channels that differ; expected one channel of class "
                    "values (or three equal colour channels)"
                )
            mask = mask[:1]
        if self.mode == "nonzero":
            classes = (mask > 0).to(torch.int64)
        elif self.mode == "threshold":
            classes = (mask > self.threshold).to(torch.int64)
        else:
            classes = torch.full(mask.shape, -1, dtype=torch.int64, device=mask.device)
            for index, value in enumerate(self.class_values):
                classes[mask == value] = index
            unexpected = mask[classes < 0]
            if unexpected.numel():
                values = torch.unique(unexpected).tolist()
                shown = ", ".join(_format_value(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
                expected = ", ".join(_format_value(v) for v in self.class_values)
                raise BundleInputError(
                    f"mask {_source_name(img)} has {len(values)} unexpected value(s) {shown} "
                    f"({unexpected.numel()} pixels); class_values are {expected}"
                )
        return convert_to_dst_type(classes, dst=img, dtype=torch.int64)[0]


class MaskToClassd(MapTransform):
    """Dictionary version of :class:`MaskToClass`."""

    backend = MaskToClass.backend

    def __init__(
        self,
        keys: KeysCollection,
        mode: str = "nonzero",
        class_values: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
        threshold: float = 127.0,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = MaskToClass(mode=mode, class_values=class_values, threshold=threshold)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


def hed_jitter(
    image: torch.Tensor, scale: Sequence[float] | torch.Tensor, shift: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Jitter the stains of RGB images in [0, 1] (``[..., 3, H, W]``): RGB -> optical density -> HED with the
    Ruifrok-Johnston matrix (``skimage.color.hed_from_rgb``), ``h' = h * scale + shift`` per stain, back to RGB,
    clipped to [0, 1]. ``scale``/``shift`` have three values (H, E, D).

    Units: the stains are in natural optical density (``-log(rgb) @ hed_from_rgb``, as in Tellez et al. 2018 with the
    skimage of their time); current ``skimage.color.rgb2hed`` divides by ``-log(1e-6)``, so its shift equals ours
    divided by ``-log(1e-6)`` (about 13.8). Negative stain amounts are not clipped (skimage clips them), which keeps
    ``scale=1, shift=0`` an exact identity.
    """
    x = torch.as_tensor(image)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    x = x.to(dtype)
    if x.ndim < 3 or x.shape[-3] != 3:
        raise ValueError(f"hed_jitter expects [..., 3, H, W] RGB images, got shape {tuple(x.shape)}")
    to_hed = torch.as_tensor(hed_from_rgb, dtype=dtype, device=x.device)
    to_rgb = torch.as_tensor(rgb_from_hed, dtype=dtype, device=x.device)
    scale_t = torch.as_tensor(scale, dtype=dtype, device=x.device).reshape(3)
    shift_t = torch.as_tensor(shift, dtype=dtype, device=x.device).reshape(3)
    # od' = (od @ to_hed * scale + shift) @ to_rgb = od @ matrix + offset, with od as row vectors (skimage convention)
    matrix = to_hed @ torch.diag(scale_t) @ to_rgb
    offset = shift_t @ to_rgb
    density = -torch.log(x.clamp_min(_OD_FLOOR))
    jittered = torch.einsum("jk,...jhw->...khw", matrix, density) + offset[:, None, None]
    return torch.exp(-jittered).clamp_(0.0, 1.0)


class RandHEDJitter(RandomizableTransform):
    """With probability ``prob``, :func:`hed_jitter` an RGB image ``[3, H, W]`` in [0, 1] with per-image factors
    ``scale ~ U(1 - alpha, 1 + alpha)`` and ``shift ~ U(-beta, beta)`` for each of the three stains."""

    backend = [TransformBackends.TORCH]

    def __init__(self, prob: float = 0.5, alpha: float = 0.05, beta: float = 0.05) -> None:
        RandomizableTransform.__init__(self, prob)
        if alpha < 0 or beta < 0:
            raise BundleInputError(f"RandHEDJitter alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.scale = np.ones(3)
        self.shift = np.zeros(3)

    def randomize(self, data: Any | None = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        self.scale = self.R.uniform(1.0 - self.alpha, 1.0 + self.alpha, size=3)
        self.shift = self.R.uniform(-self.beta, self.beta, size=3)

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return convert_to_tensor(img, track_meta=get_track_meta())
        out = hed_jitter(convert_to_tensor(img, track_meta=False), self.scale, self.shift)
        return convert_to_dst_type(out, dst=img, dtype=out.dtype)[0]


def _factor_range(name: str, value: float | Sequence[float], center: float, bound: tuple[float, float]) -> tuple | None:
    """torchvision's ColorJitter parameter rules: a number v means [center - v, center + v] (clipped to ``bound``),
    a pair is used as given; a range that is just ``center`` means the operation is skipped (``None``)."""
    if isinstance(value, (int, float)):
        if value < 0:
            raise BundleInputError(f"RandColorJitter {name} must be >= 0, got {value}")
        low, high = max(center - float(value), bound[0]), center + float(value)
    else:
        low, high = (float(v) for v in value)
    if not bound[0] <= low <= high <= bound[1]:
        raise BundleInputError(f"RandColorJitter {name} range ({low}, {high}) is not inside {bound}")
    return None if low == high == center else (low, high)


class RandColorJitter(RandomizableTransform):
    """With probability ``prob``, torchvision-style colour jitter of an RGB image ``[3, H, W]`` in [0, 1]:
    brightness, contrast and saturation factors ~ U(max(0, 1 - v), 1 + v), hue shift ~ U(-hue, hue), applied in a
    random order (as ``torchvision.transforms.ColorJitter``); a zero strength skips that operation."""

    backend = [TransformBackends.TORCH]
    operations: tuple[Callable[[torch.Tensor, float], torch.Tensor], ...] = (
        tvf.adjust_brightness,
        tvf.adjust_contrast,
        tvf.adjust_saturation,
        tvf.adjust_hue,
    )

    def __init__(
        self,
        brightness: float | Sequence[float] = 0.5,
        contrast: float | Sequence[float] = 0.5,
        saturation: float | Sequence[float] = 0.5,
        hue: float | Sequence[float] = 0.25,
        prob: float = 0.8,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        inf = float("inf")
        self.ranges = (
            _factor_range("brightness", brightness, 1.0, (0.0, inf)),
            _factor_range("contrast", contrast, 1.0, (0.0, inf)),
            _factor_range("saturation", saturation, 1.0, (0.0, inf)),
            _factor_range("hue", hue, 0.0, (-0.5, 0.5)),
        )
        self.order: list[int] = [0, 1, 2, 3]
        self.factors: list[float | None] = [None, None, None, None]

    def randomize(self, data: Any | None = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        self.order = [int(i) for i in self.R.permutation(4)]
        self.factors = [None if r is None else float(self.R.uniform(r[0], r[1])) for r in self.ranges]

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return convert_to_tensor(img, track_meta=get_track_meta())
        x = convert_to_tensor(img, track_meta=False)
        for index in self.order:
            factor = self.factors[index]
            if factor is not None:
                x = self.operations[index](x, factor)
        return convert_to_dst_type(x, dst=img, dtype=x.dtype)[0]


class RandGrayscale(RandomizableTransform):
    """With probability ``prob``, replace an RGB image ``[3, H, W]`` by its luminance repeated on three channels
    (``torchvision.transforms.v2.functional.rgb_to_grayscale``)."""

    backend = [TransformBackends.TORCH]

    def __init__(self, prob: float = 0.2) -> None:
        RandomizableTransform.__init__(self, prob)

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        if randomize:
            self.randomize(None)
        if not self._do_transform:
            return convert_to_tensor(img, track_meta=get_track_meta())
        out = tvf.rgb_to_grayscale(convert_to_tensor(img, track_meta=False), num_output_channels=3)
        return convert_to_dst_type(out, dst=img, dtype=out.dtype)[0]


class RandGaussianBlur(RandomizableTransform):
    """With probability ``prob``, blur an image ``[C, H, W]`` with an isotropic Gaussian of ``sigma ~ U(sigma)``
    (kernel size ``2 * ceil(3 * sigma) + 1``, reflect padding; ``torchvision.transforms.v2.functional.gaussian_blur``).

    This is UniMatch's blur (PIL ``GaussianBlur(radius=sigma)``). MONAI's ``RandGaussianSmoothd`` would also work on
    ``[3, H, W]`` but draws independent x/y sigmas and zero-pads, which darkens a band of about ``3 * sigma`` pixels
    along the patch border (a constant 0.8 image becomes 0.29 in the corners at sigma 2).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0), prob: float = 0.5) -> None:
        RandomizableTransform.__init__(self, prob)
        low, high = (float(v) for v in sigma)
        if not 0.0 < low <= high:
            raise BundleInputError(f"RandGaussianBlur sigma range must satisfy 0 < min <= max, got {tuple(sigma)}")
        self.sigma_range = (low, high)
        self.sigma = low

    def randomize(self, data: Any | None = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.sigma = float(self.R.uniform(*self.sigma_range))

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return convert_to_tensor(img, track_meta=get_track_meta())
        x = convert_to_tensor(img, track_meta=False)
        size = 2 * math.ceil(3.0 * self.sigma) + 1
        size = min(size, 2 * ((min(x.shape[-2:]) - 1) // 2) + 1)  # reflect padding needs pad < image size
        out = tvf.gaussian_blur(x, kernel_size=[size, size], sigma=[self.sigma, self.sigma])
        return convert_to_dst_type(out, dst=img, dtype=out.dtype)[0]


class _RandDictWrapper(RandomizableTransform, MapTransform):
    """MONAI's dictionary pattern (as ``RandGaussianSmoothd``): the wrapper draws ``prob``, the wrapped array
    transform (built with ``prob=1``) draws its parameters once per call, shared by all keys."""

    def __init__(self, keys: KeysCollection, prob: float, transform: RandomizableTransform, allow_missing_keys: bool):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.transform = transform

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> _RandDictWrapper:
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            for key in self.key_iterator(d):
                d[key] = convert_to_tensor(d[key], track_meta=get_track_meta())
            return d
        self.transform.randomize(None)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key], randomize=False)
        return d


class RandHEDJitterd(_RandDictWrapper):
    """Dictionary version of :class:`RandHEDJitter`."""

    backend = RandHEDJitter.backend

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        alpha: float = 0.05,
        beta: float = 0.05,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob, RandHEDJitter(prob=1.0, alpha=alpha, beta=beta), allow_missing_keys)


class RandGaussianBlurd(_RandDictWrapper):
    """Dictionary version of :class:`RandGaussianBlur`."""

    backend = RandGaussianBlur.backend

    def __init__(
        self,
        keys: KeysCollection,
        sigma: Sequence[float] = (0.1, 2.0),
        prob: float = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob, RandGaussianBlur(sigma=sigma, prob=1.0), allow_missing_keys)


class RandColorJitterd(_RandDictWrapper):
    """Dictionary version of :class:`RandColorJitter`."""

    backend = RandColorJitter.backend

    def __init__(
        self,
        keys: KeysCollection,
        brightness: float | Sequence[float] = 0.5,
        contrast: float | Sequence[float] = 0.5,
        saturation: float | Sequence[float] = 0.5,
        hue: float | Sequence[float] = 0.25,
        prob: float = 0.8,
        allow_missing_keys: bool = False,
    ) -> None:
        jitter = RandColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue, prob=1.0)
        super().__init__(keys, prob, jitter, allow_missing_keys)


class RandGrayscaled(_RandDictWrapper):
    """Dictionary version of :class:`RandGrayscale`."""

    backend = RandGrayscale.backend

    def __init__(self, keys: KeysCollection, prob: float = 0.2, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, prob, RandGrayscale(prob=1.0), allow_missing_keys)


class RandZoomCropd(RandomizableTransform, MapTransform):
    """A random isotropic zoom and a random crop of ``roi_size``, done as crop first, then resize.

    What ``RandZoomd(keep_size=False)`` + ``SpatialPadd(mode="symmetric")`` + ``RandSpatialCropd`` give, without
    zooming the whole image: a window of ``roi_size / zoom`` pixels (``zoom ~ U(min_zoom, max_zoom)``) is cut at a
    uniform position (the image padded symmetrically first where the window is larger) and resized to ``roi_size``.
    The cost no longer grows with the image, which at full GlaS resolution and zoom 2 is a 4x larger array per sample.
    Every key gets the same window; ``mode`` is the interpolation of each key (``nearest-exact`` for labels).
    """

    def __init__(
        self,
        keys: KeysCollection,
        roi_size: Sequence[int],
        min_zoom: float = 1.0,
        max_zoom: float = 1.0,
        mode: str | Sequence[str] = "bilinear",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.roi_size = tuple(int(v) for v in roi_size)
        if len(self.roi_size) != 2 or min(self.roi_size) < 1:
            raise BundleInputError(f"patch_size must be two positive sizes, got {list(roi_size)}")
        if not 0 < float(min_zoom) <= float(max_zoom):
            raise BundleInputError(f"zoom_range must satisfy 0 < min <= max, got [{min_zoom}, {max_zoom}]")
        self.min_zoom, self.max_zoom = float(min_zoom), float(max_zoom)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self._window: tuple[int, ...] = self.roi_size
        self._start: tuple[int, ...] = (0, 0)

    def randomize(self, spatial_shape: Sequence[int]) -> None:
        zoom = self.R.uniform(self.min_zoom, self.max_zoom)
        self._window = tuple(max(1, round(size / zoom)) for size in self.roi_size)
        self._start = tuple(
            int(self.R.randint(0, max(extent, window) - window + 1))
            for extent, window in zip(spatial_shape, self._window, strict=True)
        )

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        self.randomize(d[keys[0]].shape[1:])
        padded = [max(extent, window) for extent, window in zip(d[keys[0]].shape[1:], self._window, strict=True)]
        pad = SpatialPad(padded, mode="symmetric")
        crop = SpatialCrop(roi_start=self._start, roi_end=[s + w for s, w in zip(self._start, self._window)])
        for key, mode in self.key_iterator(d, self.mode):
            out = crop(pad(d[key]))
            if self._window != self.roi_size:
                out = Resize(self.roi_size, mode=mode)(out)
            d[key] = out
        return d
