"""Loss functions against hand-computed values: supervised, consistency, prototype contrast, the EMA bank, totals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bundle.errors import BundleInputError
from bundle.losses import (
    ConsistencyLoss,
    ImagePrototypeBank,
    MPAMatchLoss,
    StepOutputs,
    SupervisedLoss,
    flatten_pixels,
    prototype_contrast_loss,
    sample_balanced_pixels,
)

LN3 = math.log(3.0)


def two_pixel_logits() -> torch.Tensor:
    """Pixel 0: p = (0.25, 0.75); pixel 1: p = (0.5, 0.5). Shape [1, 2, 1, 2]."""
    return torch.tensor([[[[0.0, 0.0]], [[LN3, 0.0]]]])


def test_supervised_loss_hand_computed():
    target = torch.tensor([[[1, 0]]])
    ce = (-math.log(0.75) - math.log(0.5)) / 2
    # batch Dice over both classes: class 0 p=(.25,.5) t=(0,1); class 1 p=(.75,.5) t=(1,0)
    dice = ((1 - 2 * 0.5 / 1.75) + (1 - 2 * 0.75 / 2.25)) / 2
    loss = SupervisedLoss()(two_pixel_logits(), target)
    assert loss.item() == pytest.approx(0.5 * ce + 0.5 * dice, abs=1e-5)
    ce_only = SupervisedLoss(ce_weight=1.0, dice_weight=0.0)(two_pixel_logits(), target[:, None])
    assert ce_only.item() == pytest.approx(ce, abs=1e-6)


def test_supervised_loss_ignores_pixels():
    target = torch.tensor([[[1, 255]]])
    ce = -math.log(0.75)
    dice = ((1 - 1e-5 / (0.25 + 1e-5)) + (1 - 2 * 0.75 / 1.75)) / 2
    loss = SupervisedLoss()(two_pixel_logits(), target)
    assert loss.item() == pytest.approx(0.5 * ce + 0.5 * dice, abs=1e-5)
    # changing the logits of the ignored pixel changes nothing
    logits = two_pixel_logits()
    logits[0, :, 0, 1] = torch.tensor([5.0, -5.0])
    assert SupervisedLoss()(logits, target).item() == pytest.approx(loss.item(), abs=1e-6)
    # everything ignored: zero loss that still back-propagates
    logits = two_pixel_logits().requires_grad_()
    empty = SupervisedLoss()(logits, torch.full((1, 1, 2), 255))
    empty.backward()
    assert empty.item() == 0.0 and logits.grad is not None


def test_consistency_loss_normalises_by_valid_pixels():
    pseudo = torch.tensor([[[1, 0]]])
    reliable = torch.tensor([[[True, False]]])
    loss = ConsistencyLoss()(two_pixel_logits(), pseudo, reliable)
    assert loss.item() == pytest.approx(-math.log(0.75) / 2, abs=1e-6)  # 1 reliable pixel / 2 valid pixels
    valid = torch.tensor([[[True, False]]])
    loss = ConsistencyLoss()(two_pixel_logits(), pseudo, torch.ones_like(reliable), valid)
    assert loss.item() == pytest.approx(-math.log(0.75), abs=1e-6)
    none_reliable = ConsistencyLoss(dice_weight=0.5)(two_pixel_logits(), pseudo, torch.zeros_like(reliable))
    assert none_reliable.item() == 0.0


def test_consistency_loss_with_dice():
    pseudo = torch.tensor([[[1, 0]]])
    reliable = torch.tensor([[[True, True]]])
    dice = ((1 - 2 * 0.5 / 1.75) + (1 - 2 * 0.75 / 2.25)) / 2
    ce = (-math.log(0.75) - math.log(0.5)) / 2
    loss = ConsistencyLoss(ce_weight=1.0, dice_weight=1.0)(two_pixel_logits(), pseudo, reliable)
    assert loss.item() == pytest.approx(ce + dice, abs=1e-5)


def test_prototype_contrast_loss_values_and_unavailable_classes():
    sim = torch.tensor([[1.0, 0.0], [0.2, 0.6]])
    labels = torch.tensor([0, 1])
    expected = (math.log(1 + math.exp(-10)) + math.log(1 + math.exp(-4))) / 2
    assert prototype_contrast_loss(sim, labels, 0.1).item() == pytest.approx(expected, rel=1e-5)
    # class 1 has no prototype: its logit is dropped and its pixels skipped -> only pixel 0 with one logit -> 0
    available = torch.tensor([True, False])
    assert prototype_contrast_loss(sim, labels, 0.1, available).item() == pytest.approx(0.0, abs=1e-7)
    none = prototype_contrast_loss(sim, labels, 0.1, torch.tensor([False, False]))
    assert none.item() == 0.0


def test_sample_balanced_pixels():
    labels = torch.cat([torch.zeros(100, dtype=torch.long), torch.ones(3, dtype=torch.long), torch.full((50,), 255)])
    idx = sample_balanced_pixels(labels, num_classes=2, max_pixels=10)
    chosen = labels[idx]
    assert idx.numel() == 10 and (chosen == 1).sum() == 3 and (chosen == 0).sum() == 7
    assert len(set(idx.tolist())) == 10
    idx_all = sample_balanced_pixels(labels, num_classes=2, max_pixels=1000)
    assert idx_all.numel() == 103 and not (labels[idx_all] == 255).any()
    balanced = sample_balanced_pixels(torch.cat([torch.zeros(100), torch.ones(100)]).long(), 2, 20)
    assert (balanced < 100).sum() == 10


def test_flatten_pixels_downsamples_labels_to_embedding_grid():
    emb = F.normalize(torch.randn(1, 3, 2, 2), dim=1)
    labels = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]])
    keep = labels != 3
    z, y = flatten_pixels(emb, labels, keep)
    assert y.tolist() == [0, 1, 2, -1]  # dropped pixels are marked, not removed (no device sync)
    assert torch.allclose(z[1], emb[0, :, 0, 1]) and z.shape == (4, 3)
    assert sample_balanced_pixels(y, num_classes=4, max_pixels=10).sort().values.tolist() == [0, 1, 2]


def test_prototype_bank_ema_update():
    bank = ImagePrototypeBank(num_classes=2, embedding_dim=2, momentum=0.99)
    assert not bank.initialized.any()
    bank.update(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0, 255]))
    assert bank.initialized.tolist() == [True, False]
    assert torch.allclose(bank.prototypes[0, 0], torch.tensor([1.0, 0.0]))
    bank.update(torch.tensor([[0.0, 1.0]]), torch.tensor([0]))
    expected = F.normalize(torch.tensor([0.99, 0.01]), dim=0)
    assert torch.allclose(bank.prototypes[0, 0], expected, atol=1e-6)
    assert torch.allclose(bank.prototypes[1], torch.zeros(1, 2))  # untouched, still empty
    sim = bank.similarity(torch.tensor([[0.0, 1.0]]))
    assert sim[0, 0].item() == pytest.approx(expected[1].item(), abs=1e-6)
    state = bank.state_dict()
    assert set(state) == {"prototypes", "initialized"}


def test_prototype_bank_multiple_prototypes_assignment():
    bank = ImagePrototypeBank(num_classes=1, embedding_dim=2, num_prototypes=2, momentum=0.5)
    bank.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    protos = bank.prototypes[0]
    assert {tuple(p.round(decimals=4).tolist()) for p in protos} == {(1.0, 0.0), (0.0, 1.0)}
    # a pixel close to (1, 0) only moves that prototype
    before = bank.prototypes.clone()
    bank.update(F.normalize(torch.tensor([[1.0, 0.2]]), dim=1), torch.tensor([0]))
    moved = (bank.prototypes - before).abs().sum(dim=-1)[0]
    assert (moved > 0).sum() == 1


class ConstantPrompts(torch.nn.Module):
    """Text prototypes fixed to the two axes, with a learnable scale so gradients can be checked."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self):
        return F.normalize(torch.eye(2) * self.scale, dim=1)


def step_outputs(semi: bool, with_embedding: bool, bx: int = 2, bu: int = 2, size: int = 8) -> StepOutputs:
    torch.manual_seed(0)

    def logits(b):
        return torch.randn(b, 2, size, size, requires_grad=True)

    def emb(b):
        return F.normalize(torch.randn(b, 2, size // 4, size // 4), dim=1).requires_grad_()

    label = (torch.rand(bx, 1, size, size) > 0.5).long()
    out = StepOutputs(logits_x=logits(bx), label_x=label, embedding_x=emb(bx) if with_embedding else None)
    if semi:
        conf = torch.rand(bu, size, size) * 0.5 + 0.5
        pseudo = (torch.rand(bu, size, size) > 0.5).long()
        out.logits_s1, out.logits_s2, out.logits_fp = logits(bu), logits(bu), logits(bu)
        out.pseudo_w, out.conf_w = pseudo, conf
        out.pseudo_s1, out.conf_s1 = pseudo, conf
        out.pseudo_s2, out.conf_s2 = pseudo.flip(0), conf.flip(0)
        if with_embedding:
            out.embedding_w, out.embedding_s1, out.embedding_s2 = emb(bu), emb(bu), emb(bu)
    return out


def test_mpamatch_total_combines_terms():
    loss = MPAMatchLoss(num_classes=2, image_weight=0.0, text_weight=0.0, confidence_threshold=0.7)
    assert not loss.needs_embedding
    out = step_outputs(semi=True, with_embedding=False)
    terms = loss(out, iteration=1)
    lu = 0.25 * terms["loss_u_s1"] + 0.25 * terms["loss_u_s2"] + 0.5 * terms["loss_u_fp"]
    assert torch.allclose(terms["loss_u"], lu)
    assert torch.allclose(terms["loss"], (terms["loss_x"] + terms["loss_u"]) / 2)
    assert "loss_img" not in terms and "loss_txt" not in terms
    expected_fp = ConsistencyLoss()(out.logits_fp, out.pseudo_w, out.conf_w >= 0.7)
    assert torch.allclose(terms["loss_u_fp"], expected_fp)
    sup = loss(step_outputs(semi=False, with_embedding=False), iteration=1)
    assert set(sup) == {"loss", "loss_x"} and torch.allclose(sup["loss"], sup["loss_x"])
    weighted = MPAMatchLoss(
        num_classes=2, image_weight=0.0, text_weight=0.0, confidence_threshold=0.7, loss_weights=(1.0, 0.25)
    )
    again = weighted(out, iteration=1)
    assert torch.allclose(again["loss"], terms["loss_x"] + 0.25 * terms["loss_u"])


@pytest.mark.parametrize("weights", [(1.0,), (1.0, -0.5), (1.0, 1.0, 1.0)])
def test_mpamatch_rejects_bad_loss_weights(weights):
    with pytest.raises(BundleInputError, match="loss_weights"):
        MPAMatchLoss(num_classes=2, image_weight=0.0, text_weight=0.0, loss_weights=weights)


def test_mpamatch_prototype_terms_warmup_and_gradients():
    bank = ImagePrototypeBank(num_classes=2, embedding_dim=2)
    prompts = ConstantPrompts()
    loss = MPAMatchLoss(
        num_classes=2,
        image_prototypes=bank,
        prompt_learner=prompts,
        image_weight=0.1,
        text_weight=0.2,
        align_weight=0.3,
        prototype_warmup_iterations=10,
        confidence_threshold=0.0,
    )
    assert loss.needs_embedding
    out = step_outputs(semi=True, with_embedding=True)
    terms = loss(out, iteration=5)
    # first step: the bank was empty when the image term was computed, and is filled afterwards
    assert terms["loss_img"].item() == 0.0 and bank.initialized.all()
    assert terms["prototype_ramp"].item() == pytest.approx(0.5)
    base = (terms["loss_x"] + terms["loss_u"]) / 2
    extra = 0.1 * terms["loss_img"] + 0.2 * terms["loss_txt"] + 0.3 * terms["loss_align"]
    assert torch.allclose(terms["loss"], base + 0.5 * extra, atol=1e-6)
    terms["loss"].backward()
    assert out.embedding_x.grad is not None and out.embedding_s1.grad is not None
    assert out.embedding_w.grad is None  # the weak view only feeds the (no-grad) bank update
    terms2 = loss(step_outputs(semi=True, with_embedding=True), iteration=20)
    assert terms2["loss_img"].item() > 0 and terms2["prototype_ramp"].item() == 1.0
    for name, value in terms2.items():
        assert torch.isfinite(value).all(), name


def test_mpamatch_zero_weight_drops_module_and_validates():
    bank = ImagePrototypeBank(num_classes=2, embedding_dim=2)
    loss = MPAMatchLoss(
        num_classes=2, image_prototypes=bank, prompt_learner=ConstantPrompts(), image_weight=0.0, text_weight=0.0
    )
    assert loss.image_prototypes is None and loss.prompt_learner is None and not loss.needs_embedding
    assert list(loss.state_dict()) == []
    with pytest.raises(BundleInputError, match="image prototype bank"):
        MPAMatchLoss(num_classes=2, image_weight=0.1, text_weight=0.0)
    with pytest.raises(BundleInputError, match="prompt learner"):
        MPAMatchLoss(num_classes=2, image_weight=0.0, text_weight=0.1)


def test_confidence_threshold_warmup():
    loss = MPAMatchLoss(
        num_classes=2,
        image_weight=0,
        text_weight=0,
        confidence_threshold=0.95,
        threshold_start=0.8,
        threshold_warmup_iterations=100,
    )
    assert loss.confidence_threshold(0) == pytest.approx(0.8)
    assert loss.confidence_threshold(50) == pytest.approx(0.875)
    assert loss.confidence_threshold(500) == pytest.approx(0.95)
