"""MLflow tracking for a training run: config params, per-step metrics, files, sample tables, tags.

Only the main process talks to MLflow; on other ranks, or with ``tracking.enabled=false``, the
``Tracker`` has the same API and does nothing, and mlflow is never imported (it lives behind
``core/mlflow_store.py``), so a minimal environment trains with tracking off. A tracking error
never stops training: the call logs a warning and returns, and after ``max_failures`` failed
calls in a row the tracker turns itself off for the rest of the run (a dead server would
otherwise stall every step: MLflow's HTTP client retries a request for about 4 minutes by
default). A store that cannot be opened at start is handled the same way: warning, tracking
off, training goes on.

Where things go
    store       ``tracking_uri``; else ``$MLFLOW_TRACKING_URI``; else the local default, a sqlite
                file ``<output_dir>/mlflow.db`` (never the current directory, unlike MLflow's
                own default ``sqlite:///mlflow.db``). Relative sqlite paths are made absolute.
    artifacts   the experiment's artifact location, set when this module creates the experiment:
                ``mlartifacts/`` next to a sqlite file (``<output_dir>/mlartifacts`` by default),
                the server's choice for an http(s) server, else ``<output_dir>/mlartifacts``. An
                existing experiment keeps its location. Each run stores files under
                ``<location>/<run_id>/artifacts/``.
    params      ``log_params(flatten(cfg))``: dotted keys, values as strings (lists and None as
                JSON), values over 6000 characters cut with a ``...[truncated: N chars]`` marker.
                Params are immutable in MLflow: on a resumed run an unchanged param is skipped and
                a changed one is recorded as the tag ``param_changed/<key>`` with a warning.
    metrics     ``log_metrics(dict, step)``: one ``log_batch`` per step (split at 1000 metrics).
                Values that are not real numbers (a stage name) are skipped; bools become 0/1;
                NaN is stored and read back as NaN; +-inf come back as +-1.797e308 (sqlite
                cannot store inf). Keys keep their namespaces (``actor/pg_loss``); characters
                MLflow rejects become ``_`` and keys over 250 characters are cut with a hash.
    files       ``log_text(text, "config.yaml")``, ``log_artifact(path)`` (a file or a folder).
    samples     ``log_samples(rows, step)`` writes ``samples/step_000010.json`` with MLflow's
                ``log_table`` (JSON ``{"columns": [...], "data": [[...], ...]}``, read back with
                ``MlflowClient.load_table``); the UI lists tables in the run's artifacts and in
                the experiment's evaluation view. Only the newest 100 tables are kept in the
                ``mlflow.loggedArtifacts`` tag that lists them (MLflow caps a tag at 8000
                characters and its ``log_table`` breaks on the cut JSON); older files remain.
    tags        ``set_tags({"checkpoint/latest": path})``; every run has ``output_dir``.
    status      ``finish("FINISHED" | "FAILED" | "KILLED")``, or use the tracker as a context
                manager: FINISHED, KILLED on KeyboardInterrupt, FAILED on another exception.

Resuming: pass the saved ``tracker.run_id`` as ``resume_run_id``; the run goes back to RUNNING
and later steps append to the same metric histories (steps logged twice keep both values). An
unknown or deleted run id starts a new run with a warning.

Typical use on every rank::

    with Tracker(cfg.tracking, output_dir=cfg.run.output_dir, is_main=dist.info().is_main,
                 resume_run_id=saved_run_id) as tracker:
        tracker.log_params(flatten(cfg))
        tracker.log_text(to_yaml(cfg), "config.yaml")
        for step in ...:
            tracker.log_metrics(metrics, step)
            if tracker.should_log_samples(step):
                tracker.log_samples(rows, step)

Open the UI (no network needed; it serves http://127.0.0.1:5000; the experiment's artifact
location is enough, no ``--default-artifact-root`` needed)::

    mlflow ui --backend-store-uri sqlite:///<absolute output_dir>/mlflow.db

e.g. ``mlflow ui --backend-store-uri sqlite:////work/main/runs/quickstart/mlflow.db`` (four
slashes before an absolute path). The tracker logs the exact command when it starts.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import numbers
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

from core.config import at_least

if TYPE_CHECKING:
    from core.mlflow_store import MlflowStore

logger = logging.getLogger(__name__)

T = TypeVar("T")

# MLflow's limits (mlflow.utils.validation).
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_KEY_LENGTH = 250
_MAX_PARAM_LENGTH = 6000
_MAX_TAG_LENGTH = 8000
_TABLES_TAG = "mlflow.loggedArtifacts"
_MAX_TABLES_IN_TAG = 100  # ~55 characters each, well under the 8000-character tag limit
_STATUSES = ("FINISHED", "FAILED", "KILLED")
_BAD_KEY_CHARS = re.compile(r"[^\w./\- :]")  # MLflow allows word characters and / . - space :


@dataclass(kw_only=True, slots=True)
class TrackingConfig:
    enabled: bool = True
    """Log to MLflow from the main process."""
    tracking_uri: str | None = None
    """None: $MLFLOW_TRACKING_URI if set, else a local store inside run.output_dir (sqlite file
    <output_dir>/mlflow.db, artifacts under <output_dir>/mlartifacts)."""
    experiment: str = "rolegraph"
    """MLflow experiment name; created if missing."""
    run_name: str | None = None
    """None: the output_dir's name."""
    samples_every: int = 10
    """Log a table of sample generations every N steps (0: never)."""
    samples_per_log: int = 8
    """Rows per sample table; longer inputs are cut."""
    max_failures: int = 3
    """Failed tracking calls in a row after which tracking turns off for the run (0: never)."""

    def __post_init__(self) -> None:
        at_least(self, 0, "samples_every", "max_failures")
        at_least(self, 1, "samples_per_log")


def resolve_tracking_uri(cfg: TrackingConfig, output_dir: str | Path) -> str:
    """The store URI: ``cfg.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the default."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or _default_uri(output_dir)
    return _absolute_sqlite(uri)


def valid_key(raw: str) -> str:
    """``raw`` as a key MLflow accepts: allowed characters, no empty or dot path parts, <= 250."""
    return _valid_key(str(raw))


def _guarded(method: Callable[..., None]) -> Callable[..., None]:
    """No-op when tracking is off; a failure becomes a warning (see ``Tracker._on_failure``)."""

    @functools.wraps(method)
    def call(self: Tracker, *args: Any, **kwargs: Any) -> None:
        if self._store is None:
            return
        try:
            method(self, *args, **kwargs)
        except Exception as e:  # a tracking outage must not kill training
            self._on_failure(method.__name__, e)
        else:
            self._failures = 0

    return call


class Tracker:
    """One MLflow run for one training run; a no-op unless enabled and ``is_main``."""

    def __init__(self, cfg: TrackingConfig, *, output_dir: str | Path, is_main: bool,
                 resume_run_id: str | None = None) -> None:
        self.cfg = cfg
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        self._store: MlflowStore | None = None
        self._failures = 0
        if cfg.enabled and is_main:
            self._open(Path(output_dir).resolve(), resume_run_id)

    @property
    def _live(self) -> MlflowStore:
        """The open store, inside a method that `_guarded` runs only when there is one."""
        assert self._store is not None
        return self._store

    @property
    def active(self) -> bool:
        """Whether calls reach MLflow (False on other ranks, when disabled, after an outage)."""
        return self._store is not None

    def should_log_samples(self, step: int) -> bool:
        """True when active and ``step`` is a multiple of ``samples_every`` (0 included)."""
        every = self.cfg.samples_every
        return self.active and every > 0 and step % every == 0

    @_guarded
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a flat mapping (``flatten(cfg)``) as params, skipping ones already logged."""
        logged = self._live.params()  # not empty on a resumed run
        new = {valid_key(k): _clip(_param_value(v), _MAX_PARAM_LENGTH) for k, v in params.items()}
        changed = {k: v for k, v in new.items() if k in logged and logged[k] != v}
        if changed:
            logger.warning("MLflow params cannot change; new values of %s kept as tags "
                           "param_changed/<key>", sorted(changed))
            self.set_tags({f"param_changed/{k}": v for k, v in changed.items()})
        fresh = [(k, v) for k, v in new.items() if k not in logged]
        for chunk in _chunks(fresh, _MAX_PARAMS_TAGS_PER_BATCH):
            self._live.log_params(dict(chunk))

    @_guarded
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log one step's real-valued metrics in one batch; other values are skipped."""
        now_ms = int(time.time() * 1000)
        batch = [(valid_key(k), float(v)) for k, v in metrics.items() if isinstance(v, numbers.Real)]
        for chunk in _chunks(batch, _MAX_METRICS_PER_BATCH):
            self._live.log_metrics(chunk, step=int(step), timestamp_ms=now_ms)

    @_guarded
    def log_text(self, text: str, artifact_file: str) -> None:
        """Store ``text`` as the artifact ``artifact_file`` (e.g. "config.yaml", "graph.mmd")."""
        self._live.log_text(text, artifact_file)

    @_guarded
    def log_samples(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """Store up to ``samples_per_log`` rows as the table ``samples/step_NNNNNN.json``."""
        rows = rows[: self.cfg.samples_per_log]
        if not rows:
            return
        self._trim_tables_tag()
        self._live.log_table(_columns(rows), f"samples/step_{step:06d}.json")

    @_guarded
    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file, or a folder's contents, into the artifacts (under ``artifact_path``)."""
        self._live.log_artifact(Path(local_path), artifact_path)

    @_guarded
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (mutable, unlike params), e.g. ``{"checkpoint/latest": path}``."""
        batch = [(valid_key(k), _clip(str(v), _MAX_TAG_LENGTH)) for k, v in tags.items()]
        for chunk in _chunks(batch, _MAX_PARAMS_TAGS_PER_BATCH):
            self._live.set_tags(dict(chunk))

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with ``status``; later calls do nothing."""
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}, got {status!r}")
        self._terminate(status)
        self._store = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: Any) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    @_guarded
    def _terminate(self, status: str) -> None:
        self._live.terminate(status)

    def _open(self, output_dir: Path, resume_run_id: str | None) -> None:
        try:
            self.tracking_uri = resolve_tracking_uri(self.cfg, output_dir)
            self._store = _open_store(self.cfg, self.tracking_uri, output_dir, resume_run_id)
            self.run_id = self._live.run_id
        except Exception as e:  # no store, no tracking; training goes on
            logger.warning("MLflow tracking off: cannot open a run in %s: %s: %s",
                           self.tracking_uri, type(e).__name__, _short(e))
            self._store, self.run_id = None, None
            return
        logger.info("MLflow run %s; UI: mlflow ui --backend-store-uri %s",
                    self.run_id, self.tracking_uri)

    def _on_failure(self, what: str, err: Exception) -> None:
        self._failures += 1
        logger.warning("MLflow %s failed (%d in a row): %s: %s", what.lstrip("_"),
                       self._failures, type(err).__name__, _short(err))
        if self.cfg.max_failures and self._failures >= self.cfg.max_failures:
            logger.warning("MLflow tracking off for the rest of this run after %d failed calls",
                           self._failures)
            self._store = None

    def _trim_tables_tag(self) -> None:
        """Keep the tag listing this run's tables short enough for ``log_table`` to parse it."""
        raw = self._live.tag(_TABLES_TAG, "[]")
        try:
            tables = json.loads(raw)
        except json.JSONDecodeError:  # already cut by MLflow at 8000 characters
            self._live.set_tag(_TABLES_TAG, "[]")
            return
        if len(tables) >= _MAX_TABLES_IN_TAG:
            keep = tables[-(_MAX_TABLES_IN_TAG - 1):]
            self._live.set_tag(_TABLES_TAG, json.dumps(keep))


def _open_store(cfg: TrackingConfig, uri: str, output_dir: Path, resume_run_id: str | None) -> MlflowStore:
    own = uri == _default_uri(output_dir)
    if own:
        output_dir.mkdir(parents=True, exist_ok=True)
    # Imported here, not at the top: mlflow is needed only when tracking is on, and a minimal
    # environment (tracking.enabled=false) must train without it installed.
    store = importlib.import_module("core.mlflow_store")
    return store.MlflowStore(uri, experiment=cfg.experiment, run_name=cfg.run_name or output_dir.name,
                             artifact_location=_artifact_location(uri, output_dir),
                             tags={"output_dir": str(output_dir)}, resume_run_id=resume_run_id, own_store=own)


def _default_uri(output_dir: str | Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for other stores and in-memory sqlite."""
    if urlparse(uri).scheme != "sqlite":
        return None
    path = uri.removeprefix("sqlite://").removeprefix("/").split("?")[0]
    return None if path in ("", ":memory:") else Path(path)


def _absolute_sqlite(uri: str) -> str:
    path = _sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    query = uri.partition("?")[1] + uri.partition("?")[2]
    return f"sqlite:///{path.resolve()}{query}"


def _artifact_location(uri: str, output_dir: Path) -> str | None:
    """Where a new experiment keeps artifacts: next to a sqlite file, a server's choice, else
    ``output_dir`` (MLflow's own fallback would be ./mlruns in the current directory)."""
    path = _sqlite_path(uri)
    if path is not None:
        return str(path.parent / "mlartifacts")
    if urlparse(uri).scheme in ("http", "https", "databricks"):
        return None
    return str(output_dir / "mlartifacts")


@functools.lru_cache(maxsize=4096)  # metric keys repeat every step
def _valid_key(raw: str) -> str:
    key = _BAD_KEY_CHARS.sub("_", raw)
    key = "/".join(p if p not in ("", ".", "..") else "_" for p in key.split("/"))
    if len(key) > _MAX_KEY_LENGTH:
        digest = hashlib.sha1(raw.encode()).hexdigest()[:8]
        key = f"{key[: _MAX_KEY_LENGTH - 9]}-{digest}"
    return key


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (bool, list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending with a marker when cut."""
    if len(text) <= limit:
        return text
    marker = f"...[truncated: {len(text)} chars]"
    return text[: limit - len(marker)] + marker


def _columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Rows as columns (the union of keys, in first-seen order; None where a row lacks one)."""
    names = list(dict.fromkeys(k for row in rows for k in row))
    return {name: [_cell(row.get(name)) for row in rows] for name in names}


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, numbers.Real):
        return float(value)
    return str(value)


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _short(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."
