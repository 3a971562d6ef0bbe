"""Checks of the options a user passes, run by the configs' ``initialize`` before any work starts.

``python -m monai.bundle run`` accepts any ``--id value``: an id that no config defines is added silently and
changes nothing (``--max_epoch 1`` trains the default schedule), and a value of the wrong kind fails deep inside
PyTorch with a traceback, or not at all (``--resume false`` reaches the config as the text "false", which is true).
:func:`check_overrides` refuses ids that the merged configs do not define, naming the closest one;
:func:`check_values` checks counts, rates, switches, the device and the class lists. Both raise
:class:`~bundle.errors.BundleInputError`, which the configs' hook prints as one ``error:`` line.
"""

from __future__ import annotations

import ast
import difflib
import math
import numbers
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .errors import BundleInputError

__all__ = [
    "RUN_ARGUMENTS",
    "as_switch",
    "check_overrides",
    "check_supervised_warmup",
    "check_values",
    "check_writable_dirs",
    "command_line_overrides",
    "supervised_warmup_iterations",
]

# the arguments of ``monai.bundle run`` itself (and of the workflow it creates): not config ids
RUN_ARGUMENTS = frozenset(
    {
        "run_id",
        "init_id",
        "final_id",
        "meta_file",
        "config_file",
        "logging_file",
        "tracking",
        "args_file",
        "workflow_type",
        "workflow_name",
        "properties_path",
    }
)


def command_line_overrides(argv: Sequence[str]) -> tuple[list[str], Any] | None:
    """(the ``--id`` names, the ``--config_file`` value) of a ``python -m monai.bundle`` command line, else None."""
    if not argv or not os.path.normpath(argv[0]).endswith(os.path.join("monai", "bundle", "__main__.py")):
        return None
    names, config_file = [], None
    for index, token in enumerate(argv[1:], start=1):
        if not token.startswith("--") or len(token) == 2:
            continue
        name, equals, value = token[2:].partition("=")
        names.append(name)
        if name == "config_file":
            config_file = value if equals else (argv[index + 1] if index + 1 < len(argv) else None)
    return names, config_file


def _config_files(value: Any) -> list[str]:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
    return [str(item) for item in value] if isinstance(value, (list, tuple)) else [str(value)]


def _ids(config: Any, prefix: str = "") -> Iterator[str]:
    """Every id of a config, nested ids joined with ``#``."""
    items = config.items() if isinstance(config, Mapping) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        name = f"{prefix}{key}"
        yield name
        yield from _ids(value, f"{name}#")


def check_overrides(argv: Sequence[str] | None = None) -> None:
    """Refuse ``--id value`` overrides whose id no merged config defines (MONAI's own arguments are allowed).

    Only a ``python -m monai.bundle`` command line is checked (``sys.argv`` by default); workflows created in
    Python (tests, MONAI Label) pass their overrides as they mean them.
    """
    from monai.bundle import ConfigParser

    found = command_line_overrides(sys.argv if argv is None else argv)
    if found is None or found[1] is None:
        return
    names, config_file = found
    files = _config_files(config_file)
    parser = ConfigParser()
    parser.read_config(files)
    known = None
    for name in names:
        if name in RUN_ARGUMENTS or name.replace("-", "_") in RUN_ARGUMENTS or name in parser:
            continue
        known = known or sorted(set(_ids(parser.get())))
        close = difflib.get_close_matches(name.replace("::", "#"), known, n=1, cutoff=0.6)
        hint = f"; did you mean --{close[0]}?" if close else ""
        shown = ", ".join(os.path.basename(f) for f in files)
        raise BundleInputError(f"--{name} is not an option of {shown}{hint}")


def _whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


SWITCH = "True or False"


def _check(name: str, value: Any, ok: bool, allowed: str) -> None:
    if ok:
        return
    hint = " (on the command line write True or False: 'false' arrives as text)" if allowed == SWITCH else ""
    raise BundleInputError(f"--{name} must be {allowed}, got {value!r}{hint if isinstance(value, str) else ''}")


TEXT_SWITCHES = {"true": True, "false": False}


def as_switch(value: Any) -> Any:
    """A switch given as text on the command line (``--resume true``/``false``) as a bool; other values unchanged."""
    return TEXT_SWITCHES.get(value.lower(), value) if isinstance(value, str) else value


def check_values(
    counts: Mapping[str, Any] | None = None,
    non_negative_counts: Mapping[str, Any] | None = None,
    rates: Mapping[str, Any] | None = None,
    non_negative: Mapping[str, Any] | None = None,
    fractions: Mapping[str, Any] | None = None,
    switches: Mapping[str, Any] | None = None,
    text_switches: Mapping[str, Any] | None = None,
    sizes: Mapping[str, Any] | None = None,
    device: Any = None,
    num_classes: Any = None,
    class_lists: Mapping[str, Any] | None = None,
) -> None:
    """Check option values by kind; the first wrong one raises :class:`BundleInputError` naming it.

    Args:
        counts: whole numbers >= 1 (batch sizes, epochs, iterations, intervals).
        non_negative_counts: whole numbers >= 0 (workers, warm-up iterations, seeds).
        rates: finite numbers > 0 (learning rates, scales).
        non_negative: finite numbers >= 0 (weight decay, loss weights).
        fractions: finite numbers in [0, 1] (probabilities, cache rate).
        switches: True or False.
        text_switches: True or False, or the text "true"/"false" (switches the config reads through
            :func:`as_switch`, such as ``resume``, documented as ``--resume true``).
        sizes: lists of whole numbers >= 1 (crop and window sizes).
        device: a torch device this machine has (``cuda`` needs a GPU, ``cuda:N`` that many).
        num_classes: whole number >= 2, and the length of every list in ``class_lists``.
    """
    for name, value in (counts or {}).items():
        _check(name, value, _whole(value) and value >= 1, "a whole number >= 1")
    for name, value in (non_negative_counts or {}).items():
        _check(name, value, _whole(value) and value >= 0, "a whole number >= 0")
    for name, value in (rates or {}).items():
        _check(name, value, _real(value) and value > 0, "a number > 0")
    for name, value in (non_negative or {}).items():
        _check(name, value, _real(value) and value >= 0, "a number >= 0")
    for name, value in (fractions or {}).items():
        _check(name, value, _real(value) and 0 <= value <= 1, "a number from 0 to 1")
    for name, value in (switches or {}).items():
        _check(name, value, isinstance(value, bool), SWITCH)
    for name, value in (text_switches or {}).items():
        _check(name, value, isinstance(as_switch(value), bool), SWITCH)
    for name, value in (sizes or {}).items():
        ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(_whole(v) and v >= 1 for v in value)
        _check(name, value, ok, "a list of whole numbers >= 1, e.g. [256,256]")
    if device is not None:
        check_device(device)
    if num_classes is not None:
        _check("num_classes", num_classes, _whole(num_classes) and num_classes >= 2, "a whole number >= 2")
        for name, names in (class_lists or {}).items():
            if isinstance(names, (list, tuple)) and len(names) != num_classes:
                raise BundleInputError(
                    f"--{name} has {len(names)} entries but --num_classes is {num_classes}: give one per class "
                    "(background first)"
                )


def _schedule_length(max_epochs: Any, epoch_length: Any) -> int | None:
    """``max_epochs`` x ``epoch_length``, or None when either is not a whole number >= 1 (check_values says so)."""
    if _whole(max_epochs) and _whole(epoch_length) and max_epochs >= 1 and epoch_length >= 1:
        return max_epochs * epoch_length
    return None


def supervised_warmup_iterations(fraction: Any, max_epochs: Any, epoch_length: Any, min_schedule: Any = 0) -> int:
    """The supervised warm-up as a share of the run (``supervised_warmup_fraction``), so that the recipe measured on
    GlaS (5/6 of 1800 and of 3600 iterations) follows the schedule that ``max_epochs`` and ``epoch_length`` set.
    Rounded to the nearest iteration, and at most all but one: a semi-supervised run keeps a semi-supervised
    iteration. A schedule shorter than ``min_schedule`` gets none: at 600 iterations the 100 semi-supervised ones
    left after a 5/6 warm-up fell below supervised training on GlaS 20 %, where 600 semi-supervised ones did not."""
    _check("supervised_warmup_fraction", fraction, _real(fraction) and 0 <= fraction < 1, "a number >= 0 and < 1")
    ok = _whole(min_schedule) and min_schedule >= 0
    _check("supervised_warmup_min_schedule", min_schedule, ok, "a whole number >= 0")
    total = _schedule_length(max_epochs, epoch_length)
    if total is None or total < min_schedule:
        return 0
    return min(int(round(fraction * total)), total - 1)


def check_supervised_warmup(iterations: Any, max_epochs: Any, epoch_length: Any, semi_supervised: Any) -> None:
    """A supervised warm-up shorter than the run, when it has unlabelled data: otherwise no iteration would use it."""
    total = _schedule_length(max_epochs, epoch_length)
    if semi_supervised and _whole(iterations) and total and iterations >= total:
        raise BundleInputError(
            f"--supervised_warmup_iterations {iterations} leaves no semi-supervised iteration: the run has {total} "
            "(max_epochs x epoch_length); give fewer, or train the supervised preset"
        )


def check_device(device: Any) -> None:
    """A device this machine has: ``cpu``, or ``cuda``/``cuda:N`` with a GPU (N below the GPU count)."""
    import torch

    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise BundleInputError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from error
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise BundleInputError(f"--device {device}: this machine has no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= count:
            raise BundleInputError(
                f"--device {device}: this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1})"
            )
    elif device.type not in ("cpu", "cuda", "mps"):
        raise BundleInputError(f"--device must be cpu, cuda or cuda:N, got {str(device)!r}")


def _creation_failure(error: OSError, folder: str) -> str:
    """Why ``folder`` could not be created: a parent that is a file, or the system's reason (naming the parent)."""
    parent = folder
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if os.path.exists(parent) and not os.path.isdir(parent):
        return f"{parent} is a file"
    reason = error.strerror or type(error).__name__
    where = os.path.abspath(os.fspath(error.filename)) if error.filename is not None else folder
    return reason if where == folder else f"{where}: {reason}"


def check_writable_dirs(folders: Mapping[str, Any]) -> None:
    """Create each folder (as ``os.makedirs`` does) and write a probe file in it, so that a read-only, unwritable or
    misplaced ``--output_dir``/``--ckpt_dir`` stops the command with one line before any work, not at the first
    checkpoint. ``folders`` maps each option's name to its folder."""
    for name, folder in folders.items():
        folder = os.path.abspath(os.fspath(folder))
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise BundleInputError(f"--{name} {folder} is a file, not a folder")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            raise BundleInputError(
                f"--{name} {folder}: cannot create the folder ({_creation_failure(error, folder)})"
            ) from error
        try:
            handle, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise BundleInputError(
                f"--{name} {folder} is not writable ({reason}); pass a folder you can write to"
            ) from error
        os.close(handle)
        os.remove(probe)
