"""Small hybrid CNN + ViT encoder (the embedded default): trains from scratch on a CPU.

A three-stage residual CNN stem (stride 2 each) gives the 1/2, 1/4 and 1/8 skips; a 2x2 stride-2 patch embedding of
the 1/8 map makes 1/16 tokens, which get a learnable absolute position embedding (resampled to the input's grid, so
any H, W divisible by 16 works) and pass through timm transformer blocks and a final LayerNorm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import ResidualUnit
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn

from bundle.errors import BundleInputError

from .base import EncoderOutput, TransUNetEncoder

__all__ = ["HybridEncoder"]


class HybridEncoder(TransUNetEncoder):
    """CNN stem (skips) + patch embedding of the 1/8 map + ``depth`` timm ViT blocks on the 1/16 token grid."""

    def __init__(
        self,
        img_size: int = 256,
        in_channels: int = 3,
        embed_dim: int = 128,
        depth: int = 2,
        num_heads: int = 2,
        stem_channels: Sequence[int] = (16, 32, 64),
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        stem_channels = tuple(int(c) for c in stem_channels)
        if len(stem_channels) != 3:
            raise BundleInputError(
                f"encoder option stem_channels must list 3 widths (1/2, 1/4, 1/8 stages), got {stem_channels}"
            )
        if img_size % self.patch_size:
            raise BundleInputError(f"img_size {img_size} must be divisible by {self.patch_size}")
        if embed_dim % num_heads:
            raise BundleInputError(f"encoder option embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        widths = (in_channels,) + stem_channels
        self.stem = nn.ModuleList(
            ResidualUnit(2, widths[i], widths[i + 1], strides=2, subunits=2, act="RELU", norm="BATCH") for i in range(3)
        )
        self.patch_embed = nn.Conv2d(stem_channels[-1], embed_dim, kernel_size=2, stride=2)
        self.grid_size = (img_size // self.patch_size, img_size // self.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim))
        drop_path = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(
            *(
                Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=drop_path[i])
                for i in range(depth)
            )
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.out_channels = embed_dim
        self.skip_channels = (stem_channels[2], stem_channels[1], stem_channels[0])
        trunc_normal_(self.pos_embed, std=0.02)
        self.blocks.apply(init_weights_vit_timm)

    def forward(self, image: torch.Tensor) -> EncoderOutput:
        x = image
        stem_maps = []
        for stage in self.stem:
            x = stage(x)
            stem_maps.append(x)
        x = self.patch_embed(x)
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        pos_embed = resample_abs_pos_embed(
            self.pos_embed, new_size=[height, width], old_size=list(self.grid_size), num_prefix_tokens=0
        )
        tokens = self.norm(self.blocks(tokens + pos_embed))
        features = tokens.transpose(1, 2).reshape(batch, channels, height, width)
        return EncoderOutput(features, stem_maps[::-1])
