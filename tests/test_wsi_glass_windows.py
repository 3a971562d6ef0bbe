"""Glass-window skipping (``bundle.wsi.glass_windows``) on hand-made windows: which windows run, what the others
give, MONAI's padding of a small tile window, and a half-precision network (the dtype a CUDA autocast produces)."""

from __future__ import annotations

import numpy as np
import torch
from monai.inferers import SimpleInferer, SlidingWindowInferer

from bundle.wsi.glass_windows import GLASS_LOGIT, GlassWindowPredictor, coordinate_inferer


class Counting(torch.nn.Module):
    """Logits (background 0, gland = red channel - 0.5) and the windows seen, in the output's dtype."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.dtype, self.batches = dtype, []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, :1] - 0.5], dim=1).to(self.dtype)


def box_test(tissue: np.ndarray):
    """``touches_tissue`` for a boolean map in the tile window's pixels (boxes clipped to it)."""

    def touches(y0, x0, y1, x1):
        y0, x0 = max(y0, 0), max(x0, 0)
        return bool(tissue[y0:y1, x0:x1].any())

    return touches


def run(image, tissue, roi=(32, 32), overlap=0.5, dtype=torch.float32, sw_batch_size=3):
    network = Counting(dtype)
    inferer = SlidingWindowInferer(roi_size=roi, overlap=overlap, sw_batch_size=sw_batch_size)
    predictor = GlassWindowPredictor(network, box_test(tissue), image.shape[-2:], roi, num_classes=2)
    with torch.no_grad():
        skipped = coordinate_inferer(inferer)(image, predictor)
        plain = inferer(image, Counting(dtype))
    return skipped, plain, predictor, network


def test_tissue_windows_run_and_glass_windows_are_background():
    """96 x 96 window, 32-px windows with stride 16 (5 x 5 = 25 windows); tissue at rows/cols 40-55 touches the
    windows starting at 16, 32 and 48 on each axis (9 of 25). Pixels covered by tissue windows only get exactly the
    plain result; the rest is background."""
    image = torch.full((1, 3, 96, 96), 0.9)  # "gland" everywhere for this network
    tissue = np.zeros((96, 96), bool)
    tissue[40:56, 40:56] = True
    skipped, plain, predictor, network = run(image, tissue)
    assert (predictor.computed, predictor.skipped) == (9, 16) and sum(network.batches) == 9
    # pixels 32-63 on both axes are covered only by windows starting at 16, 32, 48: all tissue windows
    np.testing.assert_allclose(skipped[..., 32:64, 32:64], plain[..., 32:64, 32:64], rtol=1e-6)
    # every other pixel is covered by at least one glass window: background wins
    labels = skipped.argmax(1)[0]
    outside = np.ones((96, 96), bool)
    outside[32:64, 32:64] = False
    assert not labels.numpy()[outside].any() and labels[32:64, 32:64].all()
    assert torch.isfinite(skipped).all()


def test_all_tissue_and_all_glass():
    image = torch.full((1, 3, 64, 64), 0.9)
    skipped, plain, predictor, _ = run(image, np.ones((64, 64), bool))
    assert predictor.skipped == 0 and predictor.computed == 9
    torch.testing.assert_close(skipped, plain)
    skipped, _, predictor, network = run(image, np.zeros((64, 64), bool))
    assert predictor.computed == 0 and predictor.skipped == 9 and network.batches == []
    assert skipped.shape == plain.shape and (skipped.argmax(1) == 0).all()
    torch.testing.assert_close(torch.softmax(skipped, 1)[:, 0], torch.ones(1, 64, 64))


def test_small_window_padded_by_monai():
    """A 28 x 20 tile window and 32-px windows: MONAI pads (2, 6) px before, so the box asked about is the window's
    place in the tile window's own pixels, reaching past it by the padding on both sides."""
    image = torch.full((1, 3, 28, 20), 0.9)
    boxes = []
    predictor = GlassWindowPredictor(Counting(), lambda *box: boxes.append(box) or True, (28, 20), (32, 32), 2)
    inferer = SlidingWindowInferer(roi_size=(32, 32), overlap=0.5)
    with torch.no_grad():
        skipped = coordinate_inferer(inferer)(image, predictor)
        plain = inferer(image, Counting())
    assert predictor.pad == [2, 6] and boxes == [(-2, -6, 30, 26)]
    torch.testing.assert_close(skipped, plain)


def test_half_precision_network_stays_finite():
    """A float16/bfloat16 network output (CUDA autocast) is blended with the glass logits without inf or NaN."""
    image = torch.full((1, 3, 96, 96), 0.9)
    tissue = np.zeros((96, 96), bool)
    tissue[40:56, 40:56] = True
    for dtype in (torch.bfloat16, torch.float16):
        skipped, plain, predictor, _ = run(image, tissue, dtype=dtype)
        assert torch.isfinite(skipped).all() and predictor.skipped == 16
        assert skipped.argmax(1)[0, 32:64, 32:64].all() and skipped.argmax(1)[0, :16].sum() == 0
        assert GLASS_LOGIT <= torch.finfo(dtype).max


def test_coordinate_inferer_copies_and_refuses_what_it_cannot_skip():
    inferer = SlidingWindowInferer(roi_size=(32, 32))
    clone = coordinate_inferer(inferer)
    assert clone is not inferer and clone.with_coord and not inferer.with_coord
    assert coordinate_inferer(SimpleInferer()) is None
    assert coordinate_inferer(SlidingWindowInferer(roi_size=(32, 32), buffer_steps=2)) is None
