"""Plain-ViT encoders for TransUNet: any timm ViT ("timm" preset) and the UNI pathology foundation model ("uni").

The ViT runs once through ``forward_intermediates``: its final normed tokens on the 1/16 grid are the feature map,
and three intermediate blocks (deep to shallow) feed learned transposed-conv adapters that upsample them to the 1/8,
1/4 and 1/2 skips. Position embeddings are resampled per input (``dynamic_img_size=True``), so any H, W divisible by
16 works.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import chain
from pathlib import Path

import timm
import torch
from monai.networks.blocks import Convolution
from torch import nn

from bundle.errors import BundleInputError

from .base import EncoderOutput, TransUNetEncoder
from .weights import load_vit_checkpoint

__all__ = ["UNI_ARCH", "UNI_HUB_ID", "SkipAdapter", "ViTEncoder", "build_timm_encoder", "build_uni_encoder"]

logger = logging.getLogger(__name__)

UNI_HUB_ID = "hf-hub:MahmoodLab/UNI"
# exactly how MahmoodLab builds UNI (ViT-L/16, DINOv2); its pytorch_model.bin loads strictly into this model
UNI_ARCH = {
    "model_name": "vit_large_patch16_224",
    "img_size": 224,
    "patch_size": 16,
    "init_values": 1e-5,
    "num_classes": 0,
    "dynamic_img_size": True,
}
DEFAULT_SKIP_CHANNELS = (256, 128, 64)


class SkipAdapter(nn.Sequential):
    """Upsample a 1/16 ViT map by 2**``num_upsamples`` with 2x2 stride-2 transposed conv - BN - ReLU layers."""

    def __init__(self, in_channels: int, out_channels: int, num_upsamples: int) -> None:
        layers = [
            Convolution(
                2,
                in_channels if i == 0 else out_channels,
                out_channels,
                strides=2,
                kernel_size=2,
                padding=0,
                output_padding=0,
                is_transposed=True,
                act="RELU",
                norm="BATCH",
                bias=False,
            )
            for i in range(num_upsamples)
        ]
        super().__init__(*layers)


def default_skip_indices(depth: int) -> tuple[int, int, int]:
    """Blocks feeding the 1/8, 1/4 and 1/2 skips: deeper blocks for coarser skips (3/4, 1/2, 1/4 of the depth)."""
    return (3 * depth // 4, depth // 2, depth // 4)


class ViTEncoder(TransUNetEncoder):
    """Wrap a timm ViT (``num_classes=0``, ``dynamic_img_size=True``) as a TransUNet encoder with upsampled skips."""

    def __init__(
        self,
        vit: nn.Module,
        skip_indices: Sequence[int] | None = None,
        skip_channels: Sequence[int] = DEFAULT_SKIP_CHANNELS,
        name: str = "vit",
    ) -> None:
        super().__init__()
        if not hasattr(vit, "forward_intermediates") or not hasattr(vit, "blocks"):
            raise BundleInputError(f"timm model {name} is not a plain ViT with forward_intermediates and blocks")
        patch = tuple(getattr(getattr(vit, "patch_embed", None), "patch_size", ()))
        if patch != (self.patch_size, self.patch_size):
            raise BundleInputError(f"timm model {name} has patch size {patch}; TransUNet needs 16x16 patches")
        depth = len(vit.blocks)
        indices = default_skip_indices(depth) if skip_indices is None else tuple(int(i) for i in skip_indices)
        if len(indices) != 3 or not all(-depth <= i < depth for i in indices):
            raise BundleInputError(
                f"encoder option skip_indices must be 3 block indices in [-{depth}, {depth}) for {name}, got {indices}"
            )
        skip_channels = tuple(int(c) for c in skip_channels)
        if len(skip_channels) != 3:
            raise BundleInputError(
                f"encoder option skip_channels must list 3 widths (1/8, 1/4, 1/2), got {skip_channels}"
            )
        self.vit = vit
        self.name = name
        self.skip_indices = tuple(i % depth for i in indices)
        self._taken = sorted(set(self.skip_indices))
        self.out_channels = int(vit.embed_dim)
        self.skip_channels = skip_channels
        self.skip_adapters = nn.ModuleList(
            SkipAdapter(self.out_channels, channels, num_upsamples=level + 1)
            for level, channels in enumerate(skip_channels)
        )

    @property
    def backbone(self) -> nn.Module:
        return self.vit

    def forward(self, image: torch.Tensor) -> EncoderOutput:
        final, intermediates = self.vit.forward_intermediates(image, indices=self._taken, output_fmt="NCHW")
        by_block = dict(zip(self._taken, intermediates))
        batch, _, height, width = image.shape
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        tokens = final[:, self.vit.num_prefix_tokens :]
        features = tokens.transpose(1, 2).reshape(batch, self.out_channels, grid_h, grid_w)
        skips = [adapter(by_block[i]) for adapter, i in zip(self.skip_adapters, self.skip_indices)]
        return EncoderOutput(features, skips)


def build_timm_encoder(
    img_size: int = 256,
    in_channels: int = 3,
    model_name: str = "vit_small_patch16_224",
    pretrained: bool = False,
    checkpoint_path: str | Path | None = None,
    skip_indices: Sequence[int] | None = None,
    skip_channels: Sequence[int] = DEFAULT_SKIP_CHANNELS,
    grad_checkpointing: bool = False,
    **timm_kwargs,
) -> ViTEncoder:
    """Any timm ViT; weights from timm's hub (``pretrained``) and/or a local ``checkpoint_path`` (loaded last).

    ``grad_checkpointing`` recomputes the ViT blocks in the backward pass (less memory, more compute); other
    keyword arguments go to ``timm.create_model``.
    """
    try:
        vit = timm.create_model(
            model_name,
            pretrained=pretrained,
            num_classes=0,
            dynamic_img_size=True,
            img_size=img_size,
            in_chans=in_channels,
            **timm_kwargs,
        )
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise BundleInputError(f"encoder option model_name {model_name!r} is not a timm model") from error
        raise
    if checkpoint_path is not None:
        load_vit_checkpoint(vit, checkpoint_path, arch=model_name)
    elif not pretrained:
        logger.info("timm encoder %s starts from random weights", model_name)
    vit.set_grad_checkpointing(grad_checkpointing)
    return ViTEncoder(vit, skip_indices=skip_indices, skip_channels=skip_channels, name=model_name)


def build_uni_encoder(
    img_size: int = 256,
    in_channels: int = 3,
    checkpoint_path: str | Path | None = None,
    from_hub: bool = False,
    skip_indices: Sequence[int] | None = None,
    skip_channels: Sequence[int] = DEFAULT_SKIP_CHANNELS,
    grad_checkpointing: bool = False,
) -> ViTEncoder:
    """UNI (ViT-L/16) built as MahmoodLab builds it; ``img_size`` is unused (the ViT resamples its 224 grid).

    Weights: a local ``checkpoint_path`` (UNI's pytorch_model.bin or a .safetensors, loaded strictly), else the
    gated hub repo when ``from_hub`` (needs the user's Hugging Face login), else random with a warning.
    ``grad_checkpointing`` recomputes the ViT blocks in the backward pass (less memory, more compute).
    """
    if in_channels != 3:
        raise BundleInputError(f"the uni encoder takes RGB images (in_channels 3), got in_channels {in_channels}")
    if not isinstance(from_hub, bool):
        raise BundleInputError(f"encoder option from_hub must be True or False, got {from_hub!r}")
    if checkpoint_path is not None and from_hub:
        raise BundleInputError("encoder options checkpoint_path and from_hub=True exclude each other for uni")
    arch = dict(UNI_ARCH)
    model_name = arch.pop("model_name")
    if from_hub:
        vit = timm.create_model(UNI_HUB_ID, pretrained=True, **{k: v for k, v in arch.items() if k != "patch_size"})
    elif checkpoint_path is not None:
        with torch.device("meta"):  # skip ViT-L's random init (seconds); every tensor comes from the file
            vit = timm.create_model(model_name, **arch)
        load_vit_checkpoint(vit, checkpoint_path, arch=f"UNI ({model_name})", assign=True)
        left_on_meta = [name for name, tensor in chain(vit.named_parameters(), vit.named_buffers()) if tensor.is_meta]
        if left_on_meta:  # only tensors outside the state dict (non-persistent buffers) can be left behind
            raise RuntimeError(f"UNI tensors not set by the checkpoint: {', '.join(left_on_meta)}")
    else:
        logger.warning("uni encoder has random weights: set encoder_kwargs checkpoint_path (or from_hub=True)")
        vit = timm.create_model(model_name, **arch)
    vit.set_grad_checkpointing(grad_checkpointing)
    return ViTEncoder(vit, skip_indices=skip_indices, skip_channels=skip_channels, name="uni")
