"""The commands users type, run as subprocesses from another working directory.

``python -m bundle.prepare glas`` followed by ``python -m monai.bundle run training`` on real GlaS (tiny network,
a few iterations), and the one-line error a wrong ``--dataset_dir`` gives instead of a stack trace.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, run_python
from monai.bundle import ConfigParser

TRAIN_JSON = str(REPO_ROOT / "configs" / "train.json")
TINY_JSON = str(REPO_ROOT / "configs" / "tiny.json")


def test_bundle_root_is_found_from_another_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = ConfigParser()
    parser.read_config(TRAIN_JSON)
    assert Path(parser.get_parsed_content("bundle_root")).resolve() == REPO_ROOT
    assert Path(parser.get_parsed_content("default_dataset_dir")).resolve() == REPO_ROOT / "data" / "synthetic"


def test_wrong_dataset_dir_is_one_clear_line(tmp_path):
    missing = tmp_path / "no_such_folder"
    done = run_python(
        [
            "-m",
            "monai.bundle",
            "run",
            "training",
            "--config_file",
            TRAIN_JSON,
            "--bundle_root",
            str(REPO_ROOT),
            "--dataset_dir",
            str(missing),
            "--output_dir",
            str(tmp_path / "out"),
            "--ckpt_dir",
            str(tmp_path / "m"),
        ],
        cwd=tmp_path,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: dataset folder {missing} does not exist"]
    assert not missing.exists()


@pytest.mark.slow
def test_prepare_and_train_on_real_glas_from_another_directory(tmp_path, glas_dir):
    data = tmp_path / "glas_10"
    done = run_python(
        ["-m", "bundle.prepare", "glas", "--source", str(glas_dir), "--output", str(data), "--split", "10"],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "training: 7 images" in done.stdout and "unlabeled: 66 images" in done.stdout
    # fmt: off
    args = [
        "-m", "monai.bundle", "run", "training",
        "--config_file", f"['{TRAIN_JSON}','{TINY_JSON}','{data}/dataset.json']", "--bundle_root", str(REPO_ROOT),
        "--output_dir", str(tmp_path / "out"), "--ckpt_dir", str(tmp_path / "models"),
        "--max_epochs", "1", "--epoch_length", "3", "--batch_size", "2", "--patch_size", "[64,64]",
        "--zoom_range", "[0.25,0.3]", "--sw_batch_size", "8", "--cache_rate", "0.0",
    ]
    # fmt: on
    done = run_python(args, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "val_dice" in done.stdout
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert any(key.startswith("decoder.") for key in state)
    assert (tmp_path / "out" / "checkpoints" / "last.pt").is_file()


def test_importing_the_package_leaves_the_excepthook_alone(tmp_path):
    """The one-line error hook is installed by the commands (the configs' initialize), not by ``import bundle``."""
    script = "import sys, bundle, bundle.data, bundle.engine; print(sys.excepthook is sys.__excepthook__)"
    done = run_python(["-c", script], tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
