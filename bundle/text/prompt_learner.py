"""Learnable text prototypes (CoOp prompt learning in front of a frozen text encoder) for MPAMatch's L_txt.

For class c the prompt is ``[SOS] [V_1 .. V_M] [description_c] [EOS]`` with M learnable context vectors per
class; the frozen encoder's features go through a learnable linear map to the embedding width D and L2
normalisation, giving the text prototype ``t_c``. Only the context vectors and the projection are parameters (and
in the state dict); the encoder is a plain attribute that follows the module's device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BundleInputError
from .base import TextEncoderAdapter
from .encoders import build_text_encoder

__all__ = ["PromptLearner"]

_TOKEN_PREFIX = "tokens_"


def _as_adapter(text_encoder: TextEncoderAdapter | Mapping) -> TextEncoderAdapter:
    if isinstance(text_encoder, TextEncoderAdapter):
        return text_encoder
    if isinstance(text_encoder, Mapping):
        options = dict(text_encoder)
        if "kind" not in options:
            raise BundleInputError("text_encoder needs a 'kind' (huggingface, open_clip, conch or random)")
        return build_text_encoder(**options)
    raise BundleInputError(
        f"text_encoder must be a text encoder adapter or a dict with a 'kind', got {type(text_encoder).__name__}"
    )


def _check_descriptions(class_descriptions: Sequence[str]) -> list[str]:
    if isinstance(class_descriptions, str) or not isinstance(class_descriptions, Sequence):
        raise BundleInputError("class_descriptions must be a list with one text per class")
    descriptions = list(class_descriptions)
    if not descriptions:
        raise BundleInputError("class_descriptions is empty; give one text per class")
    for index, text in enumerate(descriptions):
        if not isinstance(text, str) or not text.strip():
            raise BundleInputError(f"class_descriptions[{index}] must be a non-empty text, got {text!r}")
    return descriptions


class PromptLearner(nn.Module):
    """Text prototypes ``t_c`` [C, embedding_dim], L2-normalised, from learnable prompts and a frozen encoder.

    Args:
        text_encoder: a :class:`~bundle.text.base.TextEncoderAdapter`, or a dict ``{"kind": ..., **options}``
            for :func:`~bundle.text.encoders.build_text_encoder`.
        class_descriptions: one description per class, in class-index order.
        n_ctx: learnable context vectors per class (M; 0 encodes the bare descriptions).
        embedding_dim: width D of the prototypes (the pixel embedding width).
        ctx_init_std: standard deviation of the normal initialisation of the context vectors.
    """

    def __init__(
        self,
        text_encoder: TextEncoderAdapter | Mapping,
        class_descriptions: Sequence[str],
        n_ctx: int = 4,
        embedding_dim: int = 128,
        ctx_init_std: float = 0.02,
    ) -> None:
        super().__init__()
        descriptions = _check_descriptions(class_descriptions)
        if int(n_ctx) < 0:
            raise BundleInputError(f"n_ctx must be 0 or more, got {n_ctx}")
        if int(embedding_dim) < 1:
            raise BundleInputError(f"embedding_dim must be positive, got {embedding_dim}")
        if float(ctx_init_std) < 0:
            raise BundleInputError(f"ctx_init_std must be 0 or more, got {ctx_init_std}")
        # a plain attribute, not a submodule: the frozen encoder stays out of state_dict() and parameters()
        self.text_encoder = _as_adapter(text_encoder)
        self.class_descriptions = descriptions
        self.n_ctx = int(n_ctx)
        self.embedding_dim = int(embedding_dim)
        encoder = self.text_encoder
        self.ctx = nn.Parameter(torch.empty(len(descriptions), self.n_ctx, encoder.token_embedding_dim))
        nn.init.normal_(self.ctx, std=float(ctx_init_std))
        self.projection = nn.Linear(encoder.output_dim, self.embedding_dim)
        # tokenized once; non-persistent buffers follow .to() but are not checkpointed
        self._token_keys = []
        for key, value in encoder.tokenize(descriptions).items():
            self.register_buffer(_TOKEN_PREFIX + key, value, persistent=False)
            self._token_keys.append(key)
        self.text_encoder.to(self.ctx.device)

    @property
    def num_classes(self) -> int:
        return len(self.class_descriptions)

    def tokens(self) -> dict[str, torch.Tensor]:
        """The tokenized class descriptions, on this module's device."""
        return {key: getattr(self, _TOKEN_PREFIX + key) for key in self._token_keys}

    def encode(self) -> torch.Tensor:
        """Frozen-encoder features [C, output_dim] of the C prompts (one encoder call for all classes)."""
        return self.text_encoder.encode(self.ctx, self.tokens())

    def forward(self) -> torch.Tensor:
        """Text prototypes [C, embedding_dim], L2-normalised; recomputed at every call."""
        features = self.encode().to(self.projection.weight.dtype)
        return F.normalize(self.projection(features), dim=-1)

    def _apply(self, fn, recurse: bool = True):
        module = super()._apply(fn, recurse)
        # the encoder follows the device (not the dtype: it runs in its own precision, under autocast if set)
        self.text_encoder.to(self.ctx.device)
        return module

    def extra_repr(self) -> str:
        encoder = type(self.text_encoder).__name__
        return f"classes={self.num_classes}, n_ctx={self.n_ctx}, embedding_dim={self.embedding_dim}, encoder={encoder}"
