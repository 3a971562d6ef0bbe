"""What a GPU run would trip over, checked on the CPU: device placement and mixed-precision dtypes in one training
iteration (and its validation and checkpoint) of every preset.

CUDA refuses to mix host and device tensors in ``torch.stack``, ``torch.where`` and indexing; on a CPU-only machine
that cannot happen, so :class:`device_guard.DeviceGuard` fails on the calls that would make host tensors there.
Mixed-precision dtypes are exercised with CPU autocast in bfloat16, the same code path as CUDA AMP: the network's
outputs are bfloat16 and every loss term must still come out finite.
"""

from __future__ import annotations

import math

import pytest
import torch
from device_guard import BUNDLE, DeviceGuard, SyncRecorder
from helpers import config_files, make_workflow, record_terms, small_overrides
from ignite.engine import Events
from monai.engines.utils import IterationEvents

PRESETS = ["supervised", "unimatch", "image_prototypes", "text_prototypes", "mpamatch", "mpamatch_random_text"]


def one_iteration(tmp_path, dataset_dir, presets, **extra):
    """A workflow of one iteration and one validation whose trainer runs under bfloat16 CPU autocast."""
    overrides = small_overrides(tmp_path, dataset_dir, max_epochs=1, epoch_length=1, **extra)
    workflow = make_workflow(config_files(*presets), **overrides)
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    trainer.amp, trainer.amp_kwargs = True, {"dtype": torch.bfloat16}  # the trainer turns AMP off on a CPU
    dtypes: dict[str, torch.dtype] = {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: dtypes.update(pred=e.state.output["pred"].dtype))
    return workflow, trainer, dtypes


@pytest.mark.parametrize("preset", PRESETS)
def test_an_iteration_of_every_preset_creates_its_tensors_on_the_training_device(tmp_path, synthetic_dir, preset):
    workflow, trainer, dtypes = one_iteration(tmp_path, synthetic_dir, [preset])
    history = record_terms(trainer)
    with DeviceGuard() as guard:
        workflow.run()
    assert guard.violations == []
    assert guard.checked_calls > 0 or preset == "supervised"  # it saw the bundle's calls (CutMix's at least)
    assert dtypes["pred"] == torch.bfloat16  # the forward really ran in reduced precision
    assert len(history) == 1 and all(math.isfinite(value) for value in history[0].values())
    if preset != "supervised":
        assert {"threshold", "reliable_ratio", "loss_u"} <= set(history[0])


def test_cutmix_from_a_second_batch_creates_its_tensors_on_the_training_device(tmp_path, synthetic_dir):
    workflow, trainer, dtypes = one_iteration(
        tmp_path, synthetic_dir, ["mpamatch"], cutmix_source="batch", cutmix_prob=1.0
    )
    with DeviceGuard() as guard:
        workflow.run()
    assert guard.violations == [] and dtypes["pred"] == torch.bfloat16


def test_the_guard_names_factory_calls_that_leave_the_device_to_the_default():
    """Code compiled as if it were in a checked bundle file, and the same code elsewhere."""
    snippet = "a = torch.tensor(0.5)\nb = torch.zeros(2, device=x.device)\nc = x.new_zeros(2)\nd = torch.as_tensor(x)\n"
    with DeviceGuard() as guard:
        exec(compile(snippet, str(BUNDLE / "losses" / "mpamatch.py"), "exec"), {"torch": torch, "x": torch.ones(1)})
        exec(compile(snippet, str(BUNDLE / "data" / "transforms.py"), "exec"), {"torch": torch, "x": torch.ones(1)})
    assert guard.violations == ["bundle/losses/mpamatch.py:1 tensor"]
    assert guard.checked_calls == 3


def test_an_mpamatch_iteration_reads_the_device_twice(tmp_path, synthetic_dir):
    """Each read of device data stalls a GPU pipeline: the loss and the engine read the class counts of the pixel
    sampling and, after the backward pass is queued, the logged terms; nothing else."""
    workflow = make_workflow(
        config_files("mpamatch"),
        **small_overrides(
            tmp_path, synthetic_dir, max_epochs=1, epoch_length=2, threshold_warmup_iterations=0, val_interval=5
        ),
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    recorder = SyncRecorder()
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda _: recorder.__enter__())
    trainer.add_event_handler(IterationEvents.MODEL_COMPLETED, lambda _: recorder.__exit__(None, None, None))
    workflow.run()
    assert (
        recorder.sites
        == [
            "bundle/losses/contrast.py:sample_balanced_pixels tolist",
            "bundle/engine/trainer.py:_logged_terms tolist",
        ]
        * 2
    )
