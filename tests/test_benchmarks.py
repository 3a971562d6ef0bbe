"""The benchmark scripts run end to end on tiny settings; the UniMatch reference iteration really trains.

Only correctness is checked here (a tiny network, 32-64 px, a few iterations): the figures against each other
(medians, rates, ratios, targets), the window counts against hand counts and the network calls, the naive inference
loop against the bundle's inferer, the memory measurement against a known allocation. Speed is measured by running
the scripts themselves (see their docstrings), never by tests.
"""

from __future__ import annotations

import json
import math
import os
import statistics

import numpy as np
import pytest
import torch
from helpers import load_script
from monai.data.utils import dense_patch_slices

from benchmarks.process_memory import peak_rss_mb, reset_peak_rss, rss_mb
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
    argv = TINY_TRAIN + ["--iterations", "3", "--warmup", "1", "--skip-memory", "--json", str(out)]
    figures = train_step.main(argv + ["--presets", "unimatch", "mpamatch"])
    methods = figures["methods"]
    assert list(methods) == ["unimatch", "reference", "mpamatch"]
    for result in methods.values():
        assert len(result["times_s"]) == 3  # the warm-up iteration is not timed
        assert result["median_s"] == statistics.median(result["times_s"])
        assert result["images_per_s"] == pytest.approx((2 + 2) / result["median_s"], rel=1e-12)  # 2 + 2 images
        assert all(math.isfinite(v) for v in result["first_iteration_terms"].values())
    assert "loss_txt" in methods["mpamatch"]["first_iteration_terms"]
    median = {name: result["median_s"] for name, result in methods.items()}
    assert figures["ratios"] == pytest.approx(
        {
            "unimatch/reference": median["unimatch"] / median["reference"],
            "mpamatch/reference": median["mpamatch"] / median["reference"],
            "mpamatch/unimatch": median["mpamatch"] / median["unimatch"],
        },
        rel=1e-12,
    )
    targets = figures["targets"]
    assert [(check["limit"], check["value"]) for check in targets] == [
        (0.9, figures["ratios"]["unimatch/reference"]),
        (1.1, figures["ratios"]["mpamatch/unimatch"]),
    ]
    assert [check["pass"] for check in targets] == [check["value"] <= check["limit"] for check in targets]
    written = json.loads(out.read_text())
    assert written["ratios"] == pytest.approx(figures["ratios"])
    assert [check["pass"] for check in written["targets"]] == [check["pass"] for check in targets]


def test_train_step_memory_child(train_step):
    result = train_step.main(TINY_TRAIN + ["--measure-memory", "reference"])
    assert result["method"] == "reference"
    assert set(result) == {"method", "baseline_rss_mb", "build_peak_rss_mb", "peak_rss_mb", "iteration_mb"}
    # the figure the table prints is the peak above the baseline (no ordering of the two: they can be near-equal)
    assert result["iteration_mb"] == pytest.approx(result["peak_rss_mb"] - result["baseline_rss_mb"], abs=1e-9)
    assert result["baseline_rss_mb"] > 50  # this process holds torch and a network: tens of MB at least


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux /proc peak RSS reset only")
def test_process_memory_sees_a_known_allocation():
    """The RSS helpers of the benchmarks on a 200 MB block that is written (every page resident), then freed."""
    reset_peak_rss()
    baseline = rss_mb()
    block = np.ones(200 * 2**20, dtype=np.uint8)
    held = rss_mb()
    del block  # a buffer this large is unmapped when freed
    after, peak = rss_mb(), peak_rss_mb()
    assert held - baseline >= 190  # the resident block is seen
    assert peak - baseline >= 190  # the peak remembers the freed block
    assert peak - after >= 150  # ... and the RSS sees it gone
    reset_peak_rss()
    assert peak_rss_mb() - rss_mb() < 50  # the reset forgets the old peak: it starts from the RSS now


@pytest.mark.parametrize("size", [64, 65, 100, 160, 300])
def test_naive_windows_are_monais(inference, size):
    starts = [s[0].start for s in dense_patch_slices((size,), (64,), (48,))]
    assert inference.tile_starts(size, 64, 0.25) == starts


def small_bench(inference, tmp_path, height: int, width: int, overlap: float = 0.25):
    """A ``Bench`` (tiny network, 64 px windows, seeded random weights) on a synthetic image of that size."""
    argv = ["--device", "cpu", "--network", "tiny", "--height", str(height), "--width", str(width), "--roi", "64"]
    args = inference.parse_args(argv + ["--overlap", str(overlap), "--sw-batch-size", "4"])
    image, _, _ = inference.source_image(args)
    tmp_path.mkdir(parents=True, exist_ok=True)
    image_file = str(tmp_path / "image.tif")
    inference.tifffile.imwrite(image_file, image, tile=(256, 256), photometric="rgb")
    torch.manual_seed(0)
    weights = str(tmp_path / "weights.pt")
    torch.save(inference.config_parser(args).get_parsed_content("network_def").state_dict(), weights)
    return inference.Bench(args, image_file, weights, str(tmp_path)), args, image


def test_naive_loop_is_the_bundles_inferer_without_overlaps(tmp_path, inference):
    """Without overlapping windows Gaussian and uniform blending coincide: the naive loop (its own resizing to the
    config's image_scale, windows and resizing back) gives the logits of the config's ScaledInferer."""
    bench, args, image = small_bench(inference, tmp_path, 256, 384, overlap=0.0)  # 128 x 192 at scale 0.5: 2 x 3
    assert bench.scale == 0.5
    tensor = bench.preprocess(image)
    naive = inference.naive_logits(bench.network, tensor, args.roi, args.overlap, bench.scale)
    with torch.no_grad():
        bundle = bench.inferer(tensor[None], bench.network)[0]
    assert naive.shape == bundle.shape == (2, 256, 384)
    assert torch.allclose(naive, bundle, atol=1e-4), (naive - bundle).abs().max()
    with torch.no_grad():  # without the resizing the logits are another image's
        unscaled = inference.naive_logits(bench.network, tensor, args.roi, args.overlap, 1.0)
    assert not torch.allclose(unscaled, bundle, atol=1e-2)


def test_window_counts_are_the_windows_the_network_runs(tmp_path, inference):
    """The table's window counts, at the network's scale, against the windows the network is called on: one block
    for 300 x 400; four overlapping blocks (1024 px and a 64 px margin) for 1100 x 1100."""
    for height, width in ((300, 400), (1100, 1100)):
        bench, args, image = small_bench(inference, tmp_path / f"{height}", height, width)
        seen: list[int] = []
        bench.network.register_forward_pre_hook(lambda _module, inputs, seen=seen: seen.append(len(inputs[0])))
        for method in inference.METHODS:
            seen.clear()
            bench.run(method, image)
            expected = inference.window_count(method, height, width, args, 1024, 64, 0.5)
            assert sum(seen) == expected, (height, width, method)
    # by hand: 300 x 400 -> 150 x 200 at scale 0.5; windows start at 0, 48, 86 and 0, 48, 96, 136
    assert inference.window_count("naive", 300, 400, args, 1024, 64, 0.5) == 3 * 4
    # 1100 px -> 550: 0, 48, ..., 480 and 486 (12 starts); blocks of 1024 + 64 (544: 0, 48, ..., 480, 11 starts) and
    # 64 + 76 (70: 0 and 6) per side
    assert inference.window_count("sliding-window", 1100, 1100, args, 1024, 64, 0.5) == 12 * 12
    assert inference.window_count("blocks", 1100, 1100, args, 1024, 64, 0.5) == (11 + 2) ** 2


def test_inference_checks_fail_on_an_uninformative_prediction(inference):
    def check(share: float, agreement: float = 1.0) -> list[bool]:
        figures = {"agreement_with_naive": {"sliding-window": agreement, "blocks": agreement}}
        figures["foreground_share"] = {"sliding-window": share, "blocks": share, "naive": share}
        return [c["pass"] for c in inference.checks(figures)]

    assert check(0.3) == [True, True, True]
    assert check(0.0) == [True, True, False]  # all background agrees trivially: the comparison says nothing
    assert check(0.97) == [True, True, False]  # nearly all foreground likewise
    assert check(0.3, agreement=0.985) == [False, False, True]


def test_inference_script_end_to_end(tmp_path, inference):
    out = tmp_path / "figures.json"
    argv = ["--device", "cpu", "--network", "tiny", "--height", "300", "--width", "400", "--roi", "64"]
    figures = inference.main(argv + ["--in-process", "--json", str(out)])
    methods = figures["methods"]
    assert list(methods) == ["sliding-window", "blocks", "naive"]
    assert figures["image"]["megapixels"] == 0.12
    # 150 x 200 at the config's image_scale 0.5: 3 x 4 windows of 64 px for every method (one block)
    assert figures["image_scale"] == 0.5
    assert [result["windows"] for result in methods.values()] == [3 * 4] * 3
    for result in methods.values():
        assert len(result["seconds"]) == 1 and result["median_s"] == statistics.median(result["seconds"])
        assert result["mp_per_s"] == pytest.approx(0.12 / result["median_s"], rel=1e-12)
    assert figures["speedup_vs_naive"] == pytest.approx(
        {m: methods["naive"]["median_s"] / methods[m]["median_s"] for m in ("sliding-window", "blocks")}, rel=1e-9
    )
    # the fitted network makes real decisions: about a third of the image is glands, as its mask says ...
    share = figures["foreground_share"]["naive"]
    assert 0.05 <= share <= 0.95
    assert abs(share - figures["mask_foreground_share"]) < 0.05
    assert figures["agreement_with_mask"]["naive"] > 0.9
    # ... and the bundle's paths take the naive loop's decisions
    assert set(figures["agreement_with_naive"]) == {"sliding-window", "blocks"}
    assert all(value > 0.99 for value in figures["agreement_with_naive"].values()), figures["agreement_with_naive"]
    assert [(c["value"], c["pass"]) for c in figures["checks"]] == [
        (figures["agreement_with_naive"]["sliding-window"], True),
        (figures["agreement_with_naive"]["blocks"], True),
        (share, True),
    ]
    written = json.loads(out.read_text())
    assert written["speedup_vs_naive"] == pytest.approx(figures["speedup_vs_naive"])
    assert written["agreement_with_naive"] == pytest.approx(figures["agreement_with_naive"])
