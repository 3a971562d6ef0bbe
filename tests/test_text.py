"""Tests of the text prototypes: frozen encoder adapters (Hugging Face, open_clip, CONCH) and the prompt learner.

The insertion path is checked exactly: context vectors equal to the token embeddings of real words must give the
encoder's own output for the text with those words in front of the description (truncation included).
"""

from __future__ import annotations

import copy
import json
import sys
import types

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer

from bundle.errors import BundleInputError
from bundle.text import (
    CONCHTextEncoder,
    HuggingFaceTextEncoder,
    OpenCLIPTextEncoder,
    PromptLearner,
    TextTransformerTower,
    build_text_encoder,
)
from bundle.text.base import fit_tokens, shift_positions

DESCRIPTIONS = [
    "background tissue: stroma, lumen and non-glandular areas",
    "colon gland: epithelial cells lining a glandular lumen",
]
LONG_DESCRIPTION = "background tissue with stroma lumen and non glandular areas " * 9  # > 77 CLIP tokens
PREFIX = "simple columnar"  # words whose token embeddings serve as context vectors

_VISION = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16}
_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
TINY_CONFIGS = {
    # CLIP class: argmax pooling at the EOT token, text_projection a Parameter
    "mpamatch-test-clip": {"embed_dim": 24, "vision_cfg": _VISION, "text_cfg": _TEXT},
    # CustomTextCLIP towers with the other pool types and projection forms
    "mpamatch-test-eos-linear": {
        "embed_dim": 24,
        "custom_text": True,
        "vision_cfg": _VISION,
        "text_cfg": {**_TEXT, "pool_type": "eos", "eos_id": 49407, "proj_bias": True},
    },
    "mpamatch-test-first-noproj": {
        "embed_dim": 24,
        "custom_text": True,
        "vision_cfg": _VISION,
        "text_cfg": {**_TEXT, "pool_type": "first", "proj_type": "none"},
    },
    "mpamatch-test-last": {
        "embed_dim": 24,
        "custom_text": True,
        "vision_cfg": _VISION,
        "text_cfg": {**_TEXT, "pool_type": "last"},
    },
    # CoCa-style tower: class token appended and pooled
    "mpamatch-test-cls": {
        "embed_dim": 24,
        "custom_text": True,
        "vision_cfg": _VISION,
        "text_cfg": {**_TEXT, "context_length": 76, "embed_cls": True},
    },
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, config in TINY_CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return list(TINY_CONFIGS)


@pytest.fixture(scope="module")
def minilm() -> HuggingFaceTextEncoder:
    return HuggingFaceTextEncoder()


@pytest.fixture(scope="module")
def coca() -> tuple[OpenCLIPTextEncoder, torch.nn.Module]:
    """The adapter and the full open_clip model with the same random weights."""
    torch.manual_seed(0)
    adapter = OpenCLIPTextEncoder("coca_ViT-B-32")
    torch.manual_seed(0)
    reference = open_clip.create_model("coca_ViT-B-32", pretrained_text=False).eval()
    return adapter, reference


def _no_context(adapter, n: int) -> torch.Tensor:
    return torch.zeros(n, 0, adapter.token_embedding_dim)


def _word_ids(ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The ids between the start and the end token of one tokenized row."""
    last = int(torch.nonzero(real).max())
    return ids[1:last]


def _prefix_context(adapter, embedding: torch.nn.Embedding, n: int) -> torch.Tensor:
    tokens = adapter.tokenize([PREFIX])
    ids = tokens["input_ids"][0]
    real = tokens["attention_mask"][0].bool() if "attention_mask" in tokens else ids != 0
    words = _word_ids(ids, real)
    assert len(words) >= 2
    return embedding.weight[words].detach().unsqueeze(0).expand(n, -1, -1).clone()


def _encoder_weights(adapter) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in adapter.parameters()]


# ---------------------------------------------------------------- shared token helpers


def test_fit_tokens_keeps_the_end_token_when_cutting():
    ids = torch.tensor([[1, 5, 6, 7, 9, 0], [1, 5, 9, 0, 0, 0]])
    fitted, real = fit_tokens(ids, ids != 0, n_insert=2, max_total=5, insert_at=1)
    assert fitted.tolist() == [[1, 5, 9], [1, 5, 9]]
    assert real.tolist() == [[True, True, True], [True, True, True]]
    unchanged, _ = fit_tokens(ids, ids != 0, n_insert=0, max_total=6, insert_at=1)
    assert unchanged.tolist() == ids.tolist()
    assert shift_positions(torch.tensor([0, 1, 4]), 3, 1).tolist() == [0, 4, 7]
    with pytest.raises(BundleInputError, match="n_ctx=4"):
        fit_tokens(ids, ids != 0, n_insert=4, max_total=6, insert_at=1)


# ---------------------------------------------------------------- Hugging Face adapter (real all-MiniLM-L6-v2)


def test_minilm_adapter_shapes(minilm):
    assert (minilm.token_embedding_dim, minilm.output_dim, minilm.insert_at) == (384, 384, 1)
    tokens = minilm.tokenize(DESCRIPTIONS)
    assert set(tokens) == {"input_ids", "attention_mask"}
    features = minilm.encode(torch.randn(2, 4, 384) * 0.02, tokens)
    assert features.shape == (2, 384) and torch.isfinite(features).all()
    assert all(not p.requires_grad for p in minilm.parameters()) and not minilm.model.training


def test_minilm_without_context_is_the_mean_pooled_sentence_embedding(minilm):
    tokens = minilm.tokenize(DESCRIPTIONS)
    features = minilm.encode(_no_context(minilm, 2), tokens)
    with torch.no_grad():
        hidden = minilm.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    expected = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


def test_minilm_without_context_matches_sentence_transformers(minilm):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    model = sentence_transformers.SentenceTransformer(str(minilm.model_path), device="cpu")
    expected = model.encode(DESCRIPTIONS, convert_to_tensor=True)  # mean pooling + L2 normalisation
    features = minilm.encode(_no_context(minilm, 2), minilm.tokenize(DESCRIPTIONS))
    torch.testing.assert_close(F.normalize(features, dim=-1), expected.float().cpu(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("max_length", [77, 16])
def test_minilm_context_of_word_embeddings_equals_those_words_in_the_text(minilm, max_length):
    adapter = minilm if max_length == 77 else HuggingFaceTextEncoder(max_length=max_length)
    texts = [DESCRIPTIONS[1], LONG_DESCRIPTION]  # the long one is cut at 16 tokens, keeping [SEP]
    context = _prefix_context(adapter, adapter.model.get_input_embeddings(), 2)
    features = adapter.encode(context, adapter.tokenize(texts))
    expected = adapter.encode(_no_context(adapter, 2), adapter.tokenize([f"{PREFIX} {text}" for text in texts]))
    torch.testing.assert_close(features, expected, atol=2e-5, rtol=1e-4)


def test_minilm_cls_pooling_and_bad_options(tmp_path):
    adapter = HuggingFaceTextEncoder(pooling="cls")
    tokens = adapter.tokenize(DESCRIPTIONS[:1])
    features = adapter.encode(_no_context(adapter, 1), tokens)
    with torch.no_grad():
        expected = adapter.model(**tokens).last_hidden_state[:, 0]
    torch.testing.assert_close(features, expected)
    with pytest.raises(BundleInputError, match="pooling 'max'"):
        HuggingFaceTextEncoder(pooling="max")
    with pytest.raises(BundleInputError, match=str(tmp_path / "missing")):
        HuggingFaceTextEncoder(model_path=str(tmp_path / "missing"))


# ---------------------------------------------------------------- prompt learner


def test_prompt_learner_gradients_reach_only_context_and_projection(minilm):
    torch.manual_seed(0)
    learner = PromptLearner(minilm, DESCRIPTIONS, n_ctx=4, embedding_dim=128)
    prototypes = learner()
    assert prototypes.shape == (2, 128)
    torch.testing.assert_close(prototypes.norm(dim=-1), torch.ones(2))
    assert float(prototypes[0].detach() @ prototypes[1].detach()) < 0.99  # different classes, different prototypes
    encoder_before = _encoder_weights(minilm)
    ctx_before = learner.ctx.detach().clone()
    optimizer = torch.optim.SGD(learner.parameters(), lr=1.0)
    loss = -(prototypes * torch.randn(2, 128)).sum()
    loss.backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert learner.projection.weight.grad.abs().sum() > 0 and learner.projection.bias.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in minilm.parameters())
    optimizer.step()
    assert not torch.equal(learner.ctx.detach(), ctx_before)
    assert all(torch.equal(a, b) for a, b in zip(_encoder_weights(minilm), encoder_before))


def test_prompt_learner_state_dict_and_checkpoint_round_trip(minilm, tmp_path):
    torch.manual_seed(0)
    learner = PromptLearner(minilm, DESCRIPTIONS, n_ctx=3, embedding_dim=16)
    assert set(learner.state_dict()) == {"ctx", "projection.weight", "projection.bias"}
    assert learner.ctx.shape == (2, 3, 384)
    assert {name for name, _ in learner.named_parameters()} == {"ctx", "projection.weight", "projection.bias"}
    path = tmp_path / "prompt_learner.pt"
    torch.save(learner.state_dict(), path)
    restored = PromptLearner(minilm, DESCRIPTIONS, n_ctx=3, embedding_dim=16)
    restored.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(restored(), learner())
    assert learner.to("cpu") is learner and minilm.device == torch.device("cpu")
    assert learner.tokens()["input_ids"].device == torch.device("cpu")
    twin = copy.deepcopy(learner)
    assert twin.text_encoder is learner.text_encoder and twin.ctx is not learner.ctx


def test_prompt_learner_encodes_all_classes_in_one_encoder_call(minilm, monkeypatch):
    learner = PromptLearner(minilm, DESCRIPTIONS + ["lumen"], n_ctx=4, embedding_dim=8)
    calls = []
    encode = minilm.encode

    def counting_encode(context, tokens):
        calls.append((tuple(context.shape), tuple(tokens["input_ids"].shape[:1])))
        return encode(context, tokens)

    monkeypatch.setattr(minilm, "encode", counting_encode)
    assert learner().shape == (3, 8)
    assert calls == [((3, 4, 384), (3,))]


def test_prompt_learner_from_config_dict_and_input_errors():
    learner = PromptLearner({"kind": "huggingface", "pooling": "mean"}, DESCRIPTIONS, n_ctx=2, embedding_dim=8)
    assert isinstance(learner.text_encoder, HuggingFaceTextEncoder) and learner().shape == (2, 8)
    with pytest.raises(BundleInputError, match="huggingface, open_clip, conch"):
        build_text_encoder("bert")
    with pytest.raises(BundleInputError, match="colour"):
        build_text_encoder("huggingface", colour="red")
    with pytest.raises(BundleInputError, match="'kind'"):
        PromptLearner({"pooling": "mean"}, DESCRIPTIONS)
    with pytest.raises(BundleInputError, match=r"class_descriptions\[1\]"):
        PromptLearner(learner.text_encoder, ["gland", " "])


def test_prompt_learner_under_autocast(minilm):
    torch.manual_seed(0)
    learner = PromptLearner(minilm, DESCRIPTIONS, n_ctx=4, embedding_dim=32)
    with torch.no_grad():
        reference = learner()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prototypes = learner()
    prototypes.float().sum().backward()
    assert torch.isfinite(learner.ctx.grad).all() and learner.ctx.grad.abs().sum() > 0
    assert F.cosine_similarity(prototypes.float(), reference, dim=-1).min() > 0.98


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prompt_learner_follows_cuda_and_runs_under_fp16_autocast(minilm):
    torch.manual_seed(0)
    learner = PromptLearner(minilm, DESCRIPTIONS, n_ctx=4, embedding_dim=32)
    with torch.no_grad():
        reference = learner()
    try:
        assert learner.cuda() is learner and minilm.device.type == "cuda"
        assert learner.tokens()["input_ids"].device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.float16):
            prototypes = learner()
        prototypes.float().sum().backward()
        assert torch.isfinite(learner.ctx.grad).all() and learner.ctx.grad.abs().sum() > 0
        assert F.cosine_similarity(prototypes.float().cpu(), reference, dim=-1).min() > 0.99
    finally:
        learner.cpu()
    assert minilm.device == torch.device("cpu")


# ---------------------------------------------------------------- open_clip adapter


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_open_clip_towers_match_encode_text(tiny_models, name):
    torch.manual_seed(0)
    adapter = OpenCLIPTextEncoder(name)
    torch.manual_seed(0)
    reference = open_clip.create_model(name, pretrained_text=False).eval()
    texts = [DESCRIPTIONS[1], LONG_DESCRIPTION]
    tokens = adapter.tokenize(texts)
    features = adapter.encode(_no_context(adapter, 2), tokens)
    with torch.no_grad():
        expected = reference.encode_text(tokens["input_ids"])
    assert features.shape == expected.shape == (2, adapter.output_dim)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    # context = embeddings of real words: same as those words in the text (the long text is cut, keeping EOT)
    context = _prefix_context(adapter, adapter.model.token_embedding, 2)
    features = adapter.encode(context, tokens)
    with torch.no_grad():
        expected = reference.encode_text(adapter.tokenize([f"{PREFIX} {text}" for text in texts])["input_ids"])
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        {"no_causal_mask": True, "use_pad_mask": True, "pool_type": "first"},
        {"context_length": 76, "embed_cls": True, "correct_cls_mask": True},
        {"context_length": 76, "embed_cls": True, "correct_cls_mask": False},
    ],
)
def test_text_transformer_tower_mirrors_padding_and_class_token_masks(options):
    torch.manual_seed(0)
    settings = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, "output_dim": 24}
    text = TextTransformer(**{**settings, **options}).eval()
    tower = TextTransformerTower(text)
    tokenizer = open_clip.SimpleTokenizer(context_length=tower.max_tokens)
    ids = tokenizer([DESCRIPTIONS[0], LONG_DESCRIPTION])
    with torch.no_grad():
        torch.testing.assert_close(tower(ids, torch.zeros(2, 0, 32)), text(ids), atol=1e-5, rtol=1e-5)
        prefix = tokenizer([PREFIX])[0]
        context = text.token_embedding.weight[_word_ids(prefix, prefix != 0)].expand(2, -1, -1)
        expected = text(tokenizer([f"{PREFIX} {DESCRIPTIONS[0]}", f"{PREFIX} {LONG_DESCRIPTION}"]))
        torch.testing.assert_close(tower(ids, context), expected, atol=1e-5, rtol=1e-5)


def test_open_clip_gradients_and_autocast(tiny_models):
    adapter = OpenCLIPTextEncoder("mpamatch-test-clip")
    learner = PromptLearner(adapter, DESCRIPTIONS, n_ctx=4, embedding_dim=8)
    assert learner.ctx.shape == (2, 4, 32)
    (learner() * torch.randn(2, 8)).sum().backward()
    assert learner.ctx.grad.abs().sum() > 0 and learner.projection.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in adapter.parameters())
    with torch.no_grad():
        reference = learner()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_precision = learner()
    assert F.cosine_similarity(low_precision.float(), reference, dim=-1).min() > 0.98


def test_coca_tower_matches_encode_text_and_keeps_only_the_text_path(coca):
    adapter, reference = coca
    assert (adapter.token_embedding_dim, adapter.output_dim, adapter.max_length, adapter.insert_at) == (512, 512, 76, 1)
    text_parameters = sum(p.numel() for p in reference.text.parameters())
    assert sum(p.numel() for p in adapter.parameters()) == text_parameters  # no image tower, no text decoder
    texts = [DESCRIPTIONS[0], LONG_DESCRIPTION]
    tokens = adapter.tokenize(texts)
    with torch.no_grad():
        expected = reference.encode_text(tokens["input_ids"], normalize=False)
        prefixed = reference.encode_text(adapter.tokenize([f"{PREFIX} {t}" for t in texts])["input_ids"], False)
    torch.testing.assert_close(adapter.encode(_no_context(adapter, 2), tokens), expected, atol=1e-5, rtol=1e-5)
    context = _prefix_context(adapter, adapter.model.token_embedding, 2).requires_grad_(True)
    features = adapter.encode(context, tokens)
    torch.testing.assert_close(features.detach(), prefixed, atol=1e-5, rtol=1e-5)
    features.sum().backward()
    assert context.grad.abs().sum() > 0
    assert all(p.grad is None for p in adapter.parameters())


def test_open_clip_checkpoint_loading(tiny_models, tmp_path):
    torch.manual_seed(1)
    source = open_clip.create_model("mpamatch-test-clip").eval()
    path = tmp_path / "clip.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    adapter = OpenCLIPTextEncoder("mpamatch-test-clip", checkpoint_path=str(path))
    weights = source.state_dict()
    tower_weights = adapter.model.state_dict()
    assert len(tower_weights) > 10
    assert all(torch.equal(value, weights[key]) for key, value in tower_weights.items())
    tokens = adapter.tokenize(DESCRIPTIONS)
    with torch.no_grad():
        expected = source.encode_text(tokens["input_ids"])
    torch.testing.assert_close(adapter.encode(_no_context(adapter, 2), tokens), expected)


def test_open_clip_input_errors(tiny_models, tmp_path):
    missing = tmp_path / "absent.pt"
    with pytest.raises(BundleInputError, match=str(missing)):
        OpenCLIPTextEncoder("mpamatch-test-clip", checkpoint_path=str(missing))
    other = tmp_path / "other.pt"
    torch.save(open_clip.create_model("mpamatch-test-cls").state_dict(), other)
    with pytest.raises(BundleInputError, match=f"{other} cannot be loaded into mpamatch-test-clip"):
        OpenCLIPTextEncoder("mpamatch-test-clip", checkpoint_path=str(other))
    with pytest.raises(BundleInputError, match="'no-such-model' is unknown"):
        OpenCLIPTextEncoder("no-such-model")
    with pytest.raises(BundleInputError, match="pretrained='no-such-tag'"):
        OpenCLIPTextEncoder("mpamatch-test-clip", pretrained="no-such-tag")
    with pytest.raises(BundleInputError, match="either checkpoint_path or pretrained"):
        OpenCLIPTextEncoder("mpamatch-test-clip", checkpoint_path=str(other), pretrained="openai")
    with pytest.raises(BundleInputError, match="n_ctx=80"):
        PromptLearner(OpenCLIPTextEncoder("mpamatch-test-clip"), DESCRIPTIONS, n_ctx=80)()


def test_open_clip_hugging_face_tower(minilm, tmp_path):
    """A BiomedCLIP-style model: the open_clip text tower is a Hugging Face BERT (here MiniLM, random init)."""
    folder = str(minilm.model_path)
    config = {
        "embed_dim": 24,
        "vision_cfg": _VISION,
        "text_cfg": {
            "hf_model_name": folder,
            "hf_tokenizer_name": folder,
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": 24,
        },
    }
    (tmp_path / "mpamatch-test-hf.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "mpamatch-test-hf.json")
    torch.manual_seed(0)
    adapter = OpenCLIPTextEncoder("mpamatch-test-hf")
    torch.manual_seed(0)
    reference = open_clip.create_model("mpamatch-test-hf", pretrained_text=False).eval()
    assert (adapter.token_embedding_dim, adapter.output_dim, adapter.max_length) == (384, 24, 24)
    texts = [DESCRIPTIONS[0], LONG_DESCRIPTION]
    tokens = adapter.tokenize(texts)
    with torch.no_grad():
        expected = reference.encode_text(tokens["input_ids"])
        prefixed = reference.encode_text(adapter.tokenize([f"{PREFIX} {t}" for t in texts])["input_ids"])
    torch.testing.assert_close(adapter.encode(_no_context(adapter, 2), tokens), expected, atol=1e-5, rtol=1e-5)
    embedding = adapter.model.transformer.get_input_embeddings()
    prefix_ids = adapter.tokenize([PREFIX])["input_ids"][0]
    context = embedding.weight[_word_ids(prefix_ids, prefix_ids != 0)].detach().expand(2, -1, -1)
    torch.testing.assert_close(adapter.encode(context, tokens), prefixed, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- CONCH adapter


def test_conch_without_its_package_is_a_clear_input_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "conch", None)  # `import conch` raises ImportError
    checkpoint = tmp_path / "pytorch_model.bin"
    checkpoint.write_bytes(b"")
    with pytest.raises(BundleInputError, match="needs the `conch` package: pip install git"):
        CONCHTextEncoder(str(checkpoint))
    with pytest.raises(BundleInputError, match="Mahmoodlab/CONCH.git"):
        build_text_encoder("conch", checkpoint_path=str(checkpoint))


def test_conch_adapter_wiring_with_a_stand_in_package(monkeypatch, tmp_path, tiny_models):
    """CONCH's API (create_model_from_pretrained, get_tokenizer, tokenize) served by a tiny open_clip CoCa tower."""
    created = {}

    def create_model_from_pretrained(model_name, checkpoint_path, return_transform):
        assert (model_name, return_transform) == ("conch_ViT-B-16", False)
        if open(checkpoint_path, "rb").read() == b"broken":
            raise RuntimeError("Error(s) in loading state_dict for CoCa:\n\tMissing key(s) ...")
        torch.manual_seed(1)
        created["model"] = open_clip.create_model("mpamatch-test-cls", pretrained_text=False).eval()
        # as CONCH's loader: whatever the file holds is loaded with strict=False
        created["model"].load_state_dict(torch.load(checkpoint_path, weights_only=True), strict=False)
        return created["model"]

    def tokenize(tokenizer, texts):  # CONCH appends a placeholder for the class token
        return F.pad(tokenizer(texts), (0, 1), value=0)

    package = types.ModuleType("conch.open_clip_custom")
    package.create_model_from_pretrained = create_model_from_pretrained
    package.get_tokenizer = lambda: open_clip.SimpleTokenizer(context_length=76)
    package.tokenize = tokenize
    monkeypatch.setitem(sys.modules, "conch", types.ModuleType("conch"))
    monkeypatch.setitem(sys.modules, "conch.open_clip_custom", package)
    missing = tmp_path / "conch.bin"
    with pytest.raises(BundleInputError, match=f"CONCH checkpoint {missing} does not exist"):
        CONCHTextEncoder(str(missing))
    missing.write_bytes(b"broken")
    with pytest.raises(BundleInputError, match=f"CONCH checkpoint {missing} cannot be loaded.*Error"):
        CONCHTextEncoder(str(missing))
    torch.manual_seed(0)
    weights = open_clip.create_model("mpamatch-test-cls", pretrained_text=False).state_dict()
    # a file without the text tower (here: the image tower only) would leave a random text tower behind
    torch.save({k: v for k, v in weights.items() if not k.startswith("text.")}, missing)
    text_keys = sum(k.startswith("text.") for k in weights)
    with pytest.raises(
        BundleInputError, match=f"{missing} is not a CONCH text tower: {text_keys} of its {text_keys} t"
    ):
        CONCHTextEncoder(str(missing))
    torch.save(weights, missing)
    adapter = CONCHTextEncoder(str(missing))
    torch.testing.assert_close(created["model"].text.token_embedding.weight, weights["text.token_embedding.weight"])
    tokens = adapter.tokenize(DESCRIPTIONS)
    assert tokens["input_ids"].shape == (2, 76) and adapter.max_length == 76
    with torch.no_grad():
        expected = created["model"].encode_text(tokens["input_ids"])
    torch.testing.assert_close(adapter.encode(_no_context(adapter, 2), tokens), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the random-features control


def test_random_text_features_are_fixed_and_only_the_projection_learns():
    learner = PromptLearner({"kind": "random", "seed": 3}, DESCRIPTIONS, n_ctx=4, embedding_dim=16)
    again = PromptLearner({"kind": "random", "seed": 3}, ["other words", "entirely"], n_ctx=4, embedding_dim=16)
    other_seed = PromptLearner({"kind": "random", "seed": 4}, DESCRIPTIONS, n_ctx=4, embedding_dim=16)
    features = learner.encode()
    assert features.shape == (2, 384) and torch.allclose(features.norm(dim=1), torch.ones(2))
    assert torch.equal(features, again.encode())  # the text is not read: same seed, same vectors
    assert not torch.allclose(features, other_seed.encode())
    learner.ctx.data.normal_()
    assert torch.equal(learner.encode(), features)  # the context vectors change nothing
    learner().sum().backward()
    assert learner.ctx.grad is None and learner.projection.weight.grad is not None
    assert torch.isfinite(learner.projection.weight.grad).all()
