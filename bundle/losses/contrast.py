"""Pixel-to-prototype contrast: class-balanced pixel sampling and the prototype cross-entropy (method.md 4.3-4.4).

``L = CE(s / T, y)`` where ``s[n, c]`` is pixel n's similarity to class c's prototype (image or text) and T a
temperature. Classes without a prototype yet (an empty bank slot) are excluded from the softmax, and pixels of
such classes are skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["flatten_pixels", "prototype_contrast_loss", "sample_balanced_pixels"]


def flatten_pixels(
    embedding: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings ``[B, D, h, w]`` with labels/keep at any resolution ``[B, H, W]`` -> ``([N, D], [N])``.

    Labels (and the keep mask) are brought to the embedding grid by nearest-neighbour resampling; pixels whose keep
    flag is False are dropped.
    """
    size = embedding.shape[-2:]
    if labels.shape[-2:] != size:
        labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
        if keep is not None:
            keep = F.interpolate(keep[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
    z = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
    y = labels.reshape(-1).long()
    if keep is not None:
        k = keep.reshape(-1).bool()
        z, y = z[k], y[k]
    return z, y


def sample_balanced_pixels(
    labels: torch.Tensor, num_classes: int, max_pixels: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices of at most ``max_pixels`` pixels, split evenly over the classes present (class-balanced).

    A class with fewer pixels than its share gives all of them and the spare budget goes to the other classes.
    Labels outside ``[0, num_classes)`` are never sampled.
    """
    valid = (labels >= 0) & (labels < num_classes)
    if int(valid.sum()) <= max_pixels:
        return torch.nonzero(valid).flatten()
    counts = torch.bincount(labels[valid], minlength=num_classes).tolist()
    quota = _balanced_quota(counts, max_pixels)
    # a random rank per pixel, then the lowest-ranked `quota[c]` pixels of each class
    score = torch.rand(labels.shape[0], generator=generator, device="cpu").to(labels.device)
    chosen = []
    for cls, take in enumerate(quota):
        if take == 0:
            continue
        idx = torch.nonzero(labels == cls).flatten()
        if take < idx.numel():
            idx = idx[torch.topk(score[idx], take, largest=False).indices]
        chosen.append(idx)
    return torch.cat(chosen)


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
    """Cross-entropy of ``similarity / temperature`` ``[N, C]`` against ``labels`` ``[N]``.

    ``available`` (``[C]`` bool) marks classes that have a prototype; the others get no logit, and pixels labelled
    with them are skipped. Returns a zero that keeps the graph when no pixel is usable.
    """
    logits = similarity.float() / temperature
    keep = torch.ones_like(labels, dtype=torch.bool)
    if available is not None:
        available = available.to(similarity.device)
        logits = logits.masked_fill(~available[None, :], float("-inf"))
        keep = available[labels.clamp(0, similarity.shape[1] - 1)] & (labels >= 0) & (labels < similarity.shape[1])
    if not bool(keep.any()):
        return similarity.sum() * 0.0
    return F.cross_entropy(logits[keep], labels[keep])
