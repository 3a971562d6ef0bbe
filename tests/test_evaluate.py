"""``configs/evaluate.json`` on real GlaS: metrics.json, the per-image CSV and overlays, after a short training and
with a network whose predictions are known, so that every pixel metric and object count is computed here by hand.

The test list is cut to a few testA and testB images so that the runs stay short; everything else is the
command a user types (``python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']"``).
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO_ROOT, run_python
from monai.metrics import compute_hausdorff_distance
from PIL import Image
from scipy import ndimage

from bundle.prepare import main as prepare_main
from bundle.prepare.synthetic import generate_synthetic_dataset

METRIC_KEYS = {"dice", "jaccard", "mdice", "mjaccard", "hd95", "object_f1", "object_dice", "object_hausdorff"}
MEAN_KEYS = ("dice", "jaccard", "mdice", "mjaccard", "hd95")  # per-image values averaged over a block
SMALL = ["--patch_size", "[64,64]", "--sw_batch_size", "16"]
# the known network: a 1x1 convolution that predicts gland exactly where the red channel is at most 190 (of 255)
RED_THRESHOLD = 190
CONV_1X1 = "{'_target_': 'torch.nn.Conv2d', 'in_channels': 3, 'out_channels': 2, 'kernel_size': 1}"


def run_bundle(config_files: list[str], args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    files = "[" + ",".join(f"'{REPO_ROOT / 'configs' / name}'" for name in config_files) + "]"
    return run_python(["-m", "monai.bundle", "run", *args[:1], "--config_file", files, *args[1:]], cwd, timeout=900)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, glas_dir) -> Path:
    """GlaS 10 % with 2 validation and 5 test images (3 testA, 2 testB)."""
    data = tmp_path_factory.mktemp("evaluate_data") / "glas_10"
    assert prepare_main(["glas", "--source", str(glas_dir), "--output", str(data), "--split", "10"]) == 0
    datalist = json.loads((data / "datalist.json").read_text())
    datalist["validation"] = datalist["validation"][:2]
    test_a = [item for item in datalist["test"] if item["part"] == "testA"][:3]
    test_b = [item for item in datalist["test"] if item["part"] == "testB"][:2]
    datalist["test"] = test_a + test_b
    (data / "datalist.json").write_text(json.dumps(datalist, indent=4))
    return data


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    data = prepared
    common = ["--bundle_root", str(REPO_ROOT), "--dataset_dir", str(data), "--output_dir", str(root / "runs"),
              "--ckpt_dir", str(root / "models"), *SMALL]  # fmt: skip
    done = run_bundle(
        ["train.json", "tiny.json"],
        ["training", *common, "--max_epochs", "1", "--epoch_length", "4", "--batch_size", "2", "--cache_rate", "0.0"],
        cwd=root,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (root / "models" / "model.pt").is_file()
    return {"root": root, "data": data, "common": common}


def read_rows(folder: Path) -> list[dict]:
    with open(folder / "metrics_per_image.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def check_blocks_are_their_rows(metrics: dict, rows: list[dict]) -> None:
    """Every block of metrics.json against its images' CSV rows: pixel metrics are the means of the per-image
    values, object F1 is 2 TP / (2 TP + FP + FN) of the summed counts (the GlaS contest's way)."""
    blocks = {"overall": rows, **{part: [r for r in rows if r["part"] == part] for part in ("testA", "testB")}}
    assert set(metrics["parts"]) == {"testA", "testB"}
    for name, block_rows in blocks.items():
        block = metrics["overall"] if name == "overall" else metrics["parts"][name]
        assert METRIC_KEYS <= set(block) and block["count"] == len(block_rows), name
        for key in MEAN_KEYS:
            expected = sum(float(r[key]) for r in block_rows) / len(block_rows)
            assert block[key] == pytest.approx(expected, rel=1e-6), (name, key)
        tp, fp, fn = (sum(int(r[key]) for r in block_rows) for key in ("tp", "fp", "fn"))
        assert block["object_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12), name


@pytest.mark.slow
def test_evaluate_writes_metrics_per_part_csv_and_overlays(trained):
    root = trained["root"]
    done = run_bundle(["train.json", "tiny.json", "evaluate.json"], ["run", *trained["common"]], cwd=root)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = root / "runs" / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    rows = read_rows(out)
    assert [row["part"] for row in rows].count("testB") == 2 and len(rows) == 5
    assert metrics["overall"]["count"] == 5 and metrics["parts"]["testA"]["count"] == 3
    check_blocks_are_their_rows(metrics, rows)
    for row in rows:  # the object counts of a row are one matching of its objects
        tp, fp, fn = (int(row[key]) for key in ("tp", "fp", "fn"))
        assert (tp + fp, tp + fn) == (int(row["pred_objects"]), int(row["gt_objects"])), row
    assert metrics["object_source"] == "connected_components"  # this GlaS copy has binary masks only
    overlays = sorted((out / "overlays").glob("*.png"))
    assert any(p.name.startswith("best_") for p in overlays) and any(p.name.startswith("worst_") for p in overlays)
    images = {
        item["name"]: item["image"] for item in json.loads((trained["data"] / "datalist.json").read_text())["test"]
    }
    for overlay in overlays:
        name = overlay.stem.split("_", 2)[2]  # best_<k>_<name>
        with Image.open(overlay) as picture, Image.open(images[name]) as source:
            assert picture.mode == "RGB" and picture.size == source.size
    assert all(row["name"].startswith("test") for row in rows)
    assert "object_f1" in done.stdout and "testB" in done.stdout  # the summary table is printed
    assert metrics["postprocessing"] == "objects under 2000 px removed, holes filled"
    assert "post-processing of the predictions: objects under 2000 px removed, holes filled" in done.stdout


def hand_metrics(image_file: str, label_file: str) -> dict:
    """What the known network must score on one image, computed here with numpy/scipy (and MONAI's HD95)."""
    with Image.open(image_file) as image, Image.open(label_file) as label:
        pred = np.asarray(image.convert("RGB"))[..., 0] <= RED_THRESHOLD
        gt = np.asarray(label) > 0  # mask_mode "nonzero"
    assert gt.ndim == 2 and 0.05 < pred.mean() < 0.95 and 0.05 < gt.mean() < 0.95  # neither side is trivial
    counts = {c: (np.sum((pred == c) & (gt == c)), np.sum(pred == c), np.sum(gt == c)) for c in (False, True)}
    dice = {c: 2 * both / (p + g) for c, (both, p, g) in counts.items()}
    jaccard = {c: both / (p + g - both) for c, (both, p, g) in counts.items()}
    onehot = [torch.from_numpy(np.stack([~m, m]))[None] for m in (pred, gt)]
    hd95 = float(compute_hausdorff_distance(*onehot, include_background=False, percentile=95)[0, 0])
    # GlaS objects: 8-connected components; a segmented object is a true positive when it covers more than half of
    # the ground-truth object it overlaps most
    pred_objects, n_pred = ndimage.label(pred, structure=np.ones((3, 3)))
    gt_objects, n_gt = ndimage.label(gt, structure=np.ones((3, 3)))
    gt_areas = np.bincount(gt_objects.ravel())
    pairs, overlaps = np.unique(np.stack([pred_objects[gt], gt_objects[gt]]), axis=1, return_counts=True)
    best: dict[int, tuple[int, int]] = {}  # segmented object -> (overlap, ground-truth object) of the largest overlap
    for (s, g), overlap in zip(pairs.T.tolist(), overlaps.tolist()):
        if s and (overlap, -g) > (best.get(s, (0, 0))[0], -best.get(s, (0, 0))[1]):
            best[s] = (overlap, g)
    tp = sum(overlap / gt_areas[g] > 0.5 for overlap, g in best.values())
    return {
        "dice": dice[True],
        "jaccard": jaccard[True],
        "mdice": (dice[True] + dice[False]) / 2,
        "mjaccard": (jaccard[True] + jaccard[False]) / 2,
        "hd95": hd95,
        "tp": tp,
        "fp": n_pred - tp,
        "fn": n_gt - tp,
        "pred_objects": n_pred,
        "gt_objects": n_gt,
        "counts": counts,
    }


@pytest.mark.slow
def test_evaluate_scores_a_known_network_as_computed_by_hand(tmp_path, prepared):
    """A 1x1 convolution whose logits are 0 (background) and ``c - red`` (gland, ``red`` normalised as the config
    normalises it, ``c`` half a grey level above the threshold): its class map is known exactly (sliding-window
    blending of identical per-pixel logits changes them by float rounding only), so every pixel metric, the pooled
    Dice and the object counts are checked against values computed here from the images and masks."""
    mean, std = 0.485, 0.229  # configs/train.json intensity_mean / intensity_std of the red channel
    conv = torch.nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[1, 0] = -1.0
        conv.bias[1] = ((RED_THRESHOLD + 0.5) / 255 - mean) / std
    (tmp_path / "models").mkdir()
    torch.save(conv.state_dict(), tmp_path / "models" / "model.pt")
    args = ["run", "--bundle_root", str(REPO_ROOT), "--dataset_dir", str(prepared), "--output_dir", str(tmp_path),
            "--ckpt_dir", str(tmp_path / "models"), *SMALL, "--network_def", CONV_1X1, "--amp", "False",
            "--image_scale", "1", "--min_object_area", "0", "--fill_holes", "False", "--tta", "dihedral"]  # fmt: skip
    done = run_bundle(["train.json", "evaluate.json"], args, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = tmp_path / "eval"
    metrics, rows = json.loads((out / "metrics.json").read_text()), read_rows(out)
    # a 1x1 convolution commutes with flips: the 8 views average to its own prediction, the hand-computed one
    assert metrics["postprocessing"] == "none" and metrics["tta"] == "dihedral"
    assert "test-time augmentation: dihedral" in done.stdout
    items = json.loads((prepared / "datalist.json").read_text())["test"]
    assert [row["name"] for row in rows] == [item["name"] for item in items]
    expected = {item["name"]: hand_metrics(item["image"], item["label"]) for item in items}
    for row in rows:
        hand = expected[row["name"]]
        for key in MEAN_KEYS:
            assert float(row[key]) == pytest.approx(hand[key], rel=1e-6), (row["name"], key)
        for key in ("tp", "fp", "fn", "pred_objects", "gt_objects"):
            assert int(row[key]) == hand[key], (row["name"], key)
    for name, part in (("overall", None), ("testA", "testA"), ("testB", "testB")):
        block = metrics["overall"] if part is None else metrics["parts"][part]
        hands = [expected[item["name"]] for item in items if part is None or item["part"] == part]
        for key in MEAN_KEYS:
            assert block[key] == pytest.approx(np.mean([h[key] for h in hands]), rel=1e-6), (name, key)
        tp, fp, fn = (sum(h[key] for h in hands) for key in ("tp", "fp", "fn"))
        assert block["object_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0), name
        # pooled: intersections and sizes summed over the images first (2 sum|P&G| / (sum|P| + sum|G|))
        sums = {c: np.sum([h["counts"][c] for h in hands], axis=0) for c in (True, False)}  # both, pred, label
        pooled_dice = {c: 2 * b / (p + g) for c, (b, p, g) in sums.items()}
        pooled_jaccard = {c: b / (p + g - b) for c, (b, p, g) in sums.items()}
        assert block["pooled_dice"] == pytest.approx(pooled_dice[True], rel=1e-9), name
        assert block["pooled_jaccard"] == pytest.approx(pooled_jaccard[True], rel=1e-9), name
        assert block["pooled_mdice"] == pytest.approx((pooled_dice[True] + pooled_dice[False]) / 2, rel=1e-9), name
        assert block["pooled_mjaccard"] == pytest.approx(
            (pooled_jaccard[True] + pooled_jaccard[False]) / 2, rel=1e-9
        ), name
        assert not math.isclose(block["pooled_dice"], block["dice"], rel_tol=1e-3)  # two conventions, two values
    check_blocks_are_their_rows(metrics, rows)


def test_evaluate_without_a_checkpoint_is_one_clear_line(tmp_path):
    data = tmp_path / "data"
    generate_synthetic_dataset(data, image_size=64, num_labeled=1, num_unlabeled=1, num_validation=1, num_test=1)
    missing = tmp_path / "models"
    done = run_bundle(
        ["train.json", "evaluate.json"],
        ["run", "--bundle_root", str(REPO_ROOT), "--ckpt_dir", str(missing), "--output_dir", str(tmp_path / "runs"),
         "--dataset_dir", str(data)],  # fmt: skip
        cwd=tmp_path,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(missing / "model.pt") in errors[0], done.stderr[-2000:]
