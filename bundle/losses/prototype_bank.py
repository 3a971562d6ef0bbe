"""The image prototype bank of MPAMatch: K L2-normalised prototypes per class, updated by EMA (method.md 4.3).

Prototypes live in registered buffers, so they are saved and restored with the loss module's state dict (and load
with ``torch.load(weights_only=True)``). Under ``torch.distributed`` the per-class sums are all-reduced so that every
rank keeps the same bank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["ImagePrototypeBank"]


class ImagePrototypeBank(nn.Module):
    """``P in R^{C x K x D}`` updated by ``P <- normalize(m P + (1 - m) mean(z of the pixels assigned to P))``.

    With ``K > 1`` each pixel is assigned to the most similar prototype of its class (online k-means); a class's K
    prototypes are initialised from K distinct pixels of its first batch (K copies of its mean if it has fewer).

    Args:
        num_classes: C.
        embedding_dim: D.
        num_prototypes: K per class.
        momentum: EMA momentum m (0.99 keeps 99 % of the old prototype each step).
    """

    def __init__(self, num_classes: int, embedding_dim: int = 128, num_prototypes: int = 1, momentum: float = 0.99):
        super().__init__()
        if num_classes < 1 or embedding_dim < 1 or num_prototypes < 1:
            raise ValueError("num_classes, embedding_dim and num_prototypes must be positive")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_classes = int(num_classes)
        self.embedding_dim = int(embedding_dim)
        self.num_prototypes = int(num_prototypes)
        self.momentum = float(momentum)
        self.register_buffer("prototypes", torch.zeros(num_classes, num_prototypes, embedding_dim))
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool))

    def similarity(self, embedding: torch.Tensor) -> torch.Tensor:
        """``s[n, c] = max_k <z_n, P_ck>`` for embeddings ``[N, D]`` -> ``[N, C]``."""
        # a copy: the bank is updated in place after the loss is computed, before backward
        sim = torch.einsum("nd,ckd->nck", embedding, self.prototypes.detach().clone().to(embedding.dtype))
        return sim.amax(dim=2)

    def class_prototypes(self) -> torch.Tensor:
        """One unit vector per class (the normalised mean of its K prototypes), ``[C, D]``."""
        return F.normalize(self.prototypes.detach().mean(dim=1), dim=1)

    @torch.no_grad()
    def update(self, embedding: torch.Tensor, labels: torch.Tensor) -> None:
        """EMA update from pixel embeddings ``[N, D]`` (L2-normalised) with class labels ``[N]``.

        Labels outside ``[0, C)`` (ignored or unreliable pixels, marked e.g. -1 or 255) are skipped. With K = 1 the
        update reads nothing back from the device: skipped pixels are summed into a spare slot that is dropped, and
        a class's first update starts its EMA from the zero vector, which gives exactly its normalised mean.
        """
        embedding = embedding.detach().float()
        labels = labels.detach().long()
        c, k, d = self.num_classes, self.num_prototypes, self.embedding_dim
        valid = (labels >= 0) & (labels < c)
        if k > 1:
            self._initialize_new_classes(embedding[valid], labels[valid])
            sim = torch.einsum("nd,nkd->nk", embedding, self.prototypes[labels.clamp(0, c - 1)])
            slot = labels * k + sim.argmax(dim=1)
        else:
            slot = labels
        slot = torch.where(valid, slot, c * k)  # the spare slot
        sums = embedding.new_zeros(c * k + 1, d).index_add_(0, slot, embedding)[: c * k]
        counts = embedding.new_zeros(c * k + 1).index_add_(0, slot, torch.ones_like(embedding[:, 0]))[: c * k]
        if _distributed():
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        updated = (counts > 0)[:, None]
        means = F.normalize(sums / counts.clamp_min(1)[:, None], dim=1)
        flat = self.prototypes.view(c * k, d)
        flat.copy_(torch.where(updated, F.normalize(self.momentum * flat + (1.0 - self.momentum) * means, dim=1), flat))
        self.initialized |= updated.view(c, k).any(dim=1)

    def _initialize_new_classes(self, embedding: torch.Tensor, labels: torch.Tensor) -> None:
        """K > 1: a new class's prototypes start from K distinct pixels (K copies of its mean if it has fewer)."""
        present = torch.bincount(labels, minlength=self.num_classes) > 0
        if _distributed():
            present_f = present.float()
            dist.all_reduce(present_f)
            present = present_f > 0
        for cls in torch.nonzero(present & ~self.initialized).flatten().tolist():
            pixels = embedding[labels == cls]
            if pixels.shape[0] == 0:  # present on another rank only
                pixels = embedding.new_zeros(1, self.embedding_dim)
            mean = F.normalize(pixels.mean(dim=0), dim=0)
            init = mean.expand(self.num_prototypes, -1).clone()
            if pixels.shape[0] >= self.num_prototypes:
                step = pixels.shape[0] // self.num_prototypes
                init = F.normalize(pixels[::step][: self.num_prototypes], dim=1)
            if _distributed():  # every rank starts from the same vectors
                dist.all_reduce(init)
                init = F.normalize(init, dim=-1)
            self.prototypes[cls] = init
            self.initialized[cls] = True


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
