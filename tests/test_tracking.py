"""core.tracking against a real MLflow sqlite store in tmp_path, read back with MlflowClient.

Creating a sqlite store runs MLflow's migrations (seconds), so one module-scoped run is logged
once (inside an empty current directory, to catch litter) and read by several tests; tests that
need a second store copy the migrated database file.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from core.config import flatten
from core.tracking import Tracker, TrackingConfig, resolve_tracking_uri, valid_key

STEPS = 5
LONG = "x" * 7000


@dataclass(kw_only=True, slots=True)
class _Actor:
    lr: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass(kw_only=True, slots=True)
class _Cfg:
    actor: _Actor = field(default_factory=_Actor)
    model: dict = field(default_factory=lambda: {"path": None, "extra": {"note": LONG}})
    sweep: dict = field(default_factory=lambda: {f"p{i:03d}": i for i in range(150)})
    tags: list[str] = field(default_factory=lambda: ["a", "b"])


def step_metrics(step: int) -> dict:
    """~60 namespaced floats plus values the tracker must skip or keep (a string, a NaN)."""
    m = {f"actor/m{i:02d}": step * 0.5 + i for i in range(56)}
    m |= {"actor/pg_loss": 1.0 / step, "timing_s/generate": 0.25 * step,
          "reward/mean": step / 10, "reshard/gbps": 12.5, "stage": "warmup",
          "eval/accuracy": math.nan if step == 3 else step / 100}
    return m


def sample_rows(step: int, n: int = 10) -> list[dict]:
    return [{"prompt": f"q{step}-{i}", "response": f"a{i}", "reward": float(i % 2), "step": step}
            for i in range(n)]


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def db_uri(output_dir: Path) -> str:
    return f"sqlite:///{output_dir / 'mlflow.db'}"


@dataclass
class Logged:
    run_id: str
    out: Path
    cwd: Path
    cwd_after: list[str]
    params: dict
    client: MlflowClient


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> Logged:
    """A 5-step run logged from inside an empty current directory."""
    root = tmp_path_factory.mktemp("tracking")
    cwd, out = root / "cwd", root / "runs" / "run1"
    cwd.mkdir()
    (root / "notes.txt").write_text("checkpoint notes\n")
    cfg = TrackingConfig(samples_every=2, samples_per_log=8)
    params = flatten(_Cfg())
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        tracker = Tracker(cfg, output_dir=out, is_main=True)
        tracker.log_params(params)
        tracker.log_text("actor:\n  lr: 1.0e-06\n", "config.yaml")
        tracker.log_text("graph LR\n  a --> b\n", "graph.mmd")
        for step in range(1, STEPS + 1):
            tracker.log_metrics(step_metrics(step), step)
            if tracker.should_log_samples(step):
                tracker.log_samples(sample_rows(step), step)
        tracker.log_artifact(root / "notes.txt")
        tracker.set_tags({"checkpoint/latest": str(out / "checkpoints" / "step_000005")})
        tracker.finish()
        cwd_after = sorted(os.listdir(cwd))
    return Logged(tracker.run_id, out, cwd, cwd_after, params, MlflowClient(db_uri(out)))


def test_nothing_written_to_cwd(logged):
    assert logged.cwd_after == []
    assert os.listdir(logged.cwd) == []
    assert sorted(os.listdir(logged.out)) == ["mlartifacts", "mlflow.db"]


def test_params_flattened_and_limited(logged):
    params = logged.client.get_run(logged.run_id).data.params
    assert len(params) == len(logged.params) == 155  # more than one batch of 100
    assert params["actor.lr"] == "1e-06"
    assert params["actor.betas"] == "[0.9, 0.95]"
    assert params["model.path"] == "null"
    assert params["tags"] == '["a", "b"]'
    assert params["sweep.p149"] == "149"
    note = params["model.extra.note"]
    assert len(note) == 6000 and note.endswith("...[truncated: 7000 chars]")
    assert note.startswith("x" * 5000)


def test_every_step_metrics(logged):
    c, rid = logged.client, logged.run_id
    steps = range(1, STEPS + 1)
    assert history(c, rid, "actor/pg_loss") == [(s, 1.0 / s) for s in steps]
    assert history(c, rid, "timing_s/generate") == [(s, 0.25 * s) for s in steps]
    assert history(c, rid, "reward/mean") == [(s, s / 10) for s in steps]
    assert history(c, rid, "actor/m55") == [(s, s * 0.5 + 55) for s in steps]
    acc = history(c, rid, "eval/accuracy")
    assert [s for s, _ in acc] == list(steps)
    assert math.isnan(acc[2][1]) and acc[3] == (4, 0.04)  # NaN stays visible
    metrics = c.get_run(rid).data.metrics
    assert len(metrics) == 61 and "stage" not in metrics


def test_artifacts(logged, tmp_path):
    c, rid = logged.client, logged.run_id
    assert {a.path for a in c.list_artifacts(rid)} == {"config.yaml", "graph.mmd", "notes.txt",
                                                       "samples"}
    assert [a.path for a in c.list_artifacts(rid, "samples")] == [
        "samples/step_000002.json", "samples/step_000004.json"]
    assert Path(c.download_artifacts(rid, "config.yaml", str(tmp_path))).read_text() == (
        "actor:\n  lr: 1.0e-06\n")
    assert Path(c.download_artifacts(rid, "graph.mmd", str(tmp_path))).read_text() == (
        "graph LR\n  a --> b\n")
    table = json.loads(Path(c.download_artifacts(rid, "samples/step_000004.json",
                                                 str(tmp_path))).read_text())
    assert table["columns"] == ["prompt", "response", "reward", "step"]
    assert table["data"] == [list(r.values()) for r in sample_rows(4)[:8]]
    run = c.get_run(rid)
    assert run.info.artifact_uri.startswith(str(logged.out / "mlartifacts"))
    assert (logged.out / "mlartifacts" / rid / "artifacts" / "graph.mmd").is_file()
    assert json.loads(run.data.tags["mlflow.loggedArtifacts"]) == [
        {"path": "samples/step_000002.json", "type": "table"},
        {"path": "samples/step_000004.json", "type": "table"}]


def test_tags_status_and_names(logged):
    run = logged.client.get_run(logged.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "run1"
    assert run.data.tags["checkpoint/latest"] == str(logged.out / "checkpoints" / "step_000005")
    assert run.data.tags["output_dir"] == str(logged.out)
    experiment = logged.client.get_experiment(run.info.experiment_id)
    assert experiment.name == "rolegraph"
    assert experiment.artifact_location == str(logged.out / "mlartifacts")


def test_resume_appends_to_the_same_run(logged, caplog):
    cfg = TrackingConfig(run_name="resumable")
    first = Tracker(cfg, output_dir=logged.out, is_main=True)
    first.log_params({"actor.lr": 1e-6, "run.steps": 5})
    for step in range(1, 6):
        first.log_metrics({"actor/pg_loss": float(step)}, step)
    first.finish("KILLED")
    assert first.run_id != logged.run_id  # a second run in the same store and experiment

    second = Tracker(cfg, output_dir=logged.out, is_main=True, resume_run_id=first.run_id)
    assert second.run_id == first.run_id
    assert logged.client.get_run(first.run_id).info.status == "RUNNING"
    with caplog.at_level(logging.WARNING, logger="core.tracking"):
        second.log_params({"actor.lr": 1e-6, "run.steps": 7})
    assert "run.steps" in caplog.text
    for step in (6, 7):
        second.log_metrics({"actor/pg_loss": float(step)}, step)
    second.finish()
    run = logged.client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"actor.lr": "1e-06", "run.steps": "5"}
    assert run.data.tags["param_changed/run.steps"] == "7"
    assert history(logged.client, first.run_id, "actor/pg_loss") == [
        (s, float(s)) for s in range(1, 8)]


def test_resume_of_unknown_run_starts_a_new_one(logged, caplog):
    with caplog.at_level(logging.WARNING, logger="core.tracking"):
        tracker = Tracker(TrackingConfig(), output_dir=logged.out, is_main=True,
                          resume_run_id="0" * 32)
    assert tracker.run_id not in (None, "0" * 32)
    assert "starting a new run" in caplog.text
    tracker.finish()


def test_env_var_selects_the_store(logged, tmp_path, monkeypatch):
    env_db = tmp_path / "shared" / "mlflow.db"
    env_db.parent.mkdir()
    shutil.copy(logged.out / "mlflow.db", env_db)  # already migrated: saves seconds
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{env_db}")
    out = tmp_path / "run2"
    cfg = TrackingConfig(experiment="from-env")
    assert resolve_tracking_uri(cfg, out) == f"sqlite:///{env_db}"
    tracker = Tracker(cfg, output_dir=out, is_main=True)
    tracker.log_metrics({"reward/mean": 0.5}, 1)
    tracker.log_text("x: 1\n", "config.yaml")
    tracker.finish()
    env_client = MlflowClient(f"sqlite:///{env_db}")
    assert history(env_client, tracker.run_id, "reward/mean") == [(1, 0.5)]
    assert (tmp_path / "shared" / "mlartifacts" / tracker.run_id / "artifacts" / "config.yaml"
            ).read_text() == "x: 1\n"
    assert not out.exists()  # nothing in output_dir: the store lives elsewhere
    assert logged.client.get_experiment_by_name("from-env") is None
    explicit = TrackingConfig(tracking_uri=db_uri(logged.out))
    assert resolve_tracking_uri(explicit, out) == db_uri(logged.out)  # config beats env var


def test_relative_sqlite_uri_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrackingConfig(tracking_uri="sqlite:///store/mlflow.db")
    assert resolve_tracking_uri(cfg, "out") == f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(TrackingConfig(), "out") == (
        f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")


@pytest.mark.parametrize("is_main,enabled", [(False, True), (True, False)])
def test_noop_tracker_does_nothing(tmp_path, monkeypatch, is_main, enabled):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    tracker = Tracker(TrackingConfig(enabled=enabled), output_dir=out, is_main=is_main)
    assert tracker.run_id is None and not tracker.active
    assert not tracker.should_log_samples(10)
    tracker.log_params({"a": 1})
    tracker.log_metrics({"a/b": 1.0}, 1)
    tracker.log_text("x", "config.yaml")
    tracker.log_samples(sample_rows(1), 10)
    tracker.log_artifact(tmp_path / "missing.txt")
    tracker.set_tags({"k": "v"})
    tracker.finish("FAILED")
    assert os.listdir(tmp_path) == []


def test_unusable_store_warns_and_disables(tmp_path, caplog):
    (tmp_path / "a_file").write_text("")
    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}")
    with caplog.at_level(logging.WARNING, logger="core.tracking"):
        tracker = Tracker(cfg, output_dir=tmp_path / "run", is_main=True)
    assert tracker.run_id is None and not tracker.active
    assert "MLflow tracking off" in caplog.text
    tracker.log_metrics({"reward/mean": 1.0}, 1)  # does not raise
    tracker.finish()


def test_failures_during_the_run_warn_then_disable(logged, caplog):
    tracker = Tracker(TrackingConfig(max_failures=2), output_dir=logged.out, is_main=True)
    tracker.log_metrics({"reward/mean": 1.0}, 1)
    logged.client.delete_run(tracker.run_id)  # e.g. deleted in the UI while training
    with caplog.at_level(logging.WARNING, logger="core.tracking"):
        tracker.log_metrics({"reward/mean": 2.0}, 2)
        assert tracker.active and "log_metrics failed (1 in a row)" in caplog.text
        tracker.set_tags({"checkpoint/latest": "/x"})  # (artifact writes do not check the run)
        assert not tracker.active and "tracking off for the rest" in caplog.text
        tracker.log_metrics({"reward/mean": 3.0}, 3)
        tracker.finish()
    assert caplog.text.count("failed (") == 2


def test_finish_rejects_an_unknown_status(logged):
    tracker = Tracker(TrackingConfig(enabled=False), output_dir=logged.out, is_main=True)
    with pytest.raises(ValueError, match="FINISHED"):
        tracker.finish("DONE")


def test_context_manager_marks_a_crash_failed(logged):
    with pytest.raises(RuntimeError):
        with Tracker(TrackingConfig(), output_dir=logged.out, is_main=True) as tracker:
            raise RuntimeError("boom")
    assert logged.client.get_run(tracker.run_id).info.status == "FAILED"


def test_large_batches_odd_keys_and_many_tables(logged):
    tracker = Tracker(TrackingConfig(), output_dir=logged.out, is_main=True)
    rid = tracker.run_id
    metrics = {f"many/m{i:04d}": float(i) for i in range(1200)}  # more than one batch of 1000
    metrics |= {"eval/pass@1": 0.5, "a//b": 1.0, "k" * 300: 2.0, "flag": True}
    tracker.log_metrics(metrics, 1)
    # a long-running job's table list close to MLflow's 8000-character tag limit
    old = [{"path": f"samples/step_{s:06d}.json", "type": "table"} for s in range(140)]
    logged.client.set_tag(rid, "mlflow.loggedArtifacts", json.dumps(old))
    tracker.log_samples(sample_rows(150, n=2), 150)
    tracker.log_samples(sample_rows(160, n=2), 160)
    tracker.finish()
    run = logged.client.get_run(rid)
    assert len(run.data.metrics) == 1204
    assert run.data.metrics["eval/pass_1"] == 0.5 and run.data.metrics["a/_/b"] == 1.0
    assert run.data.metrics[valid_key("k" * 300)] == 2.0 and len(valid_key("k" * 300)) == 250
    assert run.data.metrics["flag"] == 1.0
    tables = json.loads(run.data.tags["mlflow.loggedArtifacts"])
    assert len(tables) == 100 and tables[-1]["path"] == "samples/step_000160.json"
    assert [a.path for a in logged.client.list_artifacts(rid, "samples")] == [
        "samples/step_000150.json", "samples/step_000160.json"]


def test_should_log_samples(logged):
    tracker = Tracker(TrackingConfig(samples_every=10), output_dir=logged.out, is_main=True)
    assert [s for s in range(25) if tracker.should_log_samples(s)] == [0, 10, 20]
    tracker.finish()
    never = Tracker(TrackingConfig(samples_every=0), output_dir=logged.out, is_main=True)
    assert never.active and not never.should_log_samples(10)
    never.finish()


BLOCK_MLFLOW = """
import runpy, sys
sys.modules["mlflow"] = None  # as if not installed: find_spec says None, `import mlflow` fails
sys.argv = ["launch.train", *sys.argv[1:]]
runpy.run_module("launch.train", run_name="__main__")
"""


@pytest.mark.dist
def test_training_with_tracking_off_never_imports_mlflow(tmp_path):
    """A minimal environment without mlflow (e.g. a lent GPU machine) trains with
    tracking.enabled=false: one step, world size 1, with every mlflow import refused."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR")}
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_MLFLOW, "--config", "configs/quickstart.yaml", f"run.output_dir={out}",
         "tracking.enabled=false", "run.steps=1", "data.prompts_per_step=8", "rollout.n=2", "eval.every=0",
         "data.task.eval_size=20", "data.task.train_size=200"],
        cwd=root, env={**env, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and not (out / "mlflow.db").exists()
