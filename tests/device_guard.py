"""A CPU stand-in for CUDA's device checks: every tensor the bundle's own per-iteration code creates must name its
device.

On a GPU the default device of ``torch.tensor``, ``torch.zeros``, ``torch.arange`` ... is the CPU, so such a call
without ``device=`` inside the loss or the trainer makes a host tensor that meets CUDA tensors a few lines later
(``torch.stack`` refuses, indexing and ``torch.where`` too). On a CPU-only machine every tensor is on the CPU and
nothing fails, so :class:`DeviceGuard` records the calls themselves: a factory function called from the bundle's
training-time code (losses, engine with CutMix, networks, text encoders) without a ``device`` argument. ``*_like`` and
``Tensor.new_*`` calls inherit their device and are not factories here; data loading (readers, transforms) runs on the
CPU by design and is not checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
LOSS_AND_ENGINE = (str(BUNDLE / "losses"), str(BUNDLE / "engine"))
CHECKED = (*LOSS_AND_ENGINE, str(BUNDLE / "networks"), str(BUNDLE / "text"))
CUTMIX = str(BUNDLE / "engine" / "cutmix.py")  # draws its boxes on the CPU by design
FACTORIES = {
    torch.tensor,
    torch.as_tensor,
    torch.scalar_tensor,
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.linspace,
    torch.logspace,
    torch.eye,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
}


class DeviceGuard(TorchFunctionMode):
    """Records ``file:line factory`` for every factory call from checked bundle code that leaves the device to the
    default; ``violations`` lists them in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.violations: list[str] = []
        self.checked_calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES:
            keeps_device = func is torch.as_tensor and args and isinstance(args[0], torch.Tensor)
            caller = sys._getframe(1)  # factories are C functions: this is the line that called one
            where = caller.f_code.co_filename
            if where.startswith(CHECKED):
                self.checked_calls += 1
                if kwargs.get("device") is None and not keeps_device:
                    self.violations.append(
                        f"{Path(where).relative_to(BUNDLE.parent)}:{caller.f_lineno} {func.__name__}"
                    )
        return func(*args, **kwargs)


SYNCS = {
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.masked_select,
    torch.Tensor.masked_select,
}


class SyncRecorder(TorchFunctionMode):
    """Records ``file:function operation`` for every operation in the loss and engine code that reads tensor data
    back to the host (on a GPU: waits for the device): ``bool()``, ``int()``, ``.item()``, ``.tolist()``,
    ``nonzero`` and indexing with a boolean mask. CutMix draws its boxes on the CPU and is left out."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = sys._getframe(1)
        where = caller.f_code.co_filename
        if where.startswith(LOSS_AND_ENGINE) and where != CUTMIX:
            boolean_index = func is torch.Tensor.__getitem__ and any(
                isinstance(index, torch.Tensor) and index.dtype == torch.bool
                for index in (args[1] if isinstance(args[1], tuple) else (args[1],))
            )
            if func in SYNCS or boolean_index:
                name = "boolean index" if boolean_index else func.__name__
                self.sites.append(f"{Path(where).relative_to(BUNDLE.parent)}:{caller.f_code.co_name} {name}")
        return func(*args, **kwargs)
