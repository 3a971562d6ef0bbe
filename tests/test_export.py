"""ONNX and TorchScript export of ``network_def`` with MONAI's bundle scripts, checked against PyTorch on real GlaS.

The exports are the README's commands, called through their Python API (``monai.bundle.onnx_export`` and
``ckpt_export`` are what ``python -m monai.bundle onnx_export|ckpt_export`` run) on ``configs/inference.json`` with a
tiny network. Its weights are a random initialisation made less trivial: random BatchNorm statistics (so that the
exporters' Conv+BN folding is exercised), a segmentation head scaled so that the logits span +-16, and the gland
logit's bias centred so that half of the test image's pixels are glands.

Tolerance: float32 logits computed by two kernel libraries (ONNX Runtime folds BatchNorm into the convolutions and
has its own convolution/GEMM kernels) differ by rounding only, about 1e-5 here. ``ATOL = 1e-3`` is a hundred times
that and ten times below what a wrong graph gives: shifting the running mean of a single BatchNorm layer by 0.1
moves the logits by 1e-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, onnx_export
from monai.data import load_net_with_metadata
from monai.transforms import CenterSpatialCrop, DivisiblePad
from torch.export import Dim

REPO_ROOT = Path(__file__).resolve().parents[1]
INFERENCE_JSON = REPO_ROOT / "configs" / "inference.json"
METADATA_JSON = REPO_ROOT / "configs" / "metadata.json"

TINY_NETWORK = {
    "encoder_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2, "stem_channels": [8, 16, 32]},
    "head_channels": 32,
    "decoder_channels": [32, 16, 16, 8],
    "embedding_dim": 16,
}
ATOL = 1e-3
IMAGE_NAME = "testA_2"  # 589 x 453 pixels: neither side divisible by 16


def inference_parser(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(INFERENCE_JSON))
    parser.read_meta(str(METADATA_JSON))
    parser.update(overrides)
    return parser


def build_network(weights: Path | None = None) -> torch.nn.Module:
    network = inference_parser(**TINY_NETWORK).get_parsed_content("network_def")
    if weights is not None:
        network.load_state_dict(torch.load(weights, weights_only=True))
    return network.eval()


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory, glas_image) -> Path:
    torch.manual_seed(0)
    network = build_network()
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
        network.segmentation_head.weight.mul_(200.0)
        logits = network(DivisiblePad(k=16)(glas_image)[None])
        network.segmentation_head.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def glas_image(glas_dir) -> torch.Tensor:
    """A real GlaS image after inference.json's own preprocessing: [3, 453, 589], ImageNet-normalised."""
    preprocessing = inference_parser().get_parsed_content("preprocessing")
    image = preprocessing({"image": str(glas_dir / "images" / f"{IMAGE_NAME}.png")})["image"]
    assert tuple(image.shape) == (3, 453, 589)
    return image.as_tensor()


def pytorch_logits(network: torch.nn.Module, batch: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return network(batch).numpy()


def assert_same_logits(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert np.abs(expected).max() > 5.0, "logits too small for the tolerance to mean anything"
    assert 0.2 < (expected.argmax(1) == 1).mean() < 0.8, "both classes must be predicted for the argmax check"
    assert np.abs(actual - expected).max() < ATOL
    decided = np.abs(expected[:, 1] - expected[:, 0]) > 2 * ATOL  # pixels whose class no rounding can flip
    assert np.array_equal(actual.argmax(1)[decided], expected.argmax(1)[decided])


def test_onnx_export_with_dynamic_height_and_width_matches_pytorch(tmp_path, tiny_weights, glas_image):
    filepath = tmp_path / "model.onnx"
    onnx_export(
        net_id="network_def",
        filepath=str(filepath),
        ckpt_file=str(tiny_weights),
        meta_file=str(METADATA_JSON),
        config_file=str(INFERENCE_JSON),
        input_shape=[2, 3, 256, 256],
        use_trace=True,
        converter_kwargs={
            "input_names": ["image"],
            "output_names": ["pred"],
            # the input's height and width are any multiple of 16 (what the network accepts); batch is free
            "dynamic_shapes": {
                "image": {
                    0: Dim("batch", max=1024),
                    2: 16 * Dim("height16", min=2, max=1024),
                    3: 16 * Dim("width16", min=2, max=1024),
                }
            },
        },
        **TINY_NETWORK,
    )
    session = ort.InferenceSession(str(filepath), providers=["CPUExecutionProvider"])
    (onnx_input,), (onnx_output,) = session.get_inputs(), session.get_outputs()
    assert (onnx_input.name, onnx_output.name) == ("image", "pred")
    assert onnx_input.shape[1] == 3 and all(
        isinstance(dim, str) for dim in onnx_input.shape[::2] + onnx_input.shape[3:]
    )

    network = build_network(tiny_weights)
    whole = DivisiblePad(k=16)(glas_image)[None]  # [1, 3, 464, 592]: the whole image, zero-padded
    crops = torch.stack([CenterSpatialCrop((256, 256))(glas_image), glas_image[:, :256, :256]])  # [2, 3, 256, 256]
    assert tuple(whole.shape) == (1, 3, 464, 592)
    for batch in (whole, crops):
        logits = session.run(None, {"image": batch.numpy()})[0]
        assert_same_logits(logits, pytorch_logits(network, batch))


def test_torchscript_export_matches_pytorch_at_any_size(tmp_path, tiny_weights, glas_image):
    filepath = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(filepath),
        ckpt_file=str(tiny_weights),
        meta_file=str(METADATA_JSON),
        config_file=str(INFERENCE_JSON),
        use_trace=True,
        input_shape=[1, 3, 256, 256],
        **TINY_NETWORK,
    )
    module, meta, extra_files = load_net_with_metadata(str(filepath), more_extra_files=["inference.json"])
    assert meta["version"] == json.loads(METADATA_JSON.read_text())["version"]
    assert json.loads(extra_files["inference.json"])["network_def"]["_target_"] == "bundle.networks.TransUNet"

    network = build_network(tiny_weights)
    crop = CenterSpatialCrop((256, 256))(glas_image)[None]
    whole = DivisiblePad(k=16)(glas_image)[None]  # traced at 256 x 256, the module still follows the input's size
    for batch in (crop, whole):
        with torch.no_grad():
            logits = module(batch).numpy()
        assert_same_logits(logits, pytorch_logits(network, batch))
