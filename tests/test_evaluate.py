"""``configs/evaluate.json`` after a short training on real GlaS: metrics.json, the per-image CSV and overlays.

The test list is cut to a few testA and testB images so that the run stays short; everything else is the
command a user types (``python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']"``).
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
from helpers import REPO_ROOT, run_python
from PIL import Image

from bundle.prepare import main as prepare_main
from bundle.prepare.synthetic import generate_synthetic_dataset

METRIC_KEYS = {"dice", "jaccard", "mdice", "mjaccard", "hd95", "object_f1", "object_dice", "object_hausdorff"}
SMALL = ["--patch_size", "[64,64]", "--sw_batch_size", "16"]


def run_bundle(config_files: list[str], args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    files = "[" + ",".join(f"'{REPO_ROOT / 'configs' / name}'" for name in config_files) + "]"
    return run_python(["-m", "monai.bundle", "run", *args[:1], "--config_file", files, *args[1:]], cwd, timeout=900)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, glas_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    data = root / "glas_10"
    assert prepare_main(["glas", "--source", str(glas_dir), "--output", str(data), "--split", "10"]) == 0
    datalist = json.loads((data / "datalist.json").read_text())
    datalist["validation"] = datalist["validation"][:2]
    test_a = [item for item in datalist["test"] if item["part"] == "testA"][:3]
    test_b = [item for item in datalist["test"] if item["part"] == "testB"][:2]
    datalist["test"] = test_a + test_b
    (data / "datalist.json").write_text(json.dumps(datalist, indent=4))
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


@pytest.mark.slow
def test_evaluate_writes_metrics_per_part_csv_and_overlays(trained):
    root = trained["root"]
    done = run_bundle(["train.json", "tiny.json", "evaluate.json"], ["run", *trained["common"]], cwd=root)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = root / "runs" / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["parts"]) == {"testA", "testB"}
    for block in (metrics["overall"], metrics["parts"]["testA"], metrics["parts"]["testB"]):
        assert METRIC_KEYS <= set(block)
        for key in ("dice", "jaccard", "mdice", "mjaccard", "object_f1"):
            assert 0.0 <= block[key] <= 1.0
    assert metrics["overall"]["count"] == 5 and metrics["parts"]["testA"]["count"] == 3
    assert metrics["object_source"] == "connected_components"  # this GlaS copy has binary masks only
    with open(out / "metrics_per_image.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["part"] for row in rows].count("testB") == 2 and len(rows) == 5
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
