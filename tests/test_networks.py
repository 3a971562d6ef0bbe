"""Tests of bundle.networks: TransUNet outputs per encoder preset, FP stream, embeddings, freezing, weight loading."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
from safetensors.torch import save_file

from bundle.errors import BundleInputError
from bundle.networks import TransUNet, ViTEncoder, build_encoder

TINY_VIT = {"model_name": "vit_tiny_patch16_224", "depth": 2}
# a narrow hybrid TransUNet for the behaviour tests (fast on 2 CPU cores); shape tests use the defaults
SMALL_HYBRID = {
    "head_channels": 64,
    "decoder_channels": (32, 16, 16, 8),
    "encoder_kwargs": {"embed_dim": 48, "depth": 1, "num_heads": 2, "stem_channels": (8, 16, 32)},
}


def make_hybrid(default_size: bool = False, **kwargs) -> TransUNet:
    torch.manual_seed(0)
    options = {"num_classes": 3, "img_size": 128, **({} if default_size else SMALL_HYBRID), **kwargs}
    return TransUNet(**options)


def make_tiny_vit(**kwargs) -> TransUNet:
    torch.manual_seed(0)
    encoder_kwargs = {**TINY_VIT, **kwargs.pop("encoder_kwargs", {})}
    return TransUNet(num_classes=2, encoder="timm", encoder_kwargs=encoder_kwargs, img_size=64, **kwargs)


@pytest.fixture(scope="module")
def uni_net():
    """One random-weight UNI TransUNet (ViT-L) for the module, with the log records of building it."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("bundle.networks.encoders.vit")
    logger.addHandler(handler)
    try:
        torch.manual_seed(0)
        net = TransUNet(num_classes=2, encoder="uni")
    finally:
        logger.removeHandler(handler)
    return net, records


# ----------------------------------------------------------------------------------------------- shapes per preset


@pytest.mark.parametrize("height, width", [(128, 128), (96, 160)])
def test_hybrid_logits_shape_square_and_non_square(height, width):
    net = make_hybrid(default_size=True).eval()
    image = torch.randn(2, 3, height, width)
    with torch.no_grad():
        logits = net(image)
        features, skips = net.encoder(image)
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (2, 3, height, width)
    assert features.shape == (2, 128, height // 16, width // 16)
    assert [tuple(s.shape) for s in skips] == [
        (2, 64, height // 8, width // 8),
        (2, 32, height // 4, width // 4),
        (2, 16, height // 2, width // 2),
    ]


def test_hybrid_encoder_attributes_and_decoder_widths():
    net = make_hybrid(default_size=True)
    assert (net.encoder.out_channels, net.encoder.skip_channels, net.encoder.patch_size) == (128, (64, 32, 16), 16)
    assert net.encoder.pos_embed.shape == (1, 8 * 8, 128)  # img_size 128 -> 8x8 grid
    assert len(net.encoder.blocks) == 2
    first_convs = [block.convs[0].conv for block in net.decoder.blocks]
    # block i concatenates skip i (64, 32, 16) to the upsampled map; the last block has no skip
    widths = [(c.in_channels, c.out_channels) for c in first_convs]
    assert widths == [(512 + 64, 256), (256 + 32, 128), (128 + 16, 64), (64, 16)]
    assert net.decoder.conv_more.conv.in_channels == 128 and net.decoder.conv_more.conv.out_channels == 512


def test_timm_preset_shapes_and_skip_blocks():
    net = make_tiny_vit().eval()
    image = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        logits = net(image)
        features, skips = net.encoder(image)
    assert logits.shape == (2, 2, 64, 96)
    encoder = net.encoder
    assert isinstance(encoder, ViTEncoder)
    assert encoder.out_channels == 192 and encoder.skip_channels == (256, 128, 64)
    assert features.shape == (2, 192, 4, 6)
    assert [tuple(s.shape) for s in skips] == [(2, 256, 8, 12), (2, 128, 16, 24), (2, 64, 32, 48)]
    # depth 2 -> blocks (3*2//4, 2//2, 2//4) = (1, 1, 0) feed the 1/8, 1/4, 1/2 skips
    assert encoder.skip_indices == (1, 1, 0)
    with torch.no_grad():
        final, (block0, block1) = encoder.vit.forward_intermediates(image, indices=[0, 1], output_fmt="NCHW")
        assert torch.allclose(skips[0], encoder.skip_adapters[0](block1))
        assert torch.allclose(skips[1], encoder.skip_adapters[1](block1))
        assert torch.allclose(skips[2], encoder.skip_adapters[2](block0))
        # the feature map is the final (normed) token grid without the class token
        assert torch.allclose(features, final[:, 1:].reshape(2, 4, 6, 192).permute(0, 3, 1, 2))


def test_timm_grad_checkpointing_gives_the_same_gradients():
    plain, checkpointed = make_tiny_vit(), make_tiny_vit(encoder_kwargs={"grad_checkpointing": True})
    assert checkpointed.encoder.vit.grad_checkpointing and not plain.encoder.vit.grad_checkpointing
    image = torch.randn(2, 3, 32, 32)
    for net in (plain, checkpointed):
        net.train()(image).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        if name.startswith("projection_head."):  # not used by a plain call
            assert p.grad is None and q.grad is None
        else:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_uni_preset_arch_and_shapes(uni_net):
    net, records = uni_net
    vit = net.encoder.vit
    assert isinstance(vit, timm.models.VisionTransformer)
    assert (vit.embed_dim, len(vit.blocks), vit.patch_embed.patch_size) == (1024, 24, (16, 16))
    assert vit.pos_embed.shape == (1, 1 + 14 * 14, 1024)  # built at 224 as UNI; resampled per input
    assert torch.all(vit.blocks[0].ls1.gamma == 1e-5)
    assert net.encoder.skip_indices == (18, 12, 6)
    assert any(r.levelno == logging.WARNING and "random weights" in r.getMessage() for r in records)
    with torch.no_grad():
        logits = net.eval()(torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, 2, 32, 32)


# ------------------------------------------------------------------------------------- dict outputs, FP, embedding


def test_plain_call_returns_tensor_and_eval_is_deterministic():
    net = make_hybrid().eval()
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        first, second = net(image), net(image)
    assert isinstance(first, torch.Tensor)
    assert torch.equal(first, second)


@pytest.mark.parametrize(
    "kwargs, keys",
    [
        ({"perturb_from": 1, "return_embedding": True}, {"logits", "logits_fp", "embedding"}),
        ({"perturb_from": 1}, {"logits", "logits_fp"}),
        ({"return_embedding": True}, {"logits", "embedding"}),
    ],
)
def test_dict_keys_follow_flags(kwargs, keys):
    net = make_hybrid().train()
    out = net(torch.randn(3, 3, 64, 64), **kwargs)
    assert isinstance(out, dict) and set(out) == keys


def test_dict_shapes_and_unit_norm_embedding():
    net = make_hybrid(num_classes=4).train()
    out = net(torch.randn(5, 3, 96, 64), perturb_from=2, return_embedding=True)
    assert out["logits"].shape == (5, 4, 96, 64)
    assert out["logits_fp"].shape == (3, 4, 96, 64)
    assert out["embedding"].shape == (5, 128, 24, 16)
    norms = out["embedding"].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_projection_level_and_embedding_dim_choose_the_map():
    net = make_hybrid(embedding_dim=32, projection_level=2).train()
    out = net(torch.randn(2, 3, 64, 64), return_embedding=True)
    assert out["embedding"].shape == (2, 32, 32, 32)  # block 2 output is the 1/2 map
    assert net.projection_head[0].conv.in_channels == 16  # width of block 2


def test_fp_perturbs_only_the_tail_of_the_batch_on_encoder_map_and_every_skip():
    net = make_hybrid().train()
    seen = []
    dropout = net.feature_perturbation
    net.feature_perturbation = torch.nn.Sequential()  # identity we can hook
    net.feature_perturbation.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    net(torch.randn(5, 3, 64, 64), perturb_from=3)
    # encoder map (1/16) and the three skips, each for samples 3..4 only
    assert seen == [(2, 48, 4, 4), (2, 32, 8, 8), (2, 16, 16, 16), (2, 8, 32, 32)]
    assert isinstance(dropout, torch.nn.Dropout2d) and dropout.p == 0.5


def test_fp_stream_differs_in_train_mode_and_is_identity_in_eval_mode():
    net = make_hybrid()
    image = torch.randn(4, 3, 64, 64)
    torch.manual_seed(1)
    out = net.train()(image, perturb_from=2)
    assert out["logits_fp"].shape == (2, 3, 64, 64)
    assert not torch.allclose(out["logits_fp"], out["logits"][2:], atol=1e-3)
    with torch.no_grad():
        out = net.eval()(image, perturb_from=2)
        plain = net(image)
    assert torch.allclose(out["logits"], plain, atol=1e-5)
    assert torch.allclose(out["logits_fp"], plain[2:], atol=1e-5)


def test_perturb_from_whole_batch_gives_empty_fp_and_out_of_range_fails():
    net = make_hybrid().train()
    out = net(torch.randn(2, 3, 32, 32), perturb_from=2)
    assert out["logits_fp"].shape == (0, 3, 32, 32)
    with pytest.raises(ValueError, match="perturb_from"):
        net(torch.randn(2, 3, 32, 32), perturb_from=3)


def test_gradient_reaches_projection_head_only_through_the_embedding():
    net = make_hybrid().train()
    image = torch.randn(2, 3, 64, 64)
    net(image, return_embedding=True)["embedding"].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.projection_head.parameters())
    net.zero_grad(set_to_none=True)
    net(image, perturb_from=1)["logits"].sum().backward()
    assert all(p.grad is None for p in net.projection_head.parameters())
    assert net.segmentation_head.weight.grad is not None


def test_input_size_not_divisible_by_16_is_an_input_error():
    net = make_hybrid().eval()
    with pytest.raises(BundleInputError, match="100x64"):
        net(torch.randn(1, 3, 100, 64))


# ------------------------------------------------------------------------------------ freezing and param groups


def test_freeze_encoder_hybrid_no_grads_eval_mode_and_no_group():
    net = make_hybrid(freeze_encoder=True)
    net.train()
    assert not any(m.training for m in net.encoder.modules())
    assert net.decoder.training and net.projection_head.training
    out = net(torch.randn(2, 3, 64, 64), perturb_from=1, return_embedding=True)
    (out["logits"].sum() + out["logits_fp"].sum() + out["embedding"].sum()).backward()
    assert all(not p.requires_grad and p.grad is None for p in net.encoder.parameters())
    assert all(p.grad is not None for p in net.decoder.parameters())
    groups = net.parameter_groups(1e-3)
    assert [g["name"] for g in groups] == ["decoder"]
    encoder_ids = {id(p) for p in net.encoder.parameters()}
    assert not any(id(p) in encoder_ids for p in groups[0]["params"])


def test_freeze_encoder_keeps_frozen_bn_statistics():
    net = make_hybrid(freeze_encoder=True).train()
    bn = net.encoder.stem[0].conv.unit0.adn.N
    before = bn.running_mean.clone()
    net(torch.randn(2, 3, 64, 64) * 5 + 3)
    assert torch.equal(bn.running_mean, before)


def test_freeze_encoder_vit_trains_skip_adapters():
    net = make_tiny_vit(freeze_encoder=True).train()
    assert not net.encoder.vit.training and net.encoder.skip_adapters.training
    net(torch.randn(1, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in net.encoder.vit.parameters())
    assert all(p.grad is not None for p in net.encoder.skip_adapters.parameters())
    adapters = {id(p) for p in net.encoder.skip_adapters.parameters()}
    (group,) = net.parameter_groups(0.01)
    assert adapters <= {id(p) for p in group["params"]}


def test_parameter_groups_learning_rates_and_partition():
    net = make_tiny_vit()
    groups = net.parameter_groups(0.01, encoder_lr_scale=0.1, weight_decay=1e-4)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("encoder", pytest.approx(0.001), 1e-4),
        ("decoder", 0.01, 1e-4),
    ]
    assert set(groups[0]) == {"params", "lr", "name", "weight_decay"}
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in net.encoder.vit.parameters()}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in net.parameters())  # every parameter exactly once
    assert [g["name"] for g in net.parameter_groups(0.01, encoder_lr_scale=0.0)] == ["decoder"]
    assert "weight_decay" not in net.parameter_groups(0.01)[0]
    torch.optim.AdamW(groups)  # the groups are valid optimizer input


# ----------------------------------------------------------------------------------------------- weight loading


def _tiny_vit_state(with_head: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    vit = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=64, num_classes=5 if with_head else 0)
    return {k: v.clone() for k, v in vit.state_dict().items()}


def _assert_same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_timm_checkpoint_pth_is_loaded(tmp_path):
    state = _tiny_vit_state(with_head=False)
    path = tmp_path / "vit.pth"
    torch.save(state, path)
    net = make_tiny_vit(encoder_kwargs={"checkpoint_path": str(path)})
    _assert_same_weights(net.encoder.vit, state)


def test_timm_checkpoint_wrapped_with_prefix_and_head_safetensors(tmp_path):
    state = _tiny_vit_state(with_head=True)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    net = make_tiny_vit(encoder_kwargs={"checkpoint_path": wrapped})
    _assert_same_weights(net.encoder.vit, {k: v for k, v in state.items() if not k.startswith("head.")})
    safetensors_path = tmp_path / "vit.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in state.items()}, str(safetensors_path))
    net = make_tiny_vit(encoder_kwargs={"checkpoint_path": str(safetensors_path)})
    _assert_same_weights(net.encoder.vit, {k: v for k, v in state.items() if not k.startswith("head.")})


def test_timm_checkpoint_missing_file_and_wrong_keys(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(BundleInputError, match=f"{missing} does not exist"):
        make_tiny_vit(encoder_kwargs={"checkpoint_path": str(missing)})
    wrong = tmp_path / "wrong.pth"
    state = _tiny_vit_state(with_head=False)
    state["extra.weight"] = state.pop("norm.weight")
    torch.save(state, wrong)
    with pytest.raises(BundleInputError, match=rf"{wrong} does not match .*missing keys \(norm.weight\).*extra.weight"):
        make_tiny_vit(encoder_kwargs={"checkpoint_path": str(wrong)})
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(BundleInputError, match=f"{garbage} cannot be read"):
        make_tiny_vit(encoder_kwargs={"checkpoint_path": str(garbage)})


def test_uni_checkpoint_loads_strictly(uni_net, tmp_path):
    net, _ = uni_net
    state = net.encoder.vit.state_dict()
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    loaded = TransUNet(num_classes=2, encoder="uni", encoder_kwargs={"checkpoint_path": str(path)})
    _assert_same_weights(loaded.encoder.vit, state)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in loaded.parameters())


def test_uni_wrong_file_names_the_file_and_keys(tmp_path):
    wrong = tmp_path / "not_uni.pth"
    torch.save(_tiny_vit_state(with_head=False), wrong)
    message = rf"{wrong} does not match UNI .*missing keys \(blocks\.0\.ls1\.gamma.*another shape"
    with pytest.raises(BundleInputError, match=message):
        TransUNet(encoder="uni", encoder_kwargs={"checkpoint_path": str(wrong)})
    with pytest.raises(BundleInputError, match="does not exist"):
        TransUNet(encoder="uni", encoder_kwargs={"checkpoint_path": str(tmp_path / "missing.bin")})


# -------------------------------------------------------------------------------------------- options, tracing


def test_bad_options_are_input_errors():
    with pytest.raises(BundleInputError, match="unknown encoder 'resnet'"):
        TransUNet(encoder="resnet")
    with pytest.raises(BundleInputError, match="does not take encoder_kwargs depht"):
        build_encoder("hybrid", depht=2)
    with pytest.raises(BundleInputError, match="model_name 'no_such_vit'"):
        build_encoder("timm", model_name="no_such_vit")
    with pytest.raises(BundleInputError, match="patch size"):
        build_encoder("timm", model_name="vit_tiny_patch16_224", patch_size=8, depth=1, img_size=64)
    with pytest.raises(BundleInputError, match="decoder_channels"):
        TransUNet(decoder_channels=(64, 32, 16))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # timm's size check on the position embedding
def test_hybrid_plain_forward_is_traceable():
    net = make_hybrid(default_size=True).eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        traced = torch.jit.trace(net, image)
        assert torch.allclose(traced(image), net(image), atol=1e-5)


# ---------------------------------------------------------------------------------------- full-resolution skip


def test_full_res_skip_feeds_the_last_decoder_block_and_trains_with_the_decoder():
    net = make_hybrid(full_res_skip=8)
    assert net.decoder.num_skips == 4 and net.decoder.blocks[-1].convs[0].in_channels == 16 + 8
    image = torch.randn(2, 3, 64, 96, requires_grad=True)
    logits = net(image)
    assert logits.shape == (2, 3, 64, 96)
    logits[0, :, 10, 20].sum().backward()
    assert all(p.grad is not None for p in net.full_res_stem.parameters())
    decoder_group = next(g for g in net.parameter_groups(1e-3) if g["name"] == "decoder")
    stem_ids = {id(p) for p in net.full_res_stem.parameters()}
    assert stem_ids <= {id(p) for p in decoder_group["params"]}
    assert make_hybrid().full_res_stem is None and make_hybrid().decoder.num_skips == 3
    with pytest.raises(BundleInputError, match="full_res_skip"):
        make_hybrid(full_res_skip=-1)
