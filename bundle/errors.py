"""User-facing errors of the bundle and the hook that prints them as one clear line instead of a stack trace.

The hook is installed where the commands start, not on import: the configs' ``initialize`` (``python -m monai.bundle
run``) calls :func:`install_excepthook`; ``python -m bundle.prepare`` and ``python -m bundle.package`` catch their
errors themselves.

MONAI's config machinery wraps every exception raised while a component is built (``RuntimeError: Failed to
instantiate ...``). When such a chain contains a :class:`BundleInputError` - bad data, a missing file, a wrong
option - the hook prints only that error's message and exits with status 1. Every other exception keeps the
normal traceback.
"""

from __future__ import annotations

import sys
from types import TracebackType

__all__ = ["BundleInputError", "find_input_error", "install_excepthook"]


class BundleInputError(ValueError):
    """Something the user gave (a file, a folder, a datalist, an option) cannot be used; the message says what."""


def find_input_error(exc: BaseException | None) -> BundleInputError | None:
    """Return the first :class:`BundleInputError` in ``exc``'s cause/context chain, if any.

    An error raised in a ``DataLoader`` worker reaches the main process only as the text of the worker's
    traceback; a ``BundleInputError: <message>`` line in that text is recognised too.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, BundleInputError):
            return exc
        for line in str(exc).splitlines():
            _, marker, message = line.partition(f"{BundleInputError.__name__}: ")
            if marker and message.strip():
                return BundleInputError(message.strip())
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    error = find_input_error(exc)
    if error is None:
        _previous_hook(exc_type, exc, tb)
        return
    _close_progress_bars()  # so that the error starts its own line, not the end of a bar's
    # the interpreter exits with status 1 after an uncaught exception; only the message is printed
    sys.stderr.write(f"error: {error}\n")
    sys.stderr.flush()


def _close_progress_bars() -> None:
    """Close the tqdm bars still open (ignite's progress bar of an interrupted run); nothing if tqdm is not loaded."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        try:
            bar.close()
        except Exception:  # a bar that cannot be closed must not hide the error
            pass


_previous_hook = sys.excepthook


def install_excepthook() -> None:
    """Print :class:`BundleInputError` chains as one line (idempotent; other exceptions are untouched)."""
    global _previous_hook
    if sys.excepthook is not _excepthook:
        _previous_hook = sys.excepthook
        sys.excepthook = _excepthook
