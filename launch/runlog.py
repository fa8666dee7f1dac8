"""The run log every launcher shares: `<run.output_dir>/metrics.jsonl`, the MLflow run, and one
console line per step.

Only the main process writes; every rank keeps the history (stop rules read it). A row is
``{"step": k, **metrics}``; step 0 holds the evaluation before training; rows of a stage before
training (VAPO's value pre-training) carry "stage" and "stage_step" and go to MLflow under the
stage's name on its own step axis.

On resume the rows past the checkpoint's step are dropped (they will be redone). A line torn by
a crash while it was written (the last one, not valid JSON) is dropped too, and said so.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

from core.config import flatten, to_yaml
from core.tracking import Tracker, TrackingConfig

logger = logging.getLogger("launch.runlog")

CONSOLE = [("reward/mean", "reward", ".3f"), ("eval/accuracy", "eval/acc", ".3f"), ("sft/nll", "nll", ".4f"),
           ("response_length/mean", "len", ".1f"), ("actor/pg_loss", "pg_loss", ".4f"),
           ("actor/entropy", "entropy", ".3f"), ("actor/grad_norm", "grad", ".3f"),
           ("critic/vf_loss", "vf_loss", ".4f"), ("critic/explained_variance", "ev", ".3f"),
           ("dynamic_sampling/rounds", "gen rounds", ".0f"), ("reshard/gbps", "sync GB/s", ".2f"),
           ("timing_s/step", "s/step", ".2f")]
"""(metric, label, format) of the console line, in order; absent metrics are left out."""


class RunLog:
    def __init__(self, output_dir: str | Path, *, is_main: bool, total_steps: int) -> None:
        self.out = Path(output_dir)
        self.is_main = is_main
        self.total_steps = total_steps
        self.history: list[dict[str, Any]] = []
        self.tracker: Tracker | None = None

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def start(self, cfg: Any, *, resume_step: int | None, files: Mapping[str, str] = {}) -> None:
        """Write the resolved config (and `files`, e.g. graph.mmd) to the output folder; start a
        fresh metrics.jsonl, or keep a resumed run's rows up to its checkpoint step."""
        if not self.is_main:
            return
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(to_yaml(cfg))
            for name, text in files.items():
                (self.out / name).write_text(text)
            if resume_step is None:
                self.metrics_path.write_text("")
            else:
                self._keep_rows_up_to(resume_step)
        except OSError as e:
            raise OSError(f"cannot write to run.output_dir {str(self.out)!r}: {e}") from e

    def open_tracker(self, tracking: TrackingConfig, cfg: Any, *, resume_run_id: str | None = None,
                     files: Mapping[str, str] = {}) -> Tracker:
        """The run's MLflow run (a no-op tracker off the main process or when disabled), with the
        flattened config as params and the config (and `files`) as artifacts."""
        self.tracker = Tracker(tracking, output_dir=self.out, is_main=self.is_main, resume_run_id=resume_run_id)
        self.tracker.log_params(flatten(cfg))
        self.tracker.log_text(to_yaml(cfg), "config.yaml")
        for name, text in files.items():
            self.tracker.log_text(text, name)
        return self.tracker

    def record(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        row = {"step": step, **metrics}
        self.history.append(row)
        if not self.is_main:
            return row
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tracker is not None:
            if "stage" in metrics:  # a stage's own step axis, under its name
                self.tracker.log_metrics({f"{metrics['stage']}/{k}": v for k, v in metrics.items()},
                                         int(metrics["stage_step"]))
            else:
                self.tracker.log_metrics(metrics, step)
        logger.info("%s", console_line(row, self.total_steps))
        return row

    def finish(self, status: str = "FINISHED") -> None:
        if self.tracker is not None:
            self.tracker.finish(status)

    def _keep_rows_up_to(self, step: int) -> None:
        rows = read_rows(self.metrics_path)
        self.history = [r for r in rows if r["step"] <= step]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in self.history))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a torn last line (a crash mid-write) is dropped and logged,
    a malformed line elsewhere is an error naming file and line."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for lineno, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno == len(lines):
                logger.warning("%s:%d: dropped a torn last line (%d characters; a crash while it was "
                               "written)", path, lineno, len(line))
                break
            raise ValueError(f"{path}:{lineno}: malformed metrics row ({e})") from None
    return rows


def console_line(row: Mapping[str, Any], total: int) -> str:
    parts = ([f"{row['stage']} {row['stage_step']}"] if "stage" in row else [f"step {row['step']}/{total}"])
    for key, label, fmt in CONSOLE:
        if key in row:
            parts.append(f"{label} {row[key]:{fmt}}")
    return " | ".join(parts)
