"""Base class of the frozen text encoders behind the prompt learner, and the token helpers they share.

An adapter wraps a pretrained text tower so that learnable context vectors (CoOp) can be inserted right after the
start token of every prompt: ``[SOS] [V1 .. VM] [description tokens] [EOS]``. Adapters are plain Python objects,
not ``nn.Module``s, so the frozen encoder never enters a state dict; they freeze their model (eval mode, no
gradients) when built.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import BundleInputError

__all__ = ["TextEncoderAdapter", "fit_tokens", "freeze", "insert_context", "shift_positions", "start_token_ids"]


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode (no dropout) and stop gradients to all its parameters; returns it."""
    module.eval()
    module.requires_grad_(False)
    return module


def fit_tokens(
    ids: torch.Tensor, real: torch.Tensor, n_insert: int, max_total: int, insert_at: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shorten right-padded token rows so that ``n_insert`` more tokens fit in ``max_total`` positions.

    ``real`` marks the non-padding tokens of ``ids`` ([N, L]). Rows whose real tokens do not fit lose description
    tokens, never their last real token (the end token), which moves to the last kept position, as the encoders'
    own tokenizers truncate. Returns ``(ids, real)`` with at most ``max_total - n_insert`` columns.
    """
    limit = max_total - n_insert
    if limit < insert_at + 2:
        raise BundleInputError(
            f"n_ctx={n_insert} context vectors leave no room for the class description in the text encoder's "
            f"{max_total} token positions; use a smaller n_ctx"
        )
    if ids.shape[1] <= limit:
        return ids, real
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    last = torch.where(real, positions, torch.full_like(positions, -1)).max(dim=1).values
    fitted_ids, fitted_real = ids[:, :limit].clone(), real[:, :limit].clone()
    over = last >= limit
    if bool(over.any()):
        rows = torch.nonzero(over).squeeze(1)
        fitted_ids[rows, limit - 1] = ids[rows, last[rows]]
        fitted_real[rows] = True
    return fitted_ids, fitted_real


def insert_context(sequence: torch.Tensor, context: torch.Tensor, insert_at: int) -> torch.Tensor:
    """Insert ``context`` ([N, M, ...]) into ``sequence`` ([N, L, ...]) before position ``insert_at``."""
    return torch.cat([sequence[:, :insert_at], context, sequence[:, insert_at:]], dim=1)


def shift_positions(positions: torch.Tensor, n_insert: int, insert_at: int) -> torch.Tensor:
    """Map token positions before insertion to positions after inserting ``n_insert`` tokens at ``insert_at``."""
    return positions + n_insert * (positions >= insert_at).to(positions.dtype)


def start_token_ids(tokenizer: object) -> set[int]:
    """Ids a tokenizer may use as its start token (open_clip ``sot_token_id``; Hugging Face ``cls``/``bos``)."""
    ids: set[int] = set()
    for owner in (tokenizer, getattr(tokenizer, "tokenizer", None)):
        for name in ("sot_token_id", "cls_token_id", "bos_token_id"):
            value = getattr(owner, name, None) if owner is not None else None
            if isinstance(value, int):
                ids.add(value)
    return ids


class TextEncoderAdapter(abc.ABC):
    """A frozen text encoder that encodes prompts with learnable context vectors inserted after the start token.

    Subclasses set ``model`` (the frozen ``nn.Module`` that holds every weight the text path needs),
    ``token_embedding_dim`` (width W of the encoder's input token embeddings), ``output_dim`` (F) and
    ``max_length`` (the most token positions the encoder takes, context included).
    """

    model: nn.Module
    token_embedding_dim: int
    output_dim: int
    max_length: int

    @abc.abstractmethod
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenize ``texts`` into the tensors :meth:`encode` needs (token ids, attention mask, ...)."""

    @abc.abstractmethod
    def encode(self, context: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Encode N prompts ``[SOS] context[n] [tokens of text n] [EOS]`` into features [N, output_dim].

        ``context`` is [N, M, token_embedding_dim] (M may be 0); gradients flow to it, never to the encoder.
        """

    @property
    def device(self) -> torch.device:
        """Device of the encoder's weights."""
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> TextEncoderAdapter:
        """Move the frozen encoder to ``device``; returns the adapter."""
        self.model.to(device)
        return self

    def parameters(self):
        """The frozen encoder's parameters (all with ``requires_grad=False``)."""
        return self.model.parameters()

    def __deepcopy__(self, memo: dict) -> TextEncoderAdapter:
        # the encoder is frozen and stateless during training: copies of a prompt learner share it
        return self

    def _check_context(self, context: torch.Tensor, n_prompts: int) -> None:
        if context.ndim != 3 or context.shape[0] != n_prompts or context.shape[2] != self.token_embedding_dim:
            raise ValueError(
                f"context must have shape [{n_prompts}, M, {self.token_embedding_dim}] for {n_prompts} prompts, "
                f"got {list(context.shape)}"
            )

    def _ensure_eval(self) -> None:
        if self.model.training:
            self.model.eval()
