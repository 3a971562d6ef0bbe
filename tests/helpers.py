"""Helpers shared by the test modules (no test module imports another): the tiny network preset, short workflows of
``configs/train.json``, the benchmark scripts, commands in a child process, and label boundaries."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
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
    """Overrides that shrink a training run to seconds: the tiny network, 64 px crops, 2 epochs of 3 iterations, all of
    them semi-supervised ones."""
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
        "supervised_warmup_fraction": 0,  # semi-supervised from the first iteration; the warm-up has its own tests
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


def check_losses_are_the_objective(history: list[dict], parser) -> None:
    """Each iteration's logged ``loss`` is ``a L_x + b L_u + ramp (l_img L_img + l_txt L_txt + l_align L_align)``
    of its logged terms with the config's weights, and ``L_u`` the weighted sum of its three parts (a NaN fails)."""
    a, b = parser.get_parsed_content("loss_weights")
    w1, w2, wfp = parser.get_parsed_content("consistency_weights")
    weights = {"loss_img": "image_weight", "loss_txt": "text_weight", "loss_align": "align_weight"}
    weights = {term: parser.get_parsed_content(key) for term, key in weights.items()}
    for terms in history:
        total = terms["loss_x"]
        if "loss_u" in terms:
            parts = w1 * terms["loss_u_s1"] + w2 * terms["loss_u_s2"] + wfp * terms["loss_u_fp"]
            assert terms["loss_u"] == pytest.approx(parts, rel=1e-5, abs=1e-7), terms
            total = a * terms["loss_x"] + b * terms["loss_u"]
        prototypes = sum(weight * terms[term] for term, weight in weights.items() if term in terms)
        total += terms.get("prototype_ramp", 0.0) * prototypes
        assert terms["loss"] == pytest.approx(total, rel=1e-5, abs=1e-6), terms


def hand_val_dice(parser) -> float:
    """Gland Dice of the network on the validation images, computed here (MONAI's MeanDice: the mean over the
    images whose label has gland; the prediction is the argmax of the config's inferer, at the label's size)."""
    network = parser.get_parsed_content("network").eval()
    inferer = parser.get_parsed_content("validate#inferer")
    device = next(network.parameters()).device
    dices = []
    for item in parser.get_parsed_content("validate#dataset"):
        with torch.no_grad():
            logits = torch.as_tensor(inferer(item["image"][None].to(device), network))
        pred = logits[0].argmax(0).cpu().numpy() == 1
        gt = np.asarray(item["label"])[0] == 1
        assert pred.shape == gt.shape
        if gt.any():
            dices.append(2 * np.sum(pred & gt) / (np.sum(pred) + np.sum(gt)))
    assert dices, "no validation label holds the foreground class"
    return float(np.mean(dices))
