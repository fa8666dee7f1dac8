"""The MLflow side of tracking: one run in one store, reached through ``MlflowClient``.

`core.tracking.Tracker` imports this module only when tracking is enabled on the main process,
so a job with ``tracking.enabled=false`` never imports mlflow (a minimal environment, such as a
lent GPU machine without it, can train). Values arrive here already valid for MLflow (keys,
lengths, batch sizes are the Tracker's business).
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

logger = logging.getLogger("core.tracking")
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
"""A new store's "Creating initial MLflow database tables..." lines are MLflow's business, not
the run's console (warnings and errors still show)."""


@contextmanager
def _logging_kept() -> Iterator[None]:
    """MLflow 2.x migrates a new database through alembic, whose logging.config.fileConfig
    replaces the root handlers and disables every existing logger (the run's console went
    silent): put the root logger and the loggers that were enabled back as they were."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    alive = [lg for lg in logging.root.manager.loggerDict.values()
             if isinstance(lg, logging.Logger) and not lg.disabled]
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for lg in alive:
            lg.disabled = False
        logging.getLogger("alembic").setLevel(logging.WARNING)


class MlflowStore:
    """An open MLflow run: a new one, or ``resume_run_id`` set back to RUNNING."""

    def __init__(self, uri: str, *, experiment: str, run_name: str, artifact_location: str | None,
                 tags: Mapping[str, str], resume_run_id: str | None, own_store: bool = False) -> None:
        with _logging_kept():
            self._open(uri, own_store)
        if resume_run_id is not None and self._resume(resume_run_id):
            self.run_id = resume_run_id
            return
        experiment_id = self._experiment_id(experiment, artifact_location)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=dict(tags)).info.run_id

    def _open(self, uri: str, own_store: bool) -> None:
        if own_store:
            # MLflow 2.x creates its default artifact root, "./mlruns", in the working directory
            # when it first opens a database store (3.x does not); the run's own store keeps its
            # artifacts in the run's folder, so let that "." be a scratch folder, removed after
            here = os.getcwd()
            with tempfile.TemporaryDirectory(prefix="rolegraph-mlflow-") as scratch:
                os.chdir(scratch)
                try:
                    self.client = MlflowClient(tracking_uri=uri)
                finally:
                    os.chdir(here)
        else:  # a store the user chose: MLflow's own defaults
            self.client = MlflowClient(tracking_uri=uri)

    def params(self) -> dict[str, str]:
        return self.client.get_run(self.run_id).data.params

    def tag(self, name: str, default: str) -> str:
        return self.client.get_run(self.run_id).data.tags.get(name, default)

    def log_params(self, params: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()],
                              synchronous=True)

    def log_metrics(self, metrics: Sequence[tuple[str, float]], *, step: int, timestamp_ms: int) -> None:
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, timestamp_ms, step) for k, v in metrics],
                              synchronous=True)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)

    def set_tag(self, name: str, value: str) -> None:
        self.client.set_tag(self.run_id, name, value)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, data: Mapping[str, list[Any]], artifact_file: str) -> None:
        self.client.log_table(self.run_id, data=dict(data), artifact_file=artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def terminate(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)

    def _resume(self, run_id: str) -> bool:
        """Set the run back to RUNNING; False (with a warning) if it is missing or deleted."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            logger.warning("cannot resume MLflow run %s (%s); starting a new run", run_id,
                           str(e).strip().replace("\n", " ")[:300])
            return False
        if run.info.lifecycle_stage != "active":
            logger.warning("MLflow run %s is %s; starting a new run", run_id, run.info.lifecycle_stage)
            return False
        self.client.update_run(run_id, status="RUNNING")
        logger.info("resuming MLflow run %s", run_id)
        return True

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(name, artifact_location=artifact_location)
            except MlflowException:  # created by a concurrent run in between
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage != "active":
            logger.warning("restoring deleted MLflow experiment %r", name)
            self.client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
