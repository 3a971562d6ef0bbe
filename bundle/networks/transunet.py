"""TransUNet for MPAMatch: a preset encoder, TransUNet's cascaded upsampler (CUP), a projection head and the FP stream.

``net(x)`` returns logits only (MONAI inferers, MONAI Label, export). Training code asks for more explicitly:
``net(x, perturb_from=k, return_embedding=True)`` returns a dict with "logits", "logits_fp" (the decoder on a
feature-perturbed copy of samples k..B-1, decoded in the same pass as the clean batch, as UniMatch's FP stream) and
"embedding" (per-pixel L2-normalised projections of a decoder map, 1/4 resolution by default).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from bundle.errors import BundleInputError

from .encoders import build_encoder

__all__ = ["CUPDecoder", "DecoderBlock", "ProjectionHead", "TransUNet", "conv_bn_relu"]


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> Convolution:
    """Conv (no bias) - BatchNorm - ReLU, "same" padding."""
    return Convolution(2, in_channels, out_channels, kernel_size=kernel_size, act="RELU", norm="BATCH", bias=False)


class DecoderBlock(nn.Module):
    """x2 bilinear upsample, concatenate the skip (if any), two 3x3 conv-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.convs = nn.Sequential(
            conv_bn_relu(in_channels + skip_channels, out_channels), conv_bn_relu(out_channels, out_channels)
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.upsample(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.convs(x)


class CUPDecoder(nn.Module):
    """TransUNet's cascaded upsampler: 3x3 conv to ``head_channels``, then one :class:`DecoderBlock` per width.

    Block i takes skip i when there is one (1/8, 1/4, 1/2 for the first three blocks; the last block, to full
    resolution, takes the network's full-resolution skip when it has one). ``forward`` returns every block's output
    (coarse to fine).
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: Sequence[int],
        head_channels: int = 512,
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
    ) -> None:
        super().__init__()
        decoder_channels = tuple(int(c) for c in decoder_channels)
        skips = tuple(skip_channels)[: len(decoder_channels)]
        skips = skips + (0,) * (len(decoder_channels) - len(skips))
        inputs = (head_channels,) + decoder_channels[:-1]
        self.conv_more = conv_bn_relu(in_channels, head_channels)
        self.blocks = nn.ModuleList(
            DecoderBlock(inputs[i], skips[i], decoder_channels[i]) for i in range(len(decoder_channels))
        )
        self.num_skips = sum(1 for c in skips if c)

    def forward(self, features: torch.Tensor, skips: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x = self.conv_more(features)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < self.num_skips else None)
            outputs.append(x)
        return outputs


class ProjectionHead(nn.Sequential):
    """Per-pixel projection g: 1x1 conv - BN - ReLU - 1x1 conv (L2 normalisation is done by the caller)."""

    def __init__(self, in_channels: int, embedding_dim: int = 128) -> None:
        super().__init__(
            conv_bn_relu(in_channels, in_channels, kernel_size=1), nn.Conv2d(in_channels, embedding_dim, kernel_size=1)
        )


class TransUNet(nn.Module):
    """TransUNet with a preset encoder ("hybrid", "timm", "uni"), CUP decoder, projection head and FP stream.

    Args:
        num_classes: output channels of the logits.
        in_channels: image channels.
        encoder: encoder preset, see :func:`bundle.networks.build_encoder`.
        encoder_kwargs: options of the preset.
        img_size: size the encoder's position embedding is built for (other sizes divisible by 16 also work).
        decoder_channels: widths of the four CUP blocks (1/8, 1/4, 1/2, 1/1).
        head_channels: width of the conv applied to the encoder's 1/16 map.
        embedding_dim: channels D of the per-pixel embedding.
        projection_level: decoder block whose output feeds the projection head (1: the 1/4 map).
        full_res_skip: channels of a full-resolution skip (two 3x3 conv-BN-ReLU on the image) into the last decoder
            block; 0: none, as TransUNet. Without it the 1-3 px gaps between neighbouring glands are decoded from
            1/2-resolution features only, and touching glands merge.
        fp_dropout: channel-dropout rate of the feature-perturbation stream (active in train mode only).
        freeze_encoder: keep the encoder backbone fixed (no gradients, always in eval mode).
    """

    def __init__(
        self,
        num_classes: int = 2,
        in_channels: int = 3,
        encoder: str = "hybrid",
        encoder_kwargs: dict | None = None,
        img_size: int = 256,
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
        head_channels: int = 512,
        embedding_dim: int = 128,
        projection_level: int = 1,
        fp_dropout: float = 0.5,
        freeze_encoder: bool = False,
        full_res_skip: int = 0,
    ) -> None:
        super().__init__()
        decoder_channels = tuple(int(c) for c in decoder_channels)
        if num_classes < 1:
            raise BundleInputError(f"num_classes must be at least 1, got {num_classes}")
        self.encoder = build_encoder(encoder, img_size=img_size, in_channels=in_channels, **(encoder_kwargs or {}))
        self.patch_size = self.encoder.patch_size
        if 2 ** len(decoder_channels) != self.patch_size:
            raise BundleInputError(
                f"decoder_channels {decoder_channels} must have 4 widths (four x2 blocks undo the 1/16 patch grid)"
            )
        if not 0 <= projection_level < len(decoder_channels):
            raise BundleInputError(f"projection_level must be in [0, {len(decoder_channels)}), got {projection_level}")
        if not 0.0 <= fp_dropout < 1.0:
            raise BundleInputError(f"fp_dropout must be in [0, 1), got {fp_dropout}")
        self.num_classes = num_classes
        self.projection_level = projection_level
        self.freeze_encoder = freeze_encoder
        if full_res_skip < 0:
            raise BundleInputError(f"full_res_skip must be >= 0 channels, got {full_res_skip}")
        self.full_res_stem = (
            nn.Sequential(conv_bn_relu(in_channels, full_res_skip), conv_bn_relu(full_res_skip, full_res_skip))
            if full_res_skip
            else None
        )
        skip_channels = tuple(self.encoder.skip_channels) + ((int(full_res_skip),) if full_res_skip else ())
        self.decoder = CUPDecoder(self.encoder.out_channels, skip_channels, head_channels, decoder_channels)
        self.segmentation_head = nn.Conv2d(decoder_channels[-1], num_classes, kernel_size=3, padding=1)
        self.projection_head = ProjectionHead(decoder_channels[projection_level], embedding_dim)
        self.feature_perturbation = nn.Dropout2d(fp_dropout)
        if freeze_encoder:
            self.encoder.backbone.requires_grad_(False)
            self.encoder.backbone.eval()

    def train(self, mode: bool = True) -> TransUNet:
        """Set train/eval mode; a frozen encoder backbone always stays in eval mode."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.backbone.eval()
        return self

    def parameter_groups(
        self, lr: float, encoder_lr_scale: float = 1.0, weight_decay: float | None = None
    ) -> list[dict]:
        """Torch optimizer parameter groups ``{"params", "lr", "name"}`` (+ "weight_decay" when given).

        "encoder": the encoder backbone at ``lr * encoder_lr_scale``, left out when frozen or when the scale is 0;
        "decoder": everything else (CUP decoder, heads, ViT skip adapters) at ``lr``.
        """
        if encoder_lr_scale < 0:
            raise BundleInputError(f"encoder_lr_scale must be >= 0, got {encoder_lr_scale}")
        backbone_ids = {id(p) for p in self.encoder.backbone.parameters()}
        backbone = [p for p in self.encoder.backbone.parameters() if p.requires_grad]
        rest = [p for p in self.parameters() if id(p) not in backbone_ids and p.requires_grad]
        groups = []
        if backbone and encoder_lr_scale > 0:
            groups.append({"params": backbone, "lr": lr * encoder_lr_scale, "name": "encoder"})
        groups.append({"params": rest, "lr": lr, "name": "decoder"})
        if weight_decay is not None:
            for group in groups:
                group["weight_decay"] = weight_decay
        return groups

    def forward(
        self, image: torch.Tensor, *, perturb_from: int | None = None, return_embedding: bool = False
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Logits [B, C, H, W]; with ``perturb_from`` and/or ``return_embedding`` a dict (see the module docstring).

        ``perturb_from=k`` adds "logits_fp" [B - k, C, H, W] for samples k..B-1 (Dropout2d on the encoder map and
        every skip; identity in eval mode). ``return_embedding`` adds "embedding" [B, D, H/4, W/4] with unit norm
        along dim 1 (for the default ``projection_level``).
        """
        height, width = image.shape[-2:]
        if not torch.jit.is_tracing() and (height % self.patch_size or width % self.patch_size):
            raise BundleInputError(
                f"TransUNet input size {height}x{width} must be divisible by {self.patch_size} in both dimensions"
            )
        batch = image.shape[0]
        features, skips = self.encoder(image)
        if self.full_res_stem is not None:
            skips = list(skips) + [self.full_res_stem(image)]
        if perturb_from is not None:
            if not 0 <= perturb_from <= batch:
                raise ValueError(f"perturb_from must be in [0, {batch}] for a batch of {batch}, got {perturb_from}")
            features = torch.cat([features, self.feature_perturbation(features[perturb_from:])])
            skips = [torch.cat([skip, self.feature_perturbation(skip[perturb_from:])]) for skip in skips]
        decoded = self.decoder(features, skips)
        logits = self.segmentation_head(decoded[-1])
        if perturb_from is None and not return_embedding:
            return logits
        outputs = {"logits": logits[:batch]}
        if perturb_from is not None:
            outputs["logits_fp"] = logits[batch:]
        if return_embedding:
            outputs["embedding"] = F.normalize(self.projection_head(decoded[self.projection_level][:batch]), dim=1)
        return outputs
