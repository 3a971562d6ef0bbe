"""SegmentationReport on a real MONAI SupervisedEvaluator over a tiny in-memory dataset (values computed by hand)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator
from monai.inferers import SimpleInferer
from monai.networks.utils import one_hot
from PIL import Image

from bundle.errors import BundleInputError
from bundle.evaluation import SegmentationReport
from bundle.evaluation.report import BLOCK_KEYS as REPORT_BLOCK_KEYS
from bundle.evaluation.report import CSV_COLUMNS, METRIC_KEYS

HEIGHT, WIDTH = 24, 32
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
BACKGROUND_RGB = (230, 200, 220)
BLOCK_KEYS = set(METRIC_KEYS) | {"count", "pooled_dice", "pooled_jaccard", "pooled_mdice", "pooled_mjaccard"}


def pooled(both_pred_label: list[tuple[int, int, int]]) -> dict[str, float]:
    """Hand-computed pooled scores from (pixels in both, in the prediction, in the label) of background and gland."""
    dice = [2 * b / (p + g) for b, p, g in both_pred_label]
    jaccard = [b / (p + g - b) for b, p, g in both_pred_label]
    return {
        "pooled_dice": dice[1],
        "pooled_jaccard": jaccard[1],
        "pooled_mdice": sum(dice) / 2,
        "pooled_mjaccard": sum(jaccard) / 2,
    }


def box(mask: np.ndarray, rows: tuple[int, int], cols: tuple[int, int], value: int = 1) -> np.ndarray:
    mask[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = value
    return mask


def blank() -> np.ndarray:
    return np.zeros((HEIGHT, WIDTH), dtype=np.int64)


def normalised_image(mask: np.ndarray) -> torch.Tensor:
    """A flat pink RGB picture with purple glands, normalised as the bundle does: (rgb / 255 - mean) / std."""
    rgb = np.empty((3, HEIGHT, WIDTH), dtype=np.float32)
    for channel, (background, gland) in enumerate(zip(BACKGROUND_RGB, (120, 60, 160))):
        rgb[channel] = np.where(mask > 0, gland, background)
    mean, std = np.array(MEAN).reshape(3, 1, 1), np.array(STD).reshape(3, 1, 1)
    return torch.from_numpy(((rgb / 255.0 - mean) / std).astype(np.float32))


def cases() -> list[dict]:
    """Four images: (label, prediction) pairs whose metrics are worked out in the test below."""
    a1_label = box(box(blank(), (2, 5), (2, 7)), (14, 21), (20, 27))  # two glands, 24 + 64 px
    a2_label = box(blank(), (4, 11), (4, 11))  # 64 px
    a2_pred = box(blank(), (4, 11), (4, 9))  # 48 px inside it
    b1_label = box(blank(), (2, 9), (2, 9))  # 64 px
    b1_pred = b1_label.copy()
    b1_pred[20, 28] = 1  # one stray pixel
    return [
        {"name": "a1", "part": "testA", "label": a1_label, "pred": a1_label.copy()},
        {"name": "a2", "part": "testA", "label": a2_label, "pred": a2_pred},
        {"name": "b1", "part": "testB", "label": b1_label, "pred": b1_pred},
        {"name": "b2", "part": "testB", "label": blank(), "pred": blank()},  # no gland, none predicted
    ]


class OneHotOfGivenPrediction(torch.nn.Module):
    """A stand-in network: returns the one-hot of the prediction passed next to the image."""

    def forward(self, image: torch.Tensor, pred_mask: torch.Tensor) -> torch.Tensor:
        return one_hot(pred_mask.long(), 2).to(image.dtype)


def prepare_batch(batch, device=None, non_blocking=False, **kwargs):
    return batch["image"], batch["label"], (batch["pred_mask"],), {}


def run_evaluator(report: SegmentationReport, items: list[dict], decollate: bool = True) -> SupervisedEvaluator:
    data = [
        {
            "image": normalised_image(case["label"]),
            "label": torch.from_numpy(case["label"])[None].float(),
            "pred_mask": torch.from_numpy(case["pred"])[None],
            "name": case["name"],
            "part": case["part"],
            **case.get("extra", {}),
        }
        for case in items
    ]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(data), batch_size=2, shuffle=False, num_workers=0),
        network=OneHotOfGivenPrediction(),
        inferer=SimpleInferer(),
        prepare_batch=prepare_batch,
        val_handlers=[report],
        decollate=decollate,
    )
    evaluator.run()
    return evaluator


# Per-image values, worked out by hand (image 24 x 32 = 768 px):
# a1: prediction = label -> every pixel metric 1, hd95 0; 2 TP; object Dice 1, Hausdorff 0.
# a2: label 8x8 square (64 px), prediction its left 8x6 part (48 px).
#     gland Dice 96/112, Jaccard 48/64; background 704 label px, 720 predicted, 704 shared: Dice 1408/1424,
#     Jaccard 704/720. hd95: prediction -> label boundary distances 18 x 0, 2 x 1, 4 x 2 -> 95th percentile 2;
#     label -> prediction 18 x 0, 2 x 1, 8 x 2 -> 2. Objects: 48/64 covered -> TP. Dice 96/112 on both sides;
#     Hausdorff 2 (column 11 to column 9) on both sides. Pooling sums: ground truth 64 px, Dice sum 64 * 96/112,
#     Hausdorff sum 64 * 2; segmented 48 px, Dice sum 48 * 96/112, Hausdorff sum 48 * 2.
# b1: label 8x8 square (64 px), prediction the square and a stray pixel (20, 28).
#     gland Dice 128/129, Jaccard 64/65; background 704 label px, 703 predicted, 703 shared: Dice 1406/1407,
#     Jaccard 703/704. hd95: prediction -> label 28 x 0 and the stray pixel's distance; the 95th percentile
#     of 29 values sits at position 26.6, between two zeros -> 0; label -> prediction all 0 -> 0.
#     Objects: square TP, stray pixel FP: F1 2/3. Dice: segmented side (64 * 1 + 1 * 0) / 65, ground truth 1.
#     Hausdorff: the stray pixel's nearest (only) gland: farthest square pixel (2,2) to (20,28) sqrt(18^2 + 26^2)
#     = sqrt(1000) (the other direction, to corner (9,9), is sqrt(482)); segmented side sqrt(1000) / 65.
# b2: no gland, none predicted -> pixel metrics 1, hd95 0; no objects: F1 1, object Dice 1, Hausdorff 0.
A2 = {
    "dice": 96 / 112,
    "jaccard": 48 / 64,
    "mdice": (96 / 112 + 1408 / 1424) / 2,
    "mjaccard": (48 / 64 + 704 / 720) / 2,
    "hd95": 2.0,
}
B1 = {
    "dice": 128 / 129,
    "jaccard": 64 / 65,
    "mdice": (128 / 129 + 1406 / 1407) / 2,
    "mjaccard": (64 / 65 + 703 / 704) / 2,
    "hd95": 0.0,
}
PERFECT = {"dice": 1.0, "jaccard": 1.0, "mdice": 1.0, "mjaccard": 1.0, "hd95": 0.0}

EXPECTED_PARTS = {
    "testA": {
        **{key: (PERFECT[key] + A2[key]) / 2 for key in PERFECT},
        # TP 2 + 1, no FP or FN
        "object_f1": 1.0,
        # pooled: ground-truth side (88 + 64 * 96/112) / (88 + 64), segmented side (88 + 48 * 96/112) / (88 + 48)
        "object_dice": 0.5 * ((88 + 64 * 96 / 112) / 152 + (88 + 48 * 96 / 112) / 136),
        "object_hausdorff": 0.5 * (64 * 2 / 152 + 48 * 2 / 136),
        "count": 2,
        # a1 (88 gland px, exact) + a2 (48 of 64 px): background 680 + 704 in both, 680 + 720 predicted, 680 + 704
        **pooled([(680 + 704, 680 + 720, 680 + 704), (88 + 48, 88 + 48, 88 + 64)]),
    },
    "testB": {
        **{key: (B1[key] + PERFECT[key]) / 2 for key in PERFECT},
        "object_f1": 2 / 3,  # TP 1, FP 1
        "object_dice": 0.5 * (64 / 64 + 64 / 65),  # b2 has no objects and adds nothing
        "object_hausdorff": 0.5 * (0 + math.sqrt(1000) / 65),
        "count": 2,
        # b1 (64 px and one stray pixel) + b2 (no gland): background 703 + 768 in both and predicted, 704 + 768
        **pooled([(703 + 768, 703 + 768, 704 + 768), (64, 65, 64)]),
    },
}
EXPECTED_OVERALL = {
    **{key: (2 * PERFECT[key] + A2[key] + B1[key]) / 4 for key in PERFECT},
    "object_f1": 2 * 4 / (2 * 4 + 1 + 0),  # TP 4, FP 1, FN 0
    "object_dice": 0.5 * ((88 + 64 * 96 / 112 + 64) / 216 + (88 + 48 * 96 / 112 + 64) / 201),
    "object_hausdorff": 0.5 * (64 * 2 / 216 + (48 * 2 + math.sqrt(1000)) / 201),
    "count": 4,
    **pooled(
        [(680 + 704 + 703 + 768, 680 + 720 + 703 + 768, 680 + 704 + 704 + 768), (88 + 48 + 64, 88 + 48 + 65, 216)]
    ),
}


def assert_block(actual: dict, expected: dict) -> None:
    assert set(actual) == BLOCK_KEYS
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("report")
    report = SegmentationReport(
        output_dir, ["background", "gland"], overlay_count=2, intensity_mean=MEAN, intensity_std=STD
    )
    evaluator = run_evaluator(report, cases())
    return output_dir, report, evaluator


def test_metrics_json(report_run):
    output_dir, report, _ = report_run
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics == report.metrics
    assert set(metrics) == {
        "overall",
        "parts",
        "num_images",
        "object_source",
        "class_names",
        "postprocessing",
        "tta",
        "conventions",
    }
    assert metrics["postprocessing"] == "none" and metrics["tta"] == "none"
    assert metrics["num_images"] == 4
    assert metrics["object_source"] == "connected_components"
    assert metrics["class_names"] == ["background", "gland"]
    assert set(metrics["conventions"]) >= {"dice", "mdice", "hd95", "object_f1", "object_dice", "object_hausdorff"}
    assert set(metrics["parts"]) == {"testA", "testB"}
    for part, expected in EXPECTED_PARTS.items():
        assert_block(metrics["parts"][part], expected)
    assert_block(metrics["overall"], EXPECTED_OVERALL)


def test_per_image_csv(report_run):
    output_dir, _, _ = report_run
    with open(output_dir / "metrics_per_image.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = {row["name"]: row for row in reader}
    assert list(rows) == ["a1", "a2", "b1", "b2"]
    assert [rows[name]["part"] for name in rows] == ["testA", "testA", "testB", "testB"]
    for name, expected in (("a1", PERFECT), ("a2", A2), ("b1", B1), ("b2", PERFECT)):
        for key, value in expected.items():
            assert float(rows[name][key]) == pytest.approx(value, rel=1e-6, abs=1e-9), (name, key)
    counts = {
        name: tuple(int(rows[name][key]) for key in ("tp", "fp", "fn", "gt_objects", "pred_objects")) for name in rows
    }
    assert counts == {"a1": (2, 0, 0, 2, 2), "a2": (1, 0, 0, 1, 1), "b1": (1, 1, 0, 1, 2), "b2": (0, 0, 0, 0, 0)}
    assert float(rows["a2"]["object_dice"]) == pytest.approx(96 / 112)
    assert float(rows["a2"]["object_hausdorff"]) == pytest.approx(2.0)
    assert float(rows["b1"]["object_f1"]) == pytest.approx(2 / 3)
    assert float(rows["b1"]["object_hausdorff"]) == pytest.approx(0.5 * math.sqrt(1000) / 65)
    assert (rows["b2"]["object_f1"], rows["b2"]["object_dice"], rows["b2"]["object_hausdorff"]) == ("1", "1", "0")


def test_overlays(report_run):
    output_dir, _, _ = report_run
    files = sorted(path.name for path in (output_dir / "overlays").iterdir())
    # best by gland Dice: a1 and b2 (both 1; ties keep the earlier image first); worst: a2 (0.857), b1 (0.992)
    assert files == ["best_1_a1.png", "best_2_b2.png", "worst_1_a2.png", "worst_2_b1.png"]
    for name in files:
        with Image.open(output_dir / "overlays" / name) as picture:
            picture.verify()
        with Image.open(output_dir / "overlays" / name) as picture:
            assert (picture.format, picture.mode, picture.size) == ("PNG", "RGB", (WIDTH, HEIGHT))
    pixels = np.asarray(Image.open(output_dir / "overlays" / "worst_1_a2.png"))
    # a2: the label's right edge (column 11) is green, the prediction's right edge (column 9) magenta, and the
    # background away from the contours is the original (de-normalised) colour
    assert tuple(pixels[7, 11]) == (0, 255, 0)
    assert tuple(pixels[7, 9]) == (255, 0, 255)
    assert np.abs(pixels[20, 20].astype(int) - BACKGROUND_RGB).max() <= 1


def test_printed_table(report_run, capsys):
    _, report, _ = report_run
    report.write()  # prints the table again
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["part", "count", *REPORT_BLOCK_KEYS]
    assert [line.split()[0] for line in lines[1:4]] == ["testA", "testB", "overall"]
    overall = lines[3].split()
    assert overall[1] == "4"
    assert overall[2] == f"{EXPECTED_OVERALL['dice']:.4f}"
    assert overall[6] == f"{EXPECTED_OVERALL['hd95']:.2f}"
    assert lines[2].split()[7] == f"{2 / 3:.4f}"  # testB object F1
    assert lines[4] == "post-processing of the predictions: none"
    assert lines[5] == "test-time augmentation: none"


def test_rerun_starts_afresh(report_run):
    output_dir, report, evaluator = report_run
    evaluator.run()
    assert len(report.rows) == 4
    assert json.loads((output_dir / "metrics.json").read_text())["num_images"] == 4


def test_batched_output_without_decollate(report_run, tmp_path):
    _, decollated, _ = report_run
    report = SegmentationReport(tmp_path, ["background", "gland"], overlay_count=0, summary=False)
    run_evaluator(report, cases(), decollate=False)
    assert report.rows == decollated.rows
    assert report.metrics == decollated.metrics


def test_instance_masks_and_raw_images(tmp_path):
    # two touching glands as instances (30 px each); the prediction finds both with a gap between them
    instances = box(box(blank(), (2, 7), (2, 6), 1), (2, 7), (7, 11), 2)
    pred = box(box(blank(), (2, 7), (2, 5), 1), (2, 7), (8, 11), 2) > 0
    raw = torch.full((3, HEIGHT, WIDTH), 50.0)
    case = {
        "name": "touching glands",
        "part": "testA",
        "label": (instances > 0).astype(np.int64),
        "pred": pred.astype(np.int64),
        "extra": {"instance_label": torch.from_numpy(instances)[None], "image_raw": raw},
    }
    report = SegmentationReport(tmp_path / "instances", ["background", "gland"], overlay_count=1, summary=False)
    run_evaluator(report, [case])
    assert report.metrics["object_source"] == "instance_masks"
    # each segmented object covers 24/30 of its gland: F1 1 (connected components would merge the glands: F1 0)
    assert report.rows[0]["object_f1"] == 1.0
    assert report.metrics["parts"]["testA"]["object_dice"] == pytest.approx(48 / 54)
    overlay = np.asarray(Image.open(tmp_path / "instances" / "overlays" / "best_1_touching_glands.png"))
    assert tuple(overlay[20, 20]) == (50, 50, 50)  # drawn on image_raw, not on the (absent) de-normalised image

    components = SegmentationReport(
        tmp_path / "components", ["background", "gland"], object_source="connected_components", summary=False
    )
    run_evaluator(components, [case])
    assert components.metrics["object_source"] == "connected_components"
    assert (components.rows[0]["object_f1"], components.rows[0]["fp"], components.rows[0]["fn"]) == (0.0, 2, 1)


def test_missed_glands_give_null_hausdorff_in_json(tmp_path):
    case = {"name": "missed", "part": "testB", "label": box(blank(), (2, 9), (2, 9)), "pred": blank()}
    report = SegmentationReport(tmp_path, ["background", "gland"], overlay_count=0, summary=False)
    run_evaluator(report, [case])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["overall"]["object_hausdorff"] is None  # infinite
    assert metrics["overall"]["hd95"] == pytest.approx(40.0)  # image diagonal sqrt(24^2 + 32^2)
    assert (metrics["overall"]["object_f1"], metrics["overall"]["dice"]) == (0.0, 0.0)
    with open(tmp_path / "metrics_per_image.csv", newline="") as handle:
        assert next(csv.DictReader(handle))["object_hausdorff"] == "inf"
    assert not (tmp_path / "overlays").exists()


def test_add_item_accepts_class_maps_and_checks_input(tmp_path):
    report = SegmentationReport(tmp_path, ["background", "gland"], summary=False)
    label = torch.from_numpy(box(blank(), (4, 11), (4, 11)))[None]
    row = report.add_item({"pred": label.clone(), "label": label.float()}, {"name": "x"})
    assert (row["name"], row["part"], row["dice"], row["object_f1"]) == ("x", "", 1.0, 1.0)
    with pytest.raises(BundleInputError, match="3 channels"):
        report.add_item({"pred": torch.zeros(3, HEIGHT, WIDTH), "label": label}, {"name": "y"})
    with pytest.raises(BundleInputError, match="no 'instance_label'"):
        SegmentationReport(tmp_path, ["background", "gland"], object_source="instance_masks").add_item(
            {"pred": label, "label": label}
        )
    with pytest.raises(BundleInputError, match="object_source"):
        SegmentationReport(tmp_path, ["background", "gland"], object_source="instances")
    with pytest.raises(BundleInputError, match="num_classes is 3"):
        SegmentationReport(tmp_path, ["background", "gland"], num_classes=3)
