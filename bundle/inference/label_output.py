"""The last step of ``postprocessing``: the class map as a label in MONAI's (x, y) order, the form MONAI Label saves.

The bundle works in natural (row, column) order: its reader gives ``[C, H, W]`` and ``spatial_shape`` = (H, W), and
its own writers (``SaveSegmentationd``, run by the CLI after the class map is made) write that order. MONAI Label
follows MONAI's convention for 2D images instead (``PILReader``'s default: axis 0 is x): after a bundle's
``postprocessing`` it runs ``Restored`` (which resizes the prediction to the image's ``spatial_shape`` when their
sizes differ and keeps a ``[1, ...]`` map three-dimensional) and then its ``Writer``, which transposes every array
before ITK writes it. A 2-D (x, y) label with an (x, y) ``spatial_shape`` passes both unchanged and comes out as a
file of the image's width x height. :class:`LabelOutputd` produces exactly that; in ``configs/inference.json`` the
CLI's writers come after it (``SaveSegmentationd(xy_order=True)`` swaps the axes back), and MONAI Label drops them
as it drops every ``SaveImaged``:

- ``keys``: ``[1, H, W]`` class map -> ``[W, H]`` uint8 class indices on the CPU (a ``MetaTensor`` whose
  ``spatial_shape`` is (W, H));
- the reference image's metadata: ``spatial_shape`` restated in the same (x, y) order (a new ``MetaTensor`` sharing
  the pixels, so nothing the caller still holds is changed);
- ``result_extension``: ``.png`` for a JPEG input unless the request chose one, as a label must not be written
  with lossy compression.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = ["LabelOutputd", "LOSSY_SUFFIXES"]

LOSSY_SUFFIXES = (".jpg", ".jpeg")


class LabelOutputd(MapTransform):
    """``[1, H, W]`` class map -> ``[W, H]`` uint8 label in MONAI's (x, y) order (see the module docstring).

    Args:
        keys: the class maps (``pred``).
        ref_image: the input image's key; its ``spatial_shape`` is restated in (x, y) order.
        image_path_key / extension_key: where MONAI Label keeps the input's path and the result's file extension.
    """

    def __init__(
        self,
        keys: KeysCollection,
        ref_image: str = "image",
        image_path_key: str = "image_path",
        extension_key: str = "result_extension",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_image = ref_image
        self.image_path_key = image_path_key
        self.extension_key = extension_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.label(d[key])
        image = d.get(self.ref_image)
        if isinstance(image, MetaTensor) and image.ndim == 3:
            meta = dict(image.meta)
            meta["spatial_shape"] = np.asarray(image.shape[1:][::-1])
            d[self.ref_image] = MetaTensor(image.as_tensor(), meta=meta, applied_operations=image.applied_operations)
        path = d.get(self.image_path_key)
        if isinstance(path, str) and path.lower().endswith(LOSSY_SUFFIXES) and not d.get(self.extension_key):
            d[self.extension_key] = ".png"
        return d

    @staticmethod
    def label(mask) -> MetaTensor:
        """``[1, H, W]`` (or ``[H, W]``) class map -> ``[W, H]`` uint8 ``MetaTensor`` on the CPU (writers need it)."""
        values = torch.as_tensor(mask).detach().cpu()
        values = values.as_tensor() if isinstance(values, MetaTensor) else values
        if values.ndim == 3 and values.shape[0] == 1:
            values = values[0]
        if values.ndim != 2:
            raise ValueError(f"LabelOutputd expects a [1, H, W] class map, got shape {tuple(values.shape)}")
        if values.is_floating_point() and not torch.equal(values, values.round()):
            raise ValueError("LabelOutputd expects class indices (run the argmax first), got fractional values")
        if values.numel() and (values.min() < 0 or values.max() > 255):
            raise ValueError(f"LabelOutputd writes uint8 labels: classes must be 0-255, got {values.max().item()}")
        meta = dict(mask.meta) if isinstance(mask, MetaTensor) else {}
        meta["spatial_shape"] = np.asarray(values.shape[::-1])
        return MetaTensor(values.T.to(torch.uint8).contiguous(), meta=meta)
