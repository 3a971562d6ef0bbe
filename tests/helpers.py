"""Helpers shared by the test modules (no test module imports another): the tiny network preset, short workflows of
``configs/train.json``, the benchmark scripts, commands in a child process, and label boundaries."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
BENCHMARKS = REPO_ROOT / "benchmarks"
# configs/tiny.json: a smoke-test network (seconds per run on a CPU)
TINY_NETWORK = json.loads((CONFIGS / "tiny.json").read_text())


def config_files(*presets: str) -> list[str]:
    """``configs/train.json`` and the named presets after it."""
    return [str(CONFIGS / "train.json")] + [str(CONFIGS / f"{name}.json") for name in presets]


def small_overrides(tmp_path: Path, dataset_dir: Path, **extra) -> dict:
    """Overrides that shrink a training run to seconds: the tiny network, 64 px crops, 2 epochs of 3 iterations."""
    overrides = {
        "bundle_root": str(REPO_ROOT),
        "dataset_dir": str(dataset_dir),
        "output_dir": str(tmp_path / "out"),
        "ckpt_dir": str(tmp_path / "models"),
        "max_epochs": 2,
        "epoch_length": 3,
        "batch_size": 2,
        "patch_size": [64, 64],
        "zoom_range": [0.5, 1.0],
        "threshold_warmup_iterations": 2,
        "prototype_warmup_iterations": 2,
        "cache_rate": 0.0,
        "sw_batch_size": 2,
        "log_interval": 1,
        **TINY_NETWORK,
    }
    overrides.update(extra)
    return overrides


def make_workflow(files, run_id: str = "run", **overrides) -> ConfigWorkflow:
    return ConfigWorkflow(config_file=files, workflow_type="train", run_id=run_id, logging_file=False, **overrides)


def record_terms(trainer) -> list[dict]:
    """The logged loss terms of every iteration, appended while ``trainer`` runs."""
    history: list[dict] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: history.append(dict(e.state.output["loss_terms"])))
    return history


def load_script(name: str):
    """``benchmarks/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child_env(repo_on_path: bool = True, **extra: str) -> dict[str, str]:
    """The environment of a child process: offline hubs; with ``repo_on_path`` the repository on ``PYTHONPATH``,
    without it nothing of the repository (the code must come from the working directory or the installed package)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    if repo_on_path:
        env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def run_python(
    args: list[str], cwd: Path, *, repo_on_path: bool = True, timeout: int = 600, **extra_env: str
) -> subprocess.CompletedProcess:
    """``python ARGS`` in a child process with :func:`child_env`, its output captured."""
    env = child_env(repo_on_path, **extra_env)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def boundary(label: torch.Tensor, width: int = 1) -> torch.Tensor:
    """[H, W] mask of the pixels within ``width`` of a pixel of another class (``label`` [1, H, W])."""
    x = torch.as_tensor(label).float()[None]
    size = 2 * width + 1
    high = F.max_pool2d(x, size, stride=1, padding=width)
    low = -F.max_pool2d(-x, size, stride=1, padding=width)
    return (high != low)[0, 0]


def cli_mask(bundle_root: Path, image: Path, output_dir: Path, **overrides):
    """The bundle's own inference command (``bundle_root/configs/inference.json``) on one image: its mask as class
    indices."""
    import numpy as np
    from PIL import Image

    workflow = ConfigWorkflow(
        config_file=str(bundle_root / "configs" / "inference.json"),
        workflow_type="infer",
        logging_file=False,
        bundle_root=str(bundle_root),
        dataset_dir=str(image),
        output_dir=str(output_dir),
        progress=False,
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return np.asarray(Image.open(output_dir / f"{image.stem}_mask.png")) // 255
