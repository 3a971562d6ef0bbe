"""What the trainer does inside an iteration, checked exactly with a fake network whose logits encode each image's id.

Every image here is constant: channel 0 holds the image's id, so the fake network's class at a pixel is the id of the
image the pixel came from. That makes CutMix's pasting visible in the pseudo-labels, and the batch-norm layer's
running statistics tell which forward passes fed them. Also: the threshold ramp as the trainer drives it, which
pixels update the image prototype bank, and that the configs' window overlap reaches the sliding-window inferers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.bundle import ConfigParser

from bundle.engine.cutmix import CutMix
from bundle.engine.trainer import SemiSupervisedTrainer
from bundle.errors import BundleInputError
from bundle.losses import ImagePrototypeBank, MPAMatchLoss, StepOutputs
from bundle.options import check_supervised_warmup, supervised_warmup_iterations

CLASSES = 8
SIZE = 16


class IdNetwork(torch.nn.Module):
    """Class ``c``'s logit at a pixel is ``-10 (x_0 - c)^2`` plus a learnable bias: the class is the pixel's channel-0
    value. A batch-norm layer (its output weighted by a zero parameter, so it does not change the logits) records
    which forward passes update the running statistics; every call is recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(CLASSES))
        self.norm = torch.nn.BatchNorm2d(3, momentum=0.1)
        self.norm_weight = torch.nn.Parameter(torch.zeros(()))
        self.calls: list[dict] = []

    def forward(self, x: torch.Tensor, perturb_from: int | None = None, return_embedding: bool = False):
        self.calls.append(
            {
                "ids": x[:, 0, 0, 0].tolist(),
                "training": self.training,
                "grad": torch.is_grad_enabled(),
                "embedding": return_embedding,
            }
        )
        classes = torch.arange(CLASSES, dtype=x.dtype).view(1, CLASSES, 1, 1)
        logits = -10 * (x[:, :1] - classes) ** 2 + self.bias.view(1, CLASSES, 1, 1)
        logits = logits + self.norm_weight * self.norm(x).mean(1, keepdim=True)
        if perturb_from is None and not return_embedding:
            return logits
        out = {"logits": logits}
        if return_embedding:  # unit vectors along channel 0, at a quarter of the resolution (as the TransUNet's)
            out["embedding"] = F.normalize(F.avg_pool2d(x, 4) + self.bias[:3].view(1, 3, 1, 1) + 1e-3, dim=1)
        if perturb_from is not None:
            out["logits_fp"] = logits[perturb_from:] * 1.0
        return out


def images(ids: list[int], other_channels: float = 0.0) -> torch.Tensor:
    """Constant images ``[B, 3, SIZE, SIZE]``: channel 0 = id, channels 1-2 = ``other_channels``."""
    batch = torch.full((len(ids), 3, SIZE, SIZE), float(other_channels))
    batch[:, 0] = torch.tensor(ids, dtype=torch.float32).view(-1, 1, 1)
    return batch


def unlabelled_batch(ids: list[int]) -> dict:
    # strong views: the same ids, other channels far from the weak view's (as colour jitter would move them)
    return {"image": images(ids, 0.0), "image_s1": images(ids, 5.0), "image_s2": images(ids, -3.0)}


class Recording(torch.nn.Module):
    """A loss function that keeps every iteration's StepOutputs and the iteration it was called with."""

    def __init__(self, inner: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.needs_embedding = bool(getattr(inner, "needs_embedding", False))
        self.steps: list[StepOutputs] = []
        self.iterations: list[int] = []

    def forward(self, step: StepOutputs, iteration: int) -> dict[str, torch.Tensor]:
        self.steps.append(step)
        self.iterations.append(iteration)
        if self.inner is not None:
            return self.inner(step, iteration)
        loss = step.logits_x.mean() + step.logits_s1.mean() + step.logits_s2.mean() + step.logits_fp.mean()
        return {"loss": loss}


def trainer(network, loss, unlabelled: list[dict], cutmix=None, source="rolled", epochs=1, length=1, warmup=0):
    labelled = [{"image": images([7]), "label": torch.full((1, 1, SIZE, SIZE), 7)}] * length
    return SemiSupervisedTrainer(
        supervised_warmup_iterations=warmup,
        device="cpu",
        max_epochs=epochs,
        epoch_length=length,
        train_data_loader=labelled,
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.0),
        loss_function=loss,
        unlabeled_data_loader=unlabelled,
        cutmix=cutmix,
        cutmix_source=source,
    )


def box_of(step_pseudo: torch.Tensor, weak_pseudo: torch.Tensor) -> torch.Tensor:
    return step_pseudo != weak_pseudo


def test_cutmix_pseudo_labels_follow_the_pasted_pixels_from_the_rolled_batch():
    torch.manual_seed(0)
    network, loss = IdNetwork(), Recording()
    trainer(network, loss, [unlabelled_batch([0, 1, 2])], cutmix=CutMix(prob=1.0, area=(0.1, 0.4))).run()
    step = loss.steps[0]
    weak_ids = torch.tensor([0, 1, 2]).view(3, 1, 1).expand(3, SIZE, SIZE)
    assert torch.equal(step.pseudo_w, weak_ids)
    assert torch.allclose(step.conf_w, torch.ones_like(step.conf_w), atol=1e-3)
    for logits, pseudo, conf in (
        (step.logits_s1, step.pseudo_s1, step.conf_s1),
        (step.logits_s2, step.pseudo_s2, step.conf_s2),
    ):
        # the network saw the mixed image: its class is the pasted pixel's source image, and so is the pseudo-label
        assert torch.equal(logits.argmax(1), pseudo)
        box = box_of(pseudo, weak_ids)
        for sample in range(3):
            inside = box[sample]
            assert 0.1 * SIZE * SIZE * 0.5 <= inside.sum() <= 0.4 * SIZE * SIZE  # every sample got a box
            assert (pseudo[sample][inside] == (sample - 1) % 3).all()  # rolled: sample i pastes from i - 1
            assert (pseudo[sample][~inside] == sample).all()
        assert torch.allclose(conf, torch.ones_like(conf), atol=1e-3)
    # the two strong views draw their own boxes
    assert not torch.equal(box_of(step.pseudo_s1, weak_ids), box_of(step.pseudo_s2, weak_ids))


def test_cutmix_from_another_batch_predicts_it_in_eval_mode_without_gradients():
    torch.manual_seed(1)
    network, loss = IdNetwork(), Recording()
    batches = [unlabelled_batch([0, 1, 2]), unlabelled_batch([4, 5, 6])]
    trainer(network, loss, batches, cutmix=CutMix(prob=1.0, area=(0.1, 0.4)), source="batch").run()
    step = loss.steps[0]
    source_call = [call for call in network.calls if call["ids"] == [4.0, 5.0, 6.0]]
    assert source_call == [{"ids": [4.0, 5.0, 6.0], "training": False, "grad": False, "embedding": False}]
    for pseudo in (step.pseudo_s1, step.pseudo_s2):
        for sample in range(3):
            values = set(pseudo[sample].unique().tolist())
            assert values == {sample, sample + 4}  # its own id outside the box, its source's inside


def test_pseudo_labels_and_confidences_carry_no_gradient():
    network, loss = IdNetwork(), Recording()
    trainer(network, loss, [unlabelled_batch([0, 1, 2])], cutmix=CutMix(prob=1.0)).run()
    step = loss.steps[0]
    for name in ("pseudo_w", "conf_w", "pseudo_s1", "conf_s1", "pseudo_s2", "conf_s2"):
        tensor = getattr(step, name)
        assert not tensor.requires_grad and tensor.grad_fn is None, name
    for name in ("logits_x", "logits_s1", "logits_s2", "logits_fp"):
        assert getattr(step, name).requires_grad, name


def test_strong_views_leave_the_norm_statistics_unchanged():
    network = IdNetwork()
    trainer(network, Recording(), [unlabelled_batch([0, 1, 2])]).run()
    # only the first forward (labelled image id 7 + the three weak views) updates the running statistics
    first = torch.cat([images([7]), images([0, 1, 2])])
    expected_mean = 0.1 * first.mean(dim=(0, 2, 3))
    expected_var = 0.9 + 0.1 * first.var(dim=(0, 2, 3), unbiased=True)
    assert torch.allclose(network.norm.running_mean, expected_mean, atol=1e-6)
    assert torch.allclose(network.norm.running_var, expected_var, atol=1e-5)
    assert network.norm.num_batches_tracked.item() == 1
    assert network.norm.momentum == 0.1  # restored after the strong views
    strong_call = network.calls[1]
    assert strong_call["training"] and strong_call["grad"] and strong_call["ids"] == [0.0, 1.0, 2.0] * 2


def test_threshold_ramp_follows_the_trainers_iterations_across_epochs():
    inner = MPAMatchLoss(
        num_classes=CLASSES,
        confidence_threshold=0.9,
        threshold_start=0.5,
        threshold_warmup_iterations=4,
        image_weight=0.0,
        text_weight=0.0,
    )
    loss = Recording(inner)
    engine = trainer(IdNetwork(), loss, [unlabelled_batch([0, 1, 2])], epochs=2, length=3)
    logged = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: logged.append(e.state.output["loss_terms"]))
    engine.run()
    assert loss.iterations == [1, 2, 3, 4, 5, 6]
    assert [round(terms["threshold"], 6) for terms in logged] == [0.6, 0.7, 0.8, 0.9, 0.9, 0.9]


def test_supervised_warmup_trains_on_labelled_batches_then_starts_the_ramps_at_the_first_semi_iteration():
    bank = ImagePrototypeBank(num_classes=CLASSES, embedding_dim=3)
    inner = MPAMatchLoss(
        num_classes=CLASSES,
        confidence_threshold=0.9,
        threshold_start=0.5,
        threshold_warmup_iterations=4,
        image_prototypes=bank,
        image_weight=1.0,
        text_weight=0.0,
        prototype_warmup_iterations=2,
    )
    network, loss = IdNetwork(), Recording(inner)
    engine = trainer(network, loss, [unlabelled_batch([0, 1, 2])], epochs=2, length=3, warmup=4)
    logged, bank_ready = [], []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: logged.append(e.state.output["loss_terms"]))
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: bank_ready.append(bank.initialized.sum().item()))
    engine.run()
    # iterations 1-4: the labelled image (id 7) alone, one forward pass each, no embedding asked for (the cost of a
    # supervised iteration); 5-6: labelled + weak with embeddings, then the strong views
    assert [(call["ids"], call["embedding"]) for call in network.calls[:4]] == [([7.0], False)] * 4
    assert [call["ids"] for call in network.calls[4:]] == [[7.0, 0.0, 1.0, 2.0], [0.0, 1.0, 2.0] * 2] * 2
    assert all(call["embedding"] for call in network.calls[4:])
    assert [step.semi_supervised for step in loss.steps] == [False] * 4 + [True] * 2
    assert loss.iterations == [-3, -2, -1, 0, 1, 2]  # the loss's warm-ups count from the first semi iteration
    assert [round(terms["threshold"], 6) for terms in logged[4:]] == [0.6, 0.7]
    # the prototype terms and the bank start with the first semi-supervised iteration, ramped 1/2, then 2/2
    assert ["loss_img" in terms for terms in logged] == [False] * 4 + [True] * 2
    assert [terms["prototype_ramp"] for terms in logged[4:]] == [0.5, 1.0]
    assert bank_ready == [0] * 4 + [4, 4]  # classes 7 (labelled), 0, 1, 2 (reliable weak pixels)


def test_supervised_warmup_as_long_as_the_run_is_refused():
    with pytest.raises(BundleInputError, match="supervised_warmup_iterations 6 leaves no semi-supervised iteration"):
        trainer(IdNetwork(), Recording(), [unlabelled_batch([0])], epochs=2, length=3, warmup=6)
    trainer(IdNetwork(), Recording(), [], epochs=2, length=3, warmup=6)  # no unlabelled data: supervised anyway
    check_supervised_warmup(6, 2, 3, semi_supervised=False)  # the supervised preset (use_unlabeled false)
    check_supervised_warmup(5, 2, 3, semi_supervised=True)


def test_the_warmup_fraction_gives_the_measured_recipes_and_always_leaves_a_semi_supervised_iteration():
    assert supervised_warmup_iterations(0.8333, 36, 100) == 3000  # 2999.88: the 3600-iteration recipe
    assert supervised_warmup_iterations(0.8333, 18, 100) == 1500  # the 1800-iteration recipe
    assert supervised_warmup_iterations(0.8333, 8, 25) == 167  # 166.66: the README's 200 iterations
    assert supervised_warmup_iterations(0.99, 2, 3) == 5  # 5.94 would round to all 6: one is kept semi-supervised
    assert supervised_warmup_iterations(0.8333, 1, 1) == 0
    assert supervised_warmup_iterations(0, 36, 100) == 0
    assert supervised_warmup_iterations(0.5, "8", 25) == 0  # a schedule that is not numbers: check_values says so
    for fraction in (1, 1.5, -0.1, float("nan"), "0.5", True):
        with pytest.raises(BundleInputError, match=r"^--supervised_warmup_fraction must be a number >= 0 and < 1"):
            supervised_warmup_iterations(fraction, 36, 100)


def test_schedules_shorter_than_the_minimum_get_no_warmup():
    assert supervised_warmup_iterations(0.8333, 6, 100, min_schedule=1800) == 0  # 600: semi-supervised throughout
    assert supervised_warmup_iterations(0.8333, 17, 100, min_schedule=1800) == 0  # 1700: one epoch short
    assert supervised_warmup_iterations(0.8333, 18, 100, min_schedule=1800) == 1500  # the measured 1800 recipe
    assert supervised_warmup_iterations(0.8333, 36, 100, min_schedule=1800) == 3000
    assert supervised_warmup_iterations(0.8333, 8, 25, min_schedule=0) == 167
    for bad in (-1, 1.5, "1800", True, None):
        with pytest.raises(BundleInputError, match=r"^--supervised_warmup_min_schedule must be a whole number >= 0"):
            supervised_warmup_iterations(0.8333, 36, 100, min_schedule=bad)


@pytest.mark.parametrize(
    "presets, overrides, expected",
    [
        ([], {}, 0),  # the README's 8 x 25 iterations: shorter than the 1800 that get a warm-up
        ([], {"max_epochs": 6, "epoch_length": 100}, 0),
        ([], {"supervised_warmup_min_schedule": 0}, 167),  # 5/6 of 200 without the minimum
        ([], {"max_epochs": 36, "epoch_length": 100}, 3000),  # the schedule alone sets the recipe
        (["unimatch"], {"max_epochs": 18, "epoch_length": 100}, 1500),
        ([], {"max_epochs": 36, "epoch_length": 100, "supervised_warmup_iterations": 100}, 100),  # an explicit count
        ([], {"supervised_warmup_fraction": 0}, 0),
        (["uni"], {}, 0),  # the paper's recipe: semi-supervised from the start
    ],
)
def test_the_configs_supervised_warmup_follows_the_schedule(presets, overrides, expected):
    parser = ConfigParser()
    parser.read_config(["configs/train.json"] + [f"configs/{name}.json" for name in presets])
    parser.update(overrides)
    assert parser.get_parsed_content("supervised_warmup_iterations") == expected


def unit(*vector: float) -> torch.Tensor:
    return F.normalize(torch.tensor(vector, dtype=torch.float32), dim=0)


def test_prototype_bank_updates_from_labelled_and_reliable_weak_pixels_only():
    e0, e1, e2, e3, e4 = unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1), unit(-1, 0, 0), unit(0, -1, 0)

    def field(top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        """Embedding [1, 3, 2, 2]: the top row's pixels ``top``, the bottom row's ``bottom``."""
        return torch.stack([torch.stack([top, top]), torch.stack([bottom, bottom])]).permute(2, 0, 1)[None]

    logits = torch.zeros(1, 2, 2, 2, requires_grad=True)
    labelled_embedding = field(e0, e1).clone()
    labelled_embedding[0, :, 1, 1] = e3  # the ignored pixel's
    step = StepOutputs(
        logits_x=logits,
        label_x=torch.tensor([[[0, 0], [1, 255]]]),  # one ignored pixel: not in the bank
        embedding_x=labelled_embedding,
        logits_s1=logits,
        logits_s2=logits,
        logits_fp=logits,
        pseudo_w=torch.ones(1, 2, 2, dtype=torch.long),
        conf_w=torch.tensor([[[0.99, 0.99], [0.2, 0.2]]]),  # the bottom row is unreliable
        pseudo_s1=torch.ones(1, 2, 2, dtype=torch.long),
        conf_s1=torch.ones(1, 2, 2),
        pseudo_s2=torch.ones(1, 2, 2, dtype=torch.long),
        conf_s2=torch.ones(1, 2, 2),
        embedding_w=field(e2, e3),
        embedding_s1=field(e4, e4),  # strong views feed the contrast loss, never the bank
        embedding_s2=field(e4, e4),
    )
    bank = ImagePrototypeBank(num_classes=2, embedding_dim=3, momentum=0.5)
    loss = MPAMatchLoss(
        num_classes=2, image_prototypes=bank, image_weight=1.0, text_weight=0.0, confidence_threshold=0.9
    )
    loss(step, iteration=1)
    # first update: each class's normalised mean of its pixels
    assert torch.allclose(bank.prototypes[0, 0], e0, atol=1e-6)  # two labelled class-0 pixels
    expected = F.normalize(e1 + 2 * e2, dim=0)  # one labelled class-1 pixel, two reliable weak pixels
    assert torch.allclose(bank.prototypes[1, 0], expected, atol=1e-6)
    loss(step, iteration=2)  # EMA with momentum 0.5 towards the same means: unchanged
    assert torch.allclose(bank.prototypes[1, 0], expected, atol=1e-6)


def window_calls(config: str, inferer_id: str, overlap: float) -> int:
    """Network calls of a config's validation/inference inferer on a 160 x 160 image (64 px windows, 1 per call)."""
    parser = ConfigParser()
    parser.read_config(config)
    parser.update({"patch_size": [64, 64], "sw_overlap": overlap, "sw_batch_size": 1, "image_scale": 1.0})
    inferer = parser.get_parsed_content(inferer_id)
    calls = []

    def network(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return torch.zeros(x.shape[0], 2, *x.shape[2:])

    inferer(torch.zeros(1, 3, 160, 160), network)
    assert set(calls) == {(1, 3, 64, 64)}
    return len(calls)


def test_window_overlap_reaches_the_inferers():
    # windows per axis: overlap 0.5 -> starts 0, 32, 64, 96; overlap 0.25 -> starts 0, 48, 96
    for config, inferer_id in (("configs/inference.json", "inferer"), ("configs/train.json", "validate#inferer")):
        assert window_calls(config, inferer_id, 0.5) == 16
        assert window_calls(config, inferer_id, 0.25) == 9
