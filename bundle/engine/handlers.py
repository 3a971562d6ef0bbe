"""Small Ignite handlers the MONAI handler set lacks: a quiet stats handler, a progress bar and a log file.

:class:`QuietStatsHandler` is MONAI's ``StatsHandler`` except for one thing: a run ended by a
:class:`~bundle.errors.BundleInputError` (an unreadable image, weights that do not fit) is not logged with its
traceback - MONAI's handler logs every exception with ``logger.exception`` before re-raising it - so the user sees
the bundle excepthook's single ``error: ...`` line. Every other exception is logged as MONAI does.
"""

from __future__ import annotations

import logging
import os

from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.handlers import StatsHandler

from bundle.errors import find_input_error

__all__ = ["LogFileHandler", "QuietStatsHandler", "TrainingProgressBar"]


class QuietStatsHandler(StatsHandler):
    """``monai.handlers.StatsHandler`` that re-raises a ``BundleInputError`` without logging a traceback."""

    def exception_raised(self, _engine: Engine, e: Exception) -> None:
        if find_input_error(e) is not None:
            raise e
        super().exception_raised(_engine, e)


class TrainingProgressBar:
    """An ignite ``ProgressBar`` over each epoch's iterations that shows the current total loss.

    MONAI attaches handlers with ``handler.attach(engine)`` only; this wrapper supplies the output transform.
    """

    def __init__(self, persist: bool = False, loss_key: str = "loss", **tqdm_kwargs) -> None:
        self.loss_key = loss_key
        self.bar = ProgressBar(persist=persist, **tqdm_kwargs)

    def attach(self, engine: Engine) -> None:
        def loss_only(output):
            if not isinstance(output, dict):
                return {}
            # the logged float where the trainer made one: float() of the tensor would wait for the optimizer step
            value = (output.get("loss_terms") or {}).get(self.loss_key, output.get(self.loss_key))
            return {} if value is None else {self.loss_key: float(value)}

        self.bar.attach(engine, output_transform=loss_only)


# MONAI's StatsHandler logs to its own logger, which does not propagate to the root logger
DEFAULT_LOGGERS = ("", "monai.handlers.StatsHandler")


class LogFileHandler:
    """Copies the log records of the given loggers (default: root and MONAI's StatsHandler) into ``path``."""

    def __init__(self, path: str, level: int | str = logging.INFO, loggers: list[str] | None = None) -> None:
        self.path = os.path.abspath(path)
        self.level = level
        self.loggers = list(loggers) if loggers else list(DEFAULT_LOGGERS)
        self._handler: logging.Handler | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._open)
        engine.add_event_handler(Events.COMPLETED, self._close)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._close_on_error)

    def _open(self, _engine: Engine) -> None:
        if self._handler is not None:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        handler = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        handler.setLevel(self.level)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for name in self.loggers:
            logging.getLogger(name).addHandler(handler)
        self._handler = handler

    def _close(self, _engine: Engine) -> None:
        if self._handler is None:
            return
        for name in self.loggers:
            logging.getLogger(name).removeHandler(self._handler)
        self._handler.close()
        self._handler = None

    def _close_on_error(self, engine: Engine, error: Exception) -> None:
        self._close(engine)
        raise error
