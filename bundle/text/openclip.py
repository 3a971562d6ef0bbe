"""open_clip text towers (CLIP, QuiltNet, CoCa, BiomedCLIP-style Hugging Face towers) as frozen prompt encoders.

:class:`TextTransformerTower` keeps only the text path of an open_clip ``CLIP`` model or ``TextTransformer``
(also CONCH's, see :mod:`bundle.text.conch`) and mirrors ``TextTransformer.forward`` of open_clip 3.3 with
context embeddings inserted after the start token: causal and padding masks, the CoCa class token appended at the
end, every ``pool_type`` and both forms of ``text_projection``. Towers that are Hugging Face models
(``HFTextEncoder``, e.g. BiomedCLIP's PubMedBERT) go through ``inputs_embeds`` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import BundleInputError
from .base import TextEncoderAdapter, fit_tokens, freeze, insert_context, shift_positions, start_token_ids
from .huggingface import run_with_context

__all__ = ["OpenCLIPTextEncoder", "TextTransformerTower"]

POOL_TYPES = ("argmax", "eos", "first", "last")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


class TextTransformerTower(nn.Module):
    """The text path of an open_clip ``CLIP`` model or (open_clip / CONCH) ``TextTransformer``.

    It references the source's weights (nothing is copied), so the rest of the source model can be freed.
    """

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.token_embedding = source.token_embedding
        self.positional_embedding = source.positional_embedding
        self.transformer = source.transformer
        self.ln_final = source.ln_final
        self.text_projection = source.text_projection
        self.cls_emb = getattr(source, "cls_emb", None)
        self.register_buffer("attn_mask", getattr(source, "attn_mask", None), persistent=False)
        # TextTransformer names them pool_type/eos_id, the CLIP model text_pool_type/text_eos_id
        self.pool_type = getattr(source, "pool_type", getattr(source, "text_pool_type", "argmax"))
        self.eos_id = getattr(source, "eos_id", getattr(source, "text_eos_id", None))
        self.pad_id = int(getattr(source, "pad_id", 0))
        self.use_pad_mask = bool(getattr(source, "use_pad_mask", False))
        self.correct_cls_mask = bool(getattr(source, "correct_cls_mask", False))
        heads = getattr(source, "heads", None)
        self.heads = int(heads if heads is not None else self.transformer.resblocks[0].attn.num_heads)
        if self.cls_emb is None and self.pool_type not in POOL_TYPES:
            raise BundleInputError(
                f"open_clip text pool_type {self.pool_type!r} gives no sentence embedding; use one of "
                f"{', '.join(POOL_TYPES)}"
            )
        # the appended class token takes the last position
        self.max_tokens = int(self.positional_embedding.shape[0]) - (1 if self.cls_emb is not None else 0)
        self.width = int(self.token_embedding.embedding_dim)
        projection = self.text_projection
        if projection is None:
            self.output_dim = self.width
        elif isinstance(projection, nn.Linear):
            self.output_dim = int(projection.out_features)
        else:
            self.output_dim = int(projection.shape[1])

    def _cast_dtype(self) -> torch.dtype:
        get_cast_dtype = getattr(self.transformer, "get_cast_dtype", None)
        return get_cast_dtype() if callable(get_cast_dtype) else self.token_embedding.weight.dtype

    def _key_padding_mask(self, valid: torch.Tensor, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
        # as TextTransformer._build_additive_mask: padding keys get -inf; the CoCa class token is always valid
        if self.cls_emb is not None:
            cls_valid = valid.new_ones(valid.shape[0], 1)
            valid = torch.cat([valid, cls_valid] if self.correct_cls_mask else [cls_valid, valid], dim=1)
        keys = valid.unsqueeze(1).expand(-1, seq_len, -1)
        additive = torch.zeros(keys.shape, dtype=dtype, device=keys.device).masked_fill(~keys, float("-inf"))
        return additive.repeat_interleave(self.heads, dim=0)

    def _run_transformer(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        if getattr(self.transformer, "batch_first", None) is None:
            # older open_clip / CONCH transformers take sequence-first input
            return self.transformer(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
        return self.transformer(x, attn_mask=attn_mask)

    def forward(self, ids: torch.Tensor, context: torch.Tensor, insert_at: int = 1) -> torch.Tensor:
        """Pooled, projected features [N, output_dim] of ``ids`` ([N, L]) with ``context`` inserted."""
        n_ctx = context.shape[1]
        ids, _ = fit_tokens(ids, ids != self.pad_id, n_ctx, self.max_tokens, insert_at)
        cast_dtype = self._cast_dtype()
        x = insert_context(self.token_embedding(ids).to(cast_dtype), context.to(cast_dtype), insert_at)
        batch, seq_len = x.shape[:2]
        if self.cls_emb is not None:
            x = torch.cat([x, self.cls_emb.to(x.dtype).view(1, 1, -1).expand(batch, -1, -1)], dim=1)
            seq_len += 1
        attn_mask = self.attn_mask[:seq_len, :seq_len] if self.attn_mask is not None else None
        if self.use_pad_mask or self.cls_emb is not None:
            valid = insert_context(ids != self.pad_id, ids.new_ones(batch, n_ctx, dtype=torch.bool), insert_at)
            padding = self._key_padding_mask(valid, seq_len, x.dtype)
            attn_mask = padding if attn_mask is None else attn_mask.unsqueeze(0) + padding
        x = x + self.positional_embedding[:seq_len].to(cast_dtype)
        x = self._run_transformer(x, attn_mask)
        if self.cls_emb is not None:
            # CoCa: the appended class token is pooled, the final norm follows pooling
            pooled = self.ln_final(x[:, -1])
        else:
            x = self.ln_final(x)
            pooled = self._pool(x, ids, n_ctx, insert_at)
        projection = self.text_projection
        if projection is None:
            return pooled
        if isinstance(projection, nn.Linear):
            return projection(pooled)
        return pooled @ projection

    def _pool(self, x: torch.Tensor, ids: torch.Tensor, n_ctx: int, insert_at: int) -> torch.Tensor:
        if self.pool_type == "first":
            return x[:, 0]
        if self.pool_type == "last":
            return x[:, -1]
        if self.pool_type == "argmax":
            # the end token has the highest id (found before insertion, as open_clip does)
            positions = ids.argmax(dim=-1)
        else:
            positions = (ids == self.eos_id).int().argmax(dim=-1)
        positions = shift_positions(positions, n_ctx, insert_at)
        return x[torch.arange(x.shape[0], device=x.device), positions]


class HFTowerRunner:
    """Encodes prompts with an open_clip ``HFTextEncoder`` (a Hugging Face model, its pooler and projection)."""

    def __init__(self, text: nn.Module) -> None:
        self.text = text
        self.width = int(text.transformer.get_input_embeddings().embedding_dim)
        self.output_dim = int(text.output_dim)
        self.pad_id = text.config.pad_token_id if text.config.pad_token_id is not None else 0

    def __call__(self, ids: torch.Tensor, context: torch.Tensor, insert_at: int, max_total: int) -> torch.Tensor:
        real = ids != self.pad_id
        outputs, mask = run_with_context(self.text.transformer, ids, real, context, insert_at, max_total)
        return self.text.proj(self.text.pooler(outputs, mask))


def _text_path(model: nn.Module) -> nn.Module:
    """The module holding everything the text path needs, taken out of a full open_clip model."""
    text = getattr(model, "text", None)
    if text is None:
        return TextTransformerTower(model)  # CLIP: the text weights live on the model itself
    if hasattr(text, "token_embedding"):
        return TextTransformerTower(text)
    if hasattr(text, "transformer") and hasattr(text, "pooler") and hasattr(text, "proj"):
        return text  # HFTextEncoder
    raise BundleInputError(f"open_clip text tower {type(text).__name__} is not supported by the prompt learner")


class _TowerAdapter(TextEncoderAdapter):
    """Shared ``tokenize``/``encode`` of adapters built on :class:`TextTransformerTower` or an HF tower."""

    tokenizer_fn: Callable[[list[str]], torch.Tensor]
    insert_at: int

    def _set_tower(self, tower: nn.Module, tokenizer: object, tokenizer_fn: Callable[[list[str]], torch.Tensor]):
        self.model = freeze(tower)
        self.tokenizer_fn = tokenizer_fn
        probe = tokenizer_fn(["a"])
        self.insert_at = int(int(probe[0, 0]) in start_token_ids(tokenizer))
        if isinstance(tower, TextTransformerTower):
            self._runner = None
            self.max_length = tower.max_tokens
            self.token_embedding_dim, self.output_dim = tower.width, tower.output_dim
        else:
            self._runner = HFTowerRunner(tower)
            self.max_length = int(probe.shape[1])
            self.token_embedding_dim, self.output_dim = self._runner.width, self._runner.output_dim

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids [N, L] of ``texts`` from the model's own tokenizer."""
        return {"input_ids": self.tokenizer_fn(list(texts)).long()}

    def encode(self, context: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        self._ensure_eval()
        ids = tokens["input_ids"].to(self.device)
        self._check_context(context, ids.shape[0])
        if self._runner is not None:
            return self._runner(ids, context, self.insert_at, self.max_length)
        return self.model(ids, context, self.insert_at)


class OpenCLIPTextEncoder(_TowerAdapter):
    """The frozen text tower of an open_clip model; the image tower is dropped after loading.

    Args:
        model_name: open_clip architecture (``"ViT-B-32"`` for CLIP and QuiltNet, ``"coca_ViT-B-32"``, a name added
            with ``open_clip.add_model_config``, or ``"hf-hub:org/repo"``, which downloads).
        checkpoint_path: local open_clip checkpoint (state dict file) loaded with ``open_clip.load_checkpoint``.
        pretrained: an open_clip pretrained tag (e.g. ``"openai"``) or ``"hf-hub:org/repo"``; downloads weights,
            so it is used only when set. Give either this or ``checkpoint_path``.
    """

    def __init__(self, model_name: str, checkpoint_path: str | None = None, pretrained: str | None = None) -> None:
        import open_clip
        from open_clip.factory import parse_model_name

        if checkpoint_path and pretrained:
            raise BundleInputError("open_clip text encoder: give either checkpoint_path or pretrained, not both")
        if pretrained and str(pretrained).startswith("hf-hub:"):
            model_name, pretrained = str(pretrained), None  # the hub repo defines architecture and weights
        schema, _ = parse_model_name(model_name)
        if schema is None and open_clip.get_model_config(model_name.replace("/", "-")) is None:
            raise BundleInputError(
                f"open_clip model {model_name!r} is unknown (model_name); see open_clip.list_models()"
            )
        path = Path(checkpoint_path).expanduser() if checkpoint_path else None
        if path is not None and not path.is_file():
            raise BundleInputError(f"open_clip checkpoint {path} does not exist (checkpoint_path)")
        try:
            # no weight downloads unless `pretrained` (or an hf-hub name) asks for them
            model = open_clip.create_model(model_name, pretrained=pretrained or None, pretrained_text=False)
        except (RuntimeError, OSError, ValueError) as error:
            if not pretrained and schema is None:
                raise
            raise BundleInputError(
                f"open_clip cannot load {model_name} (pretrained={pretrained!r}): {_first_line(error)}"
            ) from error
        if path is not None:
            try:
                open_clip.load_checkpoint(model, str(path))
            except Exception as error:  # pickle, size and key mismatches all mean: not this model's file
                raise BundleInputError(
                    f"open_clip checkpoint {path} cannot be loaded into {model_name}: {_first_line(error)}"
                ) from error
        tower = _text_path(model)
        del model  # frees the image tower (and CoCa's text decoder)
        self.model_name = model_name
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self._set_tower(tower, self.tokenizer, self.tokenizer)
