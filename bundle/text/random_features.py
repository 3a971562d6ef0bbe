"""The control for the text prototypes: fixed random features in place of a text encoder's.

``{"kind": "random"}`` gives every class a fixed random vector (seeded, not trained) where a real encoder gives the
features of its prompt; the prompt learner's learnable projection and the contrast loss stay the same. A preset with
it (``configs/mpamatch_random_text.json``) measures what the language adds beyond a learnable classifier over the
pixel embeddings: if the real text tower does no better, the descriptions carry no information the model uses.
The prompt's context vectors exist but receive no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import TextEncoderAdapter

__all__ = ["RandomTextFeatures"]


class RandomTextFeatures(TextEncoderAdapter):
    """Fixed random features [N, ``dim``] for N prompts: ``randn`` from ``seed``, scaled to unit norm.

    Args:
        dim: feature width F (384, that of the default MiniLM encoder, so the projection has the same size).
        seed: the features' seed; the same seed gives the same vectors on every rank and after a resume.
    """

    token_embedding_dim = 8  # width of the unused context vectors
    max_length = 1 << 16

    def __init__(self, dim: int = 384, seed: int = 0) -> None:
        self.output_dim = int(dim)
        self.seed = int(seed)
        self.model = nn.Module()
        self.model.register_buffer("features", torch.zeros(0, self.output_dim))

    @property
    def device(self) -> torch.device:
        return self.model.features.device

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """One index per prompt; draws the prompts' vectors (the text itself is not read)."""
        generator = torch.Generator().manual_seed(self.seed)
        features = torch.randn(len(texts), self.output_dim, generator=generator)
        self.model.features = nn.functional.normalize(features, dim=1).to(self.device)
        return {"index": torch.arange(len(texts))}

    def encode(self, context: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        self._check_context(context, tokens["index"].shape[0])
        return self.model.features[tokens["index"].to(self.device)]
