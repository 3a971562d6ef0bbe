"""Process memory and device timing helpers shared by the benchmark scripts (Linux ``/proc``; CUDA sync)."""

from __future__ import annotations

import resource

import torch

__all__ = ["peak_rss_mb", "reset_peak_rss", "rss_mb", "sync"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def rss_mb() -> float:
    """Resident memory now (Linux; elsewhere the peak so far)."""
    value = _proc_status_mb("VmRSS")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux ``VmHWM``: ``ru_maxrss`` would include the RSS the parent had
    when it started this child)."""
    value = _proc_status_mb("VmHWM")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Start the peak over from the current RSS (Linux), so that it belongs to what runs next, not to building."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass
