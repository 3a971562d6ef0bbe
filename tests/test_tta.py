"""Test-time augmentation (``--tta``, bundle/inference/tta.py): each window predicted in flipped views, averaged back.

The expected values are computed by hand: a network whose logits depend only on the position inside the view it is
given (not on the image) shows whether each view's output is put back where it belongs, and a pixel-wise network
(flip-equivariant) must give exactly its own probabilities in every mode, also on a non-square window.
"""

from __future__ import annotations

import math

import pytest
import torch
from monai.bundle import ConfigParser

from bundle.errors import BundleInputError
from bundle.inference import FlipAveraging, FlipInferer, check_tta

LN3 = math.log(3.0)  # sigmoid(ln 3) = 0.75


def corner_network(x: torch.Tensor) -> torch.Tensor:
    """Class 1 gets logit ln 3 at the view's top-left pixel and 0 elsewhere; class 0 gets 0 (probability 0.75 / 0.5)."""
    logits = torch.zeros(x.shape[0], 2, *x.shape[2:])
    logits[:, 1, 0, 0] = LN3
    return logits


def row_network(x: torch.Tensor) -> torch.Tensor:
    """Class 1 logits 0, ln 3, ln 3 along a 1 x 3 view's row, whatever the image."""
    logits = torch.zeros(x.shape[0], 2, *x.shape[2:])
    logits[:, 1, 0] = torch.tensor([0.0, LN3, LN3])
    return logits


def pixel_network(x: torch.Tensor) -> torch.Tensor:
    """A pixel-wise network (commutes with every flip and transpose)."""
    return torch.stack([x[:, 0] - x[:, 1], 2.0 * x[:, 2]], dim=1)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("none", [[0.75, 0.5], [0.5, 0.5]]),
        # each pixel of a 2 x 2 window is the top-left one in 1 of the 4 flips, 2 of the 8 dihedral views
        ("flips", [[0.5625, 0.5625], [0.5625, 0.5625]]),
        ("dihedral", [[0.5625, 0.5625], [0.5625, 0.5625]]),
    ],
)
def test_views_are_put_back_and_probabilities_averaged(mode, expected):
    out = FlipAveraging(corner_network, mode)(torch.zeros(1, 3, 2, 2))
    assert torch.allclose(torch.softmax(out, dim=1)[0, 1], torch.tensor(expected), atol=1e-6)


def test_horizontal_flip_is_undone_on_a_row():
    # views: identity and vertical flip give 0, ln3, ln3; the horizontal ones give ln3, ln3, 0 once put back
    out = FlipAveraging(row_network, "flips")(torch.zeros(1, 3, 1, 3))
    assert torch.allclose(torch.softmax(out, dim=1)[0, 1, 0], torch.tensor([0.625, 0.75, 0.625]), atol=1e-6)


@pytest.mark.parametrize("mode", ["flips", "dihedral"])
def test_an_equivariant_network_keeps_its_probabilities_on_a_non_square_window(mode):
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    out = FlipAveraging(pixel_network, mode)(x)
    assert out.shape == (2, 2, 5, 7)
    assert torch.allclose(out, torch.log_softmax(pixel_network(x), dim=1), atol=1e-5)


def test_half_precision_logits_give_float32_on_the_input_device():
    x = torch.randn(1, 3, 4, 4)
    out = FlipAveraging(lambda v: pixel_network(v).half(), "dihedral")(x)
    assert out.dtype == torch.float32 and out.device == x.device
    assert torch.allclose(out, torch.log_softmax(pixel_network(x).half().float(), dim=1), atol=1e-5)


def test_none_is_the_network_itself_and_views_cost_one_pass_each():
    calls = []

    def network(v):
        calls.append(tuple(v.shape))
        return pixel_network(v)

    x = torch.zeros(1, 3, 4, 6)
    assert torch.equal(FlipAveraging(network, "none")(x), pixel_network(x))  # raw logits, one call
    FlipAveraging(network, "dihedral")(x)
    assert calls == [(1, 3, 4, 6)] * 5 + [(1, 3, 6, 4)] * 4


@pytest.mark.parametrize("mode", ["flip", "", None, 4, "Flips"])
def test_other_modes_are_refused_naming_the_option(mode):
    with pytest.raises(BundleInputError, match=r"^--tta must be one of none, flips, dihedral, got "):
        check_tta(mode)
    with pytest.raises(BundleInputError):
        FlipInferer(lambda x, n: n(x), mode)


@pytest.mark.parametrize(
    "config, inferer_id", [("configs/inference.json", "inferer"), ("configs/train.json", "validate#inferer")]
)
def test_the_configs_inferers_run_every_window_in_each_view(config, inferer_id):
    parser = ConfigParser()
    parser.read_config(config)
    parser.update({"patch_size": [64, 64], "sw_overlap": 0.5, "sw_batch_size": 1, "image_scale": 0.5, "tta": "flips"})
    inferer = parser.get_parsed_content(inferer_id)
    assert inferer.roi_size == (128, 128)  # the window in input pixels, through both wrappers
    calls = []

    def network(x):
        calls.append(tuple(x.shape))
        return corner_network(x)

    out = inferer(torch.zeros(1, 3, 320, 320), network)
    assert out.shape == (1, 2, 320, 320)
    assert calls == [(1, 3, 64, 64)] * 64  # 16 windows (starts 0, 32, 64, 96 per axis) x 4 views
