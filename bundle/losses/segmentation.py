"""Pixel-wise segmentation losses: the supervised CE + Dice loss and UniMatch's masked consistency loss.

Both take raw logits ``[B, C, H, W]`` and integer targets ``[B, H, W]`` (or ``[B, 1, H, W]``). Pixels whose target
equals ``ignore_index`` (or whose ``valid`` mask is False) contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss
from monai.networks import one_hot
from torch import nn

__all__ = ["ConsistencyLoss", "SupervisedLoss", "squeeze_target"]


def squeeze_target(target: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` or ``[B, H, W]`` class indices -> ``[B, H, W]`` long."""
    if target.ndim == 4:
        if target.shape[1] != 1:
            raise ValueError(f"expected a one-channel target [B, 1, H, W], got shape {tuple(target.shape)}")
        target = target[:, 0]
    return target.long()


class _MaskedDice(nn.Module):
    """Soft Dice over the pixels of ``mask`` (MONAI's MaskedDiceLoss on softmax probabilities, one-hot targets)."""

    def __init__(self, batch: bool = True, smooth: float = 1e-5) -> None:
        super().__init__()
        self.dice = MaskedDiceLoss(
            include_background=True, softmax=True, batch=batch, smooth_nr=smooth, smooth_dr=smooth
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[1]
        safe_target = torch.where(mask, target, torch.zeros_like(target))
        target_1h = one_hot(safe_target[:, None], num_classes=num_classes, dim=1).to(logits.dtype)
        return self.dice(logits, target_1h, mask[:, None].to(logits.dtype))


class SupervisedLoss(nn.Module):
    """``L_x = ce_weight * CE(p_x, y) + dice_weight * Dice(p_x, y)`` (method.md 4.1; default 0.5 / 0.5).

    Args:
        ce_weight: weight of the cross-entropy term.
        dice_weight: weight of the soft Dice term (Dice over all classes, background included).
        ignore_index: target value that marks pixels without a label.
        batch_dice: compute Dice over the whole batch (stable for crops that miss a class) or per image.
    """

    def __init__(
        self, ce_weight: float = 0.5, dice_weight: float = 0.5, ignore_index: int = 255, batch_dice: bool = True
    ) -> None:
        super().__init__()
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.ignore_index = int(ignore_index)
        self.dice = _MaskedDice(batch=batch_dice)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = squeeze_target(target)
        valid = target != self.ignore_index
        # masked means rather than a test for "no valid pixel", which would wait for the device: with nothing
        # valid both terms are 0 and the graph is kept
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.ce_weight:
            ce = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction="none")
            loss = loss + self.ce_weight * ce.sum() / valid.sum().clamp_min(1)
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice(logits.float(), target, valid)
        return loss


class ConsistencyLoss(nn.Module):
    """UniMatch's loss ``l`` between a prediction and a pseudo-label over reliable pixels (method.md 4.2).

    ``l = ce_weight * sum(CE * reliable) / #valid + dice_weight * Dice(reliable pixels)``: the CE is normalised by
    all valid pixels (not only the reliable ones), exactly as UniMatch does, so an early model with few confident
    pixels gets a small loss rather than a loud one.
    """

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 0.0, batch_dice: bool = True) -> None:
        super().__init__()
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.dice = _MaskedDice(batch=batch_dice)

    def forward(
        self,
        logits: torch.Tensor,
        pseudo_label: torch.Tensor,
        reliable: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        pseudo_label = squeeze_target(pseudo_label)
        reliable = reliable.bool()
        if valid is None:
            valid = torch.ones_like(reliable)
        valid = valid.bool()
        used = reliable & valid
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.ce_weight:
            ce = F.cross_entropy(logits.float(), pseudo_label, reduction="none")
            loss = loss + self.ce_weight * (ce * used).sum() / valid.sum().clamp_min(1)
        if self.dice_weight and bool(used.any()):
            loss = loss + self.dice_weight * self.dice(logits.float(), pseudo_label, used)
        return loss
