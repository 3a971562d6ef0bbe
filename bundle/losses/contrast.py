"""Pixel-to-prototype contrast: class-balanced pixel sampling and the prototype cross-entropy (method.md 4.3-4.4).

``L = CE(s / T, y)`` where ``s[n, c]`` is pixel n's similarity to class c's prototype (image or text) and T a
temperature. Classes without a prototype yet (an empty bank slot) are excluded from the softmax, and pixels of
such classes are skipped.

On a GPU every boolean-mask selection, ``.any()`` test or ``.tolist()`` waits for the device. Dropped pixels are
therefore marked with label -1 instead of being removed, empty cases are handled by masked means instead of tests,
and the class-balanced sampling reads one small vector (the class counts) back to the host per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["flatten_pixels", "prototype_contrast_loss", "sample_balanced_pixels"]


def flatten_pixels(
    embedding: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings ``[B, D, h, w]`` with labels/keep at any resolution ``[B, H, W]`` -> ``([N, D], [N])``, N = B h w.

    Labels (and the keep mask) are brought to the embedding grid by nearest-neighbour resampling; pixels whose keep
    flag is False get label -1, which :func:`sample_balanced_pixels` never picks.
    """
    size = embedding.shape[-2:]
    if labels.shape[-2:] != size:
        labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
        if keep is not None:
            keep = F.interpolate(keep[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
    z = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
    y = labels.reshape(-1).long()
    if keep is not None:
        y = y.masked_fill(~keep.reshape(-1).bool(), -1)
    return z, y


def sample_balanced_pixels(
    labels: torch.Tensor, num_classes: int, max_pixels: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices of at most ``max_pixels`` pixels, split evenly over the classes present (class-balanced).

    A class with fewer pixels than its share gives all of them and the spare budget goes to the other classes.
    Labels outside ``[0, num_classes)`` are never sampled. The pixels are put in a random order (drawn on the CPU,
    so a seed picks the same pixels on any device) and stably sorted by class; each class's first pixels are taken.
    """
    valid = (labels >= 0) & (labels < num_classes)
    grouped = torch.where(valid, labels, num_classes)  # invalid pixels sort after every class
    counts = torch.bincount(grouped, minlength=num_classes + 1)[:num_classes].tolist()  # the one host read
    quota = _balanced_quota(counts, max_pixels)
    shuffle = torch.randperm(labels.shape[0], generator=generator, device="cpu").to(labels.device)
    order = shuffle[torch.sort(grouped[shuffle], stable=True).indices]
    starts = [sum(counts[:cls]) for cls in range(num_classes)]
    chosen = [order[start : start + take] for start, take in zip(starts, quota, strict=True) if take]
    return torch.cat(chosen) if chosen else order[:0]


def _balanced_quota(counts: list[int], budget: int) -> list[int]:
    quota = [0] * len(counts)
    remaining = [c for c, n in enumerate(counts) if n > 0]
    while remaining and budget > 0:
        share = max(budget // len(remaining), 1)
        still = []
        for cls in remaining:
            take = min(share, counts[cls] - quota[cls], budget)
            quota[cls] += take
            budget -= take
            if quota[cls] < counts[cls]:
                still.append(cls)
        remaining = still
    return quota


def prototype_contrast_loss(
    similarity: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1, available: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of ``similarity / temperature`` ``[N, C]`` against ``labels`` ``[N]``, averaged over the pixels
    used.

    ``available`` (``[C]`` bool) marks classes that have a prototype; the others get no logit (the lowest float, so
    exp() is exactly 0), and pixels labelled with them, or outside ``[0, C)``, are skipped. Returns a zero that
    keeps the graph when no pixel is usable.
    """
    logits = similarity.float() / temperature
    num_classes = similarity.shape[1]
    keep = (labels >= 0) & (labels < num_classes)
    target = labels.clamp(0, num_classes - 1)
    if available is not None:
        available = available.to(similarity.device)
        logits = logits.masked_fill(~available[None, :], torch.finfo(logits.dtype).min)
        keep = keep & available[target]
    ce = F.cross_entropy(logits, target, reduction="none")
    return torch.where(keep, ce, 0.0).sum() / keep.sum().clamp_min(1)
