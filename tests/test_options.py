"""Options are checked before work starts (``bundle.options``): an override id no config defines, a count, rate or
switch of the wrong kind, a device the machine lacks and class lists that disagree with ``num_classes`` each stop
``python -m monai.bundle run`` with one ``error:`` line and exit status 1, before any data is read."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import REPO_ROOT, run_python

from bundle.errors import BundleInputError
from bundle.options import check_device, check_overrides, check_values, command_line_overrides

MONAI_MAIN = "/venv/lib/python3.11/site-packages/monai/bundle/__main__.py"


def test_command_line_overrides_reads_a_monai_bundle_command_line_only():
    argv = [MONAI_MAIN, "run", "training", "--config_file", "['a.json','b.json']", "--max_epochs", "2", "--seed=3"]
    assert command_line_overrides(argv) == (["config_file", "max_epochs", "seed"], "['a.json','b.json']")
    assert command_line_overrides([MONAI_MAIN, "run", "--config_file=c.json"]) == (["config_file"], "c.json")
    assert command_line_overrides(["/usr/bin/pytest", "--max_epochs", "2"]) is None


def test_unknown_override_ids_are_refused_with_the_closest_id():
    train = str(REPO_ROOT / "configs" / "train.json")
    supervised = str(REPO_ROOT / "configs" / "supervised.json")
    files = f"['{train}','{supervised}']"
    good = [MONAI_MAIN, "run", "training", "--config_file", files, "--max_epochs", "1", "--train#trainer#max_epochs"]
    check_overrides(good + ["1", "--train::trainer::max_epochs", "1", "--meta_file", "m.json", "--logging_file", "x"])
    with pytest.raises(BundleInputError) as error:
        check_overrides([MONAI_MAIN, "run", "training", "--config_file", files, "--max_epoch", "1"])
    assert str(error.value) == "--max_epoch is not an option of train.json, supervised.json; did you mean --max_epochs?"
    with pytest.raises(
        BundleInputError, match=r"^--train#trainer#max_epoch is not .*did you mean --train#trainer#max_epochs\?$"
    ):
        check_overrides([MONAI_MAIN, "run", "--config_file", train, "--train#trainer#max_epoch", "1"])
    with pytest.raises(BundleInputError, match=r"^--zzzzzz is not an option of train.json$"):
        check_overrides([MONAI_MAIN, "run", "--config_file", train, "--zzzzzz", "1"])
    check_overrides(["/usr/bin/pytest", "--zzzzzz"])  # workflows made in Python are not checked


@pytest.mark.parametrize(
    "kind, name, value, message",
    [
        ("counts", "batch_size", 0, "--batch_size must be a whole number >= 1, got 0"),
        ("counts", "max_epochs", -1, "--max_epochs must be a whole number >= 1, got -1"),
        ("counts", "epoch_length", 2.5, "--epoch_length must be a whole number >= 1, got 2.5"),
        ("counts", "batch_size", True, "--batch_size must be a whole number >= 1, got True"),
        ("non_negative_counts", "num_workers", -2, "--num_workers must be a whole number >= 0, got -2"),
        ("rates", "learning_rate", "nan", "--learning_rate must be a number > 0, got 'nan'"),
        ("rates", "learning_rate", math.inf, "--learning_rate must be a number > 0, got inf"),
        ("rates", "image_scale", 0, "--image_scale must be a number > 0, got 0"),
        ("non_negative", "weight_decay", -0.1, "--weight_decay must be a number >= 0, got -0.1"),
        ("fractions", "cache_rate", 1.5, "--cache_rate must be a number from 0 to 1, got 1.5"),
        (
            "switches",
            "amp",
            "false",
            "--amp must be True or False, got 'false' (on the command line write True or False: 'false' arrives "
            "as text)",
        ),
        (
            "text_switches",
            "resume",
            "yes",
            "--resume must be True or False, got 'yes' (on the command line write "
            "True or False: 'false' arrives as text)",
        ),
        (
            "sizes",
            "patch_size",
            [128, 0],
            "--patch_size must be a list of whole numbers >= 1, e.g. [256,256], got [128, 0]",
        ),
    ],
)
def test_each_kind_of_value_is_checked(kind, name, value, message):
    with pytest.raises(BundleInputError) as error:
        check_values(**{kind: {name: value}})
    assert str(error.value) == message


def test_resume_reads_true_and_false_as_text():
    """``--resume true`` / ``--resume false`` (as the docs write them) mean what they say."""
    from bundle.options import as_switch

    assert [as_switch(v) for v in ("true", "False", "FALSE", True, False)] == [True, False, False, True, False]
    check_values(text_switches={"resume": "false"})
    check_values(text_switches={"resume": True})


def test_good_values_pass_and_class_lists_must_match_num_classes():
    check_values(
        counts={"batch_size": 1},
        non_negative_counts={"seed": 0},
        rates={"learning_rate": 1e-4},
        non_negative={"weight_decay": 0.0},
        fractions={"cache_rate": 1},
        switches={"amp": False},
        sizes={"patch_size": (256, 256)},
        num_classes=3,
        class_lists={"class_names": ["background", "a", "b"]},
    )
    with pytest.raises(BundleInputError, match=r"^--class_names has 2 entries but --num_classes is 3: give one"):
        check_values(num_classes=3, class_lists={"class_names": ["background", "gland"]})
    with pytest.raises(BundleInputError, match=r"^--num_classes must be a whole number >= 2, got 1$"):
        check_values(num_classes=1)


def test_devices_the_machine_lacks_are_refused():
    check_device("cpu")
    check_device(torch.device("cpu"))
    with pytest.raises(BundleInputError, match=r"^--device must be cpu, cuda or cuda:N, got 'gpu'$"):
        check_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(BundleInputError, match=r"^--device cuda: this machine has no CUDA GPU; use --device cpu$"):
            check_device("cuda")
    else:
        count = torch.cuda.device_count()
        with pytest.raises(BundleInputError, match=rf"this machine has {count} CUDA GPU"):
            check_device(f"cuda:{count}")


@pytest.mark.parametrize(
    "config, options, message",
    [
        (
            "train.json",
            ["--max_epoch", "1"],
            "error: --max_epoch is not an option of train.json; did you mean --max_epochs?",
        ),
        ("train.json", ["--batch_size", "0"], "error: --batch_size must be a whole number >= 1, got 0"),
        ("train.json", ["--learning_rate", "nan"], "error: --learning_rate must be a number > 0, got 'nan'"),
        ("train.json", ["--num_classes", "3"], "error: --class_names has 2 entries but --num_classes is 3"),
        ("train.json", ["--device", "gpu"], "error: --device must be cpu, cuda or cuda:N, got 'gpu'"),
        (
            "train.json",
            ["--max_epochs", "2", "--epoch_length", "3", "--supervised_warmup_iterations", "6"],
            "error: --supervised_warmup_iterations 6 leaves no semi-supervised iteration: the run has 6",
        ),
        (
            "train.json",
            ["--supervised_warmup_fraction", "1"],
            "error: --supervised_warmup_fraction must be a number >= 0 and < 1, got 1",
        ),
        ("inference.json", ["--sw_batch_size", "0"], "error: --sw_batch_size must be a whole number >= 1, got 0"),
        ("inference.json", ["--tta", "rotate"], "error: --tta must be one of none, flips, dihedral, got 'rotate'"),
        ("train.json", ["--tta", "flip"], "error: --tta must be one of none, flips, dihedral, got 'flip'"),
        ("inference.json", ["--output_dri", "x"], "error: --output_dri is not an option of inference.json; did you"),
    ],
)
def test_the_commands_stop_with_one_error_line_before_any_work(tmp_path, config, options, message):
    run_id = "training" if config == "train.json" else "run"
    args = ["-m", "monai.bundle", "run", run_id, "--config_file", str(REPO_ROOT / "configs" / config)]
    args += ["--bundle_root", str(REPO_ROOT), "--output_dir", str(tmp_path / "out"), "--ckpt_dir", str(tmp_path / "m")]
    done = run_python(args + options, tmp_path, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing trained or written
