"""Resuming a killed run from ``last.pt`` with ``--resume true``, and a NaN loss stopping training cleanly.

A run interrupted in the middle of an epoch and resumed must end where the uninterrupted run ends: same network,
optimizer, prototype bank and best validation metric (the trainer seeds every epoch from ``(seed, epoch)``).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, child_env, config_files, make_workflow, run_python, small_overrides
from ignite.engine import Events

from bundle.engine.trainer import NonFiniteLossError
from bundle.errors import BundleInputError
from bundle.prepare.synthetic import generate_synthetic_dataset

EPOCHS, EPOCH_LENGTH = 3, 3


class Interrupted(Exception):
    """Stands for the job being killed."""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "data"
    generate_synthetic_dataset(out, image_size=96, num_labeled=3, num_unlabeled=5, num_validation=2, num_test=1)
    return out


def overrides(run_dir: Path, dataset: Path, **extra) -> dict:
    return small_overrides(run_dir, dataset, **{"max_epochs": EPOCHS, "epoch_length": EPOCH_LENGTH, **extra})


def train(run_dir: Path, dataset: Path, stop_at_iteration: int | None = None, **extra):
    workflow = make_workflow(config_files(), **overrides(run_dir, dataset, **extra))
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    seen: list[int] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.iteration))
    if stop_at_iteration is not None:

        def kill(engine):
            if engine.state.iteration == stop_at_iteration:
                raise Interrupted()

        trainer.add_event_handler(Events.ITERATION_COMPLETED, kill)
    trainer.run()  # what the config's run id does; called directly so the exception arrives unwrapped
    return workflow, seen


def last_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "out" / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")


def assert_same_state(expected: dict, actual: dict) -> None:
    for name, tensor in expected.items():
        if torch.is_floating_point(tensor):
            torch.testing.assert_close(actual[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(actual[name], tensor), name


@pytest.mark.parametrize("workers", [0, 2])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, dataset, workers):
    """The uninterrupted run loads in the main process; the killed and resumed one with ``workers`` persistent worker
    processes: augmentations come from per-draw seeds, so both must end with the same weights."""
    whole, whole_iterations = train(tmp_path / "whole", dataset)
    assert whole_iterations == list(range(1, EPOCHS * EPOCH_LENGTH + 1))

    # killed in the middle of epoch 2: last.pt holds epoch 1
    with pytest.raises(Interrupted):
        train(tmp_path / "split", dataset, stop_at_iteration=EPOCH_LENGTH + 2, num_workers=workers)
    assert last_checkpoint(tmp_path / "split")["trainer"]["iteration"] == EPOCH_LENGTH

    resumed, resumed_iterations = train(tmp_path / "split", dataset, resume=True, num_workers=workers)
    assert resumed_iterations == list(range(EPOCH_LENGTH + 1, EPOCHS * EPOCH_LENGTH + 1))

    expected, actual = last_checkpoint(tmp_path / "whole"), last_checkpoint(tmp_path / "split")
    assert actual["trainer"] == expected["trainer"]
    assert_same_state(expected["network"], actual["network"])
    assert_same_state(expected["criterion"], actual["criterion"])  # prototype bank, prompt context
    assert actual["lr_scheduler"] == expected["lr_scheduler"]
    # the optimizer's per-parameter state (AdamW's moments and step counts)
    states = list(expected["optimizer"]["state"].values())
    resumed_states = list(actual["optimizer"]["state"].values())
    assert states and len(states) == len(resumed_states)
    for state, resumed_state in zip(states, resumed_states, strict=True):
        assert set(state) == set(resumed_state) >= {"exp_avg", "exp_avg_sq"}
        for key in state:
            torch.testing.assert_close(resumed_state[key], state[key], rtol=1e-5, atol=1e-6)
    # the best metric survives the restart, so model.pt is only replaced by a better network
    assert actual["evaluator"] == pytest.approx(expected["evaluator"])
    for run in (whole, resumed):
        assert run.parser.get_parsed_content("validate#evaluator").state.best_metric == pytest.approx(
            expected["evaluator"]["best_metric"]
        )
    model = torch.load(tmp_path / "split" / "models" / "model.pt", weights_only=True)
    reference = torch.load(tmp_path / "whole" / "models" / "model.pt", weights_only=True)
    assert_same_state(reference, model)


def test_resume_without_a_checkpoint_starts_from_the_beginning(tmp_path, dataset):
    _, iterations = train(tmp_path / "fresh", dataset, resume=True, max_epochs=1)
    assert iterations == list(range(1, EPOCH_LENGTH + 1))


def test_resume_from_an_unreadable_checkpoint_names_it(tmp_path, dataset):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception) as raised:
        train(tmp_path / "run", dataset, resume=True, resume_checkpoint=str(broken))
    error = raised.value if isinstance(raised.value, BundleInputError) else raised.value.__cause__
    assert isinstance(error, BundleInputError) and f"cannot read checkpoint {broken}" in str(error)


def test_resume_with_another_epoch_length_is_refused(tmp_path, dataset):
    train(tmp_path / "run", dataset, max_epochs=1)
    with pytest.raises(BundleInputError, match="epoch_length 3, this run uses 2"):
        train(tmp_path / "run", dataset, resume=True, epoch_length=2)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, dataset):
    workflow = make_workflow(config_files(), **overrides(tmp_path, dataset))
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    criterion = workflow.parser.get_parsed_content("criterion")
    poisoned_iteration = EPOCH_LENGTH + 2

    def poison(_module, args, terms):
        if args[1] == poisoned_iteration:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    criterion.register_forward_hook(poison)
    network = workflow.parser.get_parsed_content("network")
    steps: list[int] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: steps.append(e.state.iteration))
    with pytest.raises(NonFiniteLossError) as raised:
        trainer.run()
    checkpoint = tmp_path / "out" / "checkpoints" / "last.pt"
    message = str(raised.value)
    assert f"the loss is nan at epoch 2, iteration {poisoned_iteration}" in message
    assert f"the last good checkpoint is kept: {checkpoint}" in message
    assert steps == list(range(1, poisoned_iteration))  # no optimizer step with the NaN loss
    assert all(torch.isfinite(p).all() for p in network.parameters())
    kept = torch.load(checkpoint, weights_only=True)
    assert kept["trainer"]["iteration"] == EPOCH_LENGTH
    assert all(torch.isfinite(v).all() for v in kept["network"].values() if torch.is_floating_point(v))


@pytest.mark.slow
def test_killed_process_resumes_from_the_command_line(tmp_path, dataset):
    """SIGKILL a real ``monai.bundle run`` once its first epoch is saved, then finish with ``--resume true``."""
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(REPO_ROOT / "configs" / "train.json")]
    for key, value in overrides(tmp_path, dataset, max_epochs=4, cache_rate=1.0).items():
        args += [f"--{key}", repr(value) if not isinstance(value, str) else value]
    env = child_env()
    last = tmp_path / "out" / "checkpoints" / "last.pt"
    job = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not last.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    saved = torch.load(last, weights_only=True)["trainer"]["iteration"]
    assert 0 < saved < 4 * EPOCH_LENGTH, "the job must be killed before it ends"

    done = run_python(args[1:] + ["--resume", "true"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {last}: epoch {saved // EPOCH_LENGTH}, iteration {saved}" in done.stderr + done.stdout
    assert torch.load(last, weights_only=True)["trainer"]["iteration"] == 4 * EPOCH_LENGTH
