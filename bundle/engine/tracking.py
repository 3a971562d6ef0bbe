"""Fits the MLflow handlers that ``python -m monai.bundle run ... --tracking mlflow`` adds to this bundle's engines.

MONAI's default trainer handler logs ``from_engine(['loss'], first=True)(engine.state.output)``, which expects a
decollated list of dicts; this trainer's output is one dict, so the default yields a tuple that MLflow cannot log
(``float() argument must be ... not 'tuple'``). :func:`fit_tracking` wraps a handler list: without MLflow handlers
(tracking off) it returns the list unchanged; with them it logs every loss term, the run's parameters and the best
model, and picks the run (a new one, or on resume the run recorded in ``run_file``) before the handlers start.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ignite.engine import Engine, Events

from bundle.options import command_line_overrides

__all__ = ["fit_tracking", "tracking_params"]

logger = logging.getLogger(__name__)


def _is_mlflow(handler: Any) -> bool:
    # by name: importing monai.handlers.MLFlowHandler would import mlflow, an optional extra
    return type(handler).__name__ == "MLFlowHandler" and hasattr(handler, "client")


def _loss_terms_or(transform: Callable) -> Callable:
    """``transform``, except where it gives a tuple or list (MONAI's default here): the trainer's ``loss_terms``."""

    def loggable(output: Any) -> Any:
        value = transform(output)
        if isinstance(value, (tuple, list)) and isinstance(output, Mapping) and "loss_terms" in output:
            return dict(output["loss_terms"])
        return value

    return loggable


def tracking_params(values: Mapping[str, Any], argv: Sequence[str] | None = None) -> dict[str, str]:
    """The run parameters: ``values`` as strings, plus ``config_file`` (the presets merged) from the command line."""
    params = {str(key): str(value) for key, value in values.items()}
    found = command_line_overrides(sys.argv if argv is None else argv)
    if found is not None and found[1] is not None:
        files = found[1]
        try:
            import ast

            files = ast.literal_eval(files)
        except (ValueError, SyntaxError):
            pass
        names = files if isinstance(files, (list, tuple)) else [files]
        params["config_file"] = ",".join(os.path.basename(str(name)) for name in names)
    return params


class _RunPicker:
    """Chooses the MLflow run before the MLflow handlers start: a new run, or on resume the recorded one."""

    def __init__(self, trackers: list, linked: list, run_file: str | None, resume: bool) -> None:
        self.trackers, self.linked = trackers, linked
        self.run_file = run_file
        self.resume = resume

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)

    def _recorded_run(self, client, experiment_id: str):
        if not self.resume or not self.run_file or not os.path.isfile(self.run_file):
            return None
        with open(self.run_file, encoding="utf-8") as f:
            run_id = f.read().strip()
        try:
            run = client.get_run(run_id)
        except Exception:  # noqa: BLE001 - a run of another tracking store or a deleted run
            run = None
        if run is None or run.info.experiment_id != experiment_id or run.info.lifecycle_stage != "active":
            logger.warning(f"mlflow: the recorded run {run_id} is not in this experiment; starting a new run")
            return None
        return run

    def start(self, _engine: Engine) -> None:
        main = self.trackers[0]
        if main.cur_run is not None:
            return
        client = main.client
        experiment = client.get_experiment_by_name(main.experiment_name)
        if experiment is None:
            experiment = client.get_experiment(
                client.create_experiment(main.experiment_name, artifact_location=main.artifact_location)
            )
        run = self._recorded_run(client, experiment.experiment_id)
        if run is not None:
            client.update_run(run.info.run_id, status="RUNNING")
            run = client.get_run(run.info.run_id)
            logger.info(f"mlflow: resuming run {run.info.run_id} ({run.info.run_name})")
            for tracker in self.trackers:  # MLflow refuses a parameter logged again with another value
                changed = {k for k, v in (tracker.experiment_param or {}).items() if run.data.params.get(k, v) != v}
                if changed:
                    logger.warning(f"mlflow: resumed run keeps its first values of {', '.join(sorted(changed))}")
                tracker.experiment_param = {
                    k: v for k, v in (tracker.experiment_param or {}).items() if k not in run.data.params
                }
        else:
            if self.resume:
                logger.info("mlflow: no recorded run to resume; starting a new run")
            name = main.run_name or f"run_{time.strftime('%Y%m%d_%H%M%S')}"
            run = client.create_run(experiment_id=experiment.experiment_id, run_name=name)
            logger.info(f"mlflow: run {run.info.run_id} ({name}) in experiment {main.experiment_name!r}")
        if self.run_file:
            os.makedirs(os.path.dirname(os.path.abspath(self.run_file)), exist_ok=True)
            with open(self.run_file, "w", encoding="utf-8") as f:
                f.write(run.info.run_id + "\n")
        for tracker in self.trackers + self.linked:
            tracker.cur_run = run


class _MetricsLogger:
    """Logs the numbers of ``source.metrics`` (a report's summary) into the tracker's run when the engine completes."""

    def __init__(self, tracker: Any, source: Any, prefix: str = "test_") -> None:
        self.tracker, self.source, self.prefix = tracker, source, prefix

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self.log)

    def log(self, _engine: Engine) -> None:
        if self.tracker.cur_run is None or not isinstance(getattr(self.source, "metrics", None), Mapping):
            return
        flat: dict[str, float] = {}

        def walk(value: Any, name: str) -> None:
            if isinstance(value, Mapping):
                for key, item in value.items():
                    walk(item, f"{name}_{key}" if name else str(key))
            elif isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
                flat[self.prefix + name] = float(value)

        walk(self.source.metrics, "")
        if flat:
            self.tracker._log_metrics(flat, step=0)


def fit_tracking(
    handlers: Sequence,
    params: Mapping[str, Any] | None = None,
    artifacts: Sequence[str] = (),
    linked: Sequence = (),
    run_file: str | None = None,
    resume: bool = False,
    metrics_from: Any = None,
) -> list:
    """``handlers`` with their MLflow handlers fitted to this bundle (unchanged when tracking is off).

    Args:
        handlers: an engine's handlers, where ``--tracking mlflow`` appended its ``MLFlowHandler``.
        params: run parameters, logged once (user-set ``experiment_param`` values win).
        artifacts: files logged when the engine completes (the best model), if they exist then.
        linked: another engine's handlers (the validator's) whose MLflow handlers log into the same run.
        run_file: where the run id is kept, so that ``--resume true`` continues the run.
        resume: continue the run recorded in ``run_file`` (a new run where there is none).
        metrics_from: an object with a ``metrics`` mapping (``SegmentationReport``) logged when the engine completes.
    """
    handlers = list(handlers)
    trackers = [h for h in handlers if _is_mlflow(h)]
    if not trackers:
        return handlers
    for tracker in trackers:
        tracker.output_transform = _loss_terms_or(tracker.output_transform)
        tracker.experiment_param = {**(params or {}), **(tracker.experiment_param or {})}
        tracker.artifacts = tuple(a for a in tracker.artifacts if a) + tuple(str(a) for a in artifacts)
    picker = _RunPicker(trackers, [h for h in linked if _is_mlflow(h)], run_file, bool(resume))
    fitted = [picker] + handlers
    if metrics_from is not None:
        # before the tracker's COMPLETED handlers (artifacts, close): inserted ahead of the first tracker
        index = fitted.index(trackers[0])
        fitted.insert(index, _MetricsLogger(trackers[0], metrics_from))
    return fitted
