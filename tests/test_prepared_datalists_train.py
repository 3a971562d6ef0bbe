"""Every preparation command's datalist trains with the core bundle: a couple of iterations and one validation.

Fixtures reproduce each dataset's real layout (tests/dataset_fixtures.py); EBHI-Seg is covered with its threshold
override in tests/test_prepare_ebhi.py. Checked: every logged total is the configured objective of its logged terms,
every network parameter was stepped, and the validation Dice is the one computed here from the network's
predictions and the prepared labels.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dataset_fixtures import run_cli, write_folders, write_kpi, write_monuseg
from helpers import (
    check_losses_are_the_objective,
    config_files,
    hand_val_dice,
    make_workflow,
    record_terms,
    small_overrides,
)


def prepare_kpi(tmp_path: Path, capsys) -> Path:
    source = write_kpi(tmp_path / "source", size=96)
    out = tmp_path / "data"
    args = ["kpi", "--source", source, "--output", out, "--labeled-percent", 50, "--tile-size", 64]
    assert run_cli(capsys, *args)[0] == 0
    return out


def prepare_monuseg(tmp_path: Path, capsys) -> Path:
    train, test = write_monuseg(tmp_path / "source", size=64)
    out = tmp_path / "data"
    args = ["monuseg", "--source", train, "--test-source", test, "--output", out, "--labeled-percent", 50]
    assert run_cli(capsys, *args)[0] == 0
    return out


def prepare_folders(tmp_path: Path, capsys) -> Path:
    images = write_folders(tmp_path / "source", size=64)
    out = tmp_path / "data"
    args = ["folders", "--images", images / "images", "--masks", images / "masks", "--output", out, "--seed", 0]
    assert run_cli(capsys, *args)[0] == 0
    return out


@pytest.mark.parametrize("prepare", [prepare_kpi, prepare_monuseg, prepare_folders], ids=["kpi", "monuseg", "folders"])
def test_prepared_datalist_trains(tmp_path, capsys, prepare):
    data = prepare(tmp_path, capsys)
    overrides = small_overrides(tmp_path, data, max_epochs=1, epoch_length=2)
    del overrides["dataset_dir"]  # from the dataset.json the preparer wrote, merged after train.json
    workflow = make_workflow(config_files() + [str(data / "dataset.json")], **overrides)
    workflow.initialize()
    assert workflow.parser.get_parsed_content("dataset_dir") == str(data)
    expected_class = {"kpi": "glomerulus", "monuseg": "nucleus", "folders": "gland"}[prepare.__name__.split("_")[1]]
    assert workflow.parser.get_parsed_content("class_names")[1] == expected_class
    trainer = workflow.parser.get_parsed_content("train#trainer")
    network = workflow.parser.get_parsed_content("network")
    before = {name: value.detach().clone() for name, value in network.named_parameters()}
    history = record_terms(trainer)
    workflow.run()
    assert len(history) == 2 and {"loss_x", "loss_u", "loss_img", "loss_txt"} <= set(history[-1])
    check_losses_are_the_objective(history, workflow.parser)
    unchanged = [name for name, value in network.named_parameters() if torch.equal(value.detach(), before[name])]
    assert unchanged == [], unchanged  # the optimizer stepped every parameter
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    validation = workflow.parser.get_parsed_content("validate#dataset")
    assert evaluator.state.epoch == 1 and evaluator.state.iteration == len(validation)  # every image, once
    assert evaluator.state.metrics["val_dice"] == pytest.approx(hand_val_dice(workflow.parser), rel=1e-5)
