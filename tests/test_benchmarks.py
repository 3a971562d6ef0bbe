"""The benchmark scripts run end to end on tiny settings; the UniMatch reference iteration really trains.

Only correctness is checked here (a tiny network, 32-64 px, one or two iterations); speed is measured by running
the scripts themselves (see their docstrings), never by tests.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import load_script
from monai.data.utils import dense_patch_slices

from bundle.losses import SupervisedLoss

TINY_TRAIN = ["--device", "cpu", "--network", "tiny", "--image-size", "32", "--batch-size", "2"]
TINY_TRAIN += ["--unlabeled-batch-size", "2"]


@pytest.fixture(scope="module")
def train_step():
    return load_script("train_step")


@pytest.fixture(scope="module")
def inference():
    return load_script("inference")


def test_reference_iteration_updates_weights_with_finite_losses(tmp_path, train_step):
    args = train_step.parse_args(TINY_TRAIN)
    steps, labelled = train_step.build_methods(args, ["unimatch", "reference"], str(tmp_path))
    ours = steps["unimatch"].trainer.network
    network = steps["reference"].reference.network
    assert network is not ours
    for name, value in ours.state_dict().items():  # same initial weights, separate tensors
        assert torch.equal(value, network.state_dict()[name]), name
    before = {name: p.detach().clone() for name, p in network.named_parameters()}
    for _ in range(2):
        terms = steps["reference"](labelled)
        assert set(terms) >= {"loss", "loss_x", "loss_u_s1", "loss_u_s2", "loss_u_fp", "mask_ratio"}
        assert all(math.isfinite(value) for value in terms.values()), terms
    changed = [name for name, p in network.named_parameters() if not torch.equal(p.detach(), before[name])]
    # every parameter but the projection head's (pixel embeddings are MPAMatch's, not UniMatch's) is trained
    assert sorted(changed) == sorted(name for name in before if not name.startswith("projection_head."))
    assert all(math.isfinite(value) for value in steps["unimatch"](labelled).values())


def test_reference_supervised_loss_is_the_bundles(train_step):
    reference = train_step.UniMatchReference(torch.nn.Conv2d(3, 2, 1), lr=0.01, weight_decay=0.0, threshold=0.95)
    logits = torch.randn(3, 2, 16, 16)
    label = torch.randint(0, 2, (3, 1, 16, 16))
    expected = SupervisedLoss(ce_weight=0.5, dice_weight=0.5)(logits, label)
    assert torch.allclose(reference.criterion_x(logits, label), expected, atol=1e-5)


def test_cutmix_boxes_follow_unimatch(train_step):
    import random

    rng = random.Random(0)
    boxes = [train_step.obtain_cutmix_box(40, 60, rng, prob=1.0, area=(0.02, 0.4)) for _ in range(50)]
    for box in boxes:
        rows, cols = box.any(dim=1).nonzero(), box.any(dim=0).nonzero()
        assert 0.0 < box.float().mean() <= 0.4 + 1e-9
        assert box.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # one rectangle
    assert not train_step.obtain_cutmix_box(40, 60, rng, prob=0.0, area=(0.02, 0.4)).any()


def test_train_step_script_end_to_end(tmp_path, train_step):
    out = tmp_path / "figures.json"
    argv = TINY_TRAIN + ["--iterations", "1", "--warmup", "1", "--skip-memory", "--json", str(out)]
    figures = train_step.main(argv + ["--presets", "unimatch", "mpamatch"])
    assert list(figures["methods"]) == ["unimatch", "reference", "mpamatch"]
    for result in figures["methods"].values():
        assert result["median_s"] > 0 and len(result["times_s"]) == 1
        assert all(math.isfinite(v) for v in result["first_iteration_terms"].values())
    assert "loss_txt" in figures["methods"]["mpamatch"]["first_iteration_terms"]
    assert set(figures["ratios"]) == {"unimatch/reference", "mpamatch/reference", "mpamatch/unimatch"}
    assert [check["limit"] for check in figures["targets"]] == [0.9, 1.1]
    assert json.loads(out.read_text())["ratios"] == pytest.approx(figures["ratios"])


def test_train_step_memory_child(train_step):
    result = train_step.main(TINY_TRAIN + ["--measure-memory", "reference"])
    assert result["method"] == "reference"
    assert result["peak_rss_mb"] >= result["baseline_rss_mb"] > 0


@pytest.mark.parametrize("size", [64, 65, 100, 160, 300])
def test_naive_windows_are_monais(inference, size):
    starts = [s[0].start for s in dense_patch_slices((size,), (64,), (48,))]
    assert inference.tile_starts(size, 64, 0.25) == starts


def test_inference_script_end_to_end(tmp_path, inference):
    out = tmp_path / "figures.json"
    argv = ["--device", "cpu", "--network", "tiny", "--height", "150", "--width", "200", "--roi", "64"]
    figures = inference.main(argv + ["--fit-steps", "3", "--in-process", "--json", str(out)])
    assert list(figures["methods"]) == ["sliding-window", "blocks", "naive"]
    assert figures["methods"]["naive"]["windows"] == 3 * 4
    for result in figures["methods"].values():
        assert result["mp_per_s"] > 0
    assert set(figures["agreement_with_naive"]) == {"sliding-window", "blocks"}
    assert all(0.0 <= value <= 1.0 for value in figures["agreement_with_naive"].values())
    assert json.loads(out.read_text())["speedup_vs_naive"] == pytest.approx(figures["speedup_vs_naive"])
