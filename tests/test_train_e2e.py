"""End-to-end: the real `torchrun -m launch.train` CLI on 2 gloo processes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from tests.dist_utils import run_distributed

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "tiny_grpo.json"
GOLDEN_KEYS = ["reward/mean", "actor/pg_loss", "actor/grad_norm", "actor/entropy",
               "response_length/mean", "eval/accuracy", "reshard/bytes"]


SIGNAL_DEATH = re.compile(r"exitcode\s*:\s*-(6|11)\s")
"""torchrun's failure report for a rank killed by SIGABRT or SIGSEGV (not a Python exception)."""


def torchrun(config: str, *overrides: str, nproc: int = 2, timeout: float = 900,
             module: str = "launch.train") -> subprocess.CompletedProcess:
    """Run `torchrun -m module --config config overrides` from the repository root; assert exit 0.

    One retry, only when a rank died by a signal and the run's output folder did not exist
    before the call: the first attempt's folder moves to `<dir>.aborted` and its crash lines
    are reported as a warning. A Python exception, or a signal death twice, fails. Why: one
    SIGABRT on a rank in the CI runs on record (stop 22, the dapo golden run; every local rerun
    passes) whose own stderr was cut from the report, so its cause is unknown; launch/entry.py
    now enables faulthandler and the message below keeps each rank's crash lines.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone", "-m", module, "--config", config, *overrides]
    out = next((Path(o.split("=", 1)[1]) for o in overrides if o.startswith("run.output_dir=")), None)
    fresh = out is not None and not out.exists()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and fresh and SIGNAL_DEATH.search(proc.stderr):
        warnings.warn(f"a rank died by a signal; retrying once. Its stderr:\n{fatal_lines(proc.stderr)}",
                      stacklevel=2)
        if out.exists():
            out.rename(out.with_name(out.name + ".aborted"))
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-3000:] + "\n--- stderr (fatal lines) ---\n"
                                  + fatal_lines(proc.stderr) + "\n--- stderr (tail) ---\n"
                                  + proc.stderr[-3000:])
    return proc


def fatal_lines(stderr: str, context: int = 25) -> str:
    """The lines of each rank's crash: faulthandler's 'Fatal Python error' block, a C++
    'terminate called' line, a Python traceback, with `context` lines after each (at most 4000
    characters), so a failure shows why a rank died, not only torchrun's summary."""
    lines = stderr.splitlines()
    marks = [i for i, line in enumerate(lines)
             if re.search(r"Fatal Python error|terminate called|what\(\):|Traceback \(most recent", line)]
    keep: list[str] = []
    for i in marks[:6]:
        keep += lines[i:i + context] + ["..."]
    return "\n".join(keep)[:4000]


@pytest.mark.dist
def test_a_rank_killed_by_a_signal_is_retried_once_and_its_stack_reported(tmp_path):
    with pytest.warns(UserWarning, match="(?s)died by a signal.*Fatal Python error: Aborted"):
        torchrun("unused.yaml", f"run.output_dir={tmp_path / 'run'}", "once", module="tests.data.abort_rank")
    assert (tmp_path / "run.aborted").is_dir() and (tmp_path / "run").is_dir()
    with pytest.warns(UserWarning), pytest.raises(AssertionError, match="(?s)fatal lines.*Fatal Python error: Aborted"):
        torchrun("unused.yaml", f"run.output_dir={tmp_path / 'always'}", module="tests.data.abort_rank")


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


TINY = ["run.steps=3", "data.prompts_per_step=8", "rollout.n=4", "eval.every=2",
        "data.task.eval_size=40", "data.task.train_size=2000", "actor.micro_batch_size=8"]


@pytest.mark.dist
def test_tiny_grpo_run_matches_golden_numbers(tmp_path):
    """3 GRPO steps from the shipped checkpoint, 2 processes, fixed seed: per-step numbers equal
    the committed golden ones (set ROLEGRAPH_UPDATE_GOLDEN=1 to rewrite them after an
    intended change)."""
    out = tmp_path / "run"
    proc = torchrun("configs/quickstart.yaml", f"run.output_dir={out}", *TINY)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[2] and "eval/accuracy" in rows[3]
    assert all(k in rows[1] for k in ("timing_s/generate", "timing_s/update_actor", "actor/lr",
                                      "reward/mean", "perf/tokens_per_s", "timing_s/step"))
    assert "step 3/3" in proc.stdout and "[rank0" in proc.stdout  # one rank-prefixed line per step
    # a quiet console: no library warning from our calls (deprecated arguments, ...)
    assert "Warning" not in proc.stdout + proc.stderr, [ln for ln in (proc.stdout + proc.stderr).splitlines()
                                                        if "Warning" in ln]
    assert "INFO mlflow" not in proc.stdout + proc.stderr  # MLflow's own store set-up lines
    assert (out / "config.yaml").exists() and "flowchart" in (out / "graph.mmd").read_text()
    check_mlflow_run(out, rows)
    got = [{k: r[k] for k in GOLDEN_KEYS if k in r} for r in rows]
    if os.environ.get("ROLEGRAPH_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert len(golden) == len(got)
    for step, (g, w) in enumerate(zip(got, golden)):
        assert set(g) == set(w), f"step {step}: metrics {sorted(g)} != golden {sorted(w)}"
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), f"step {step} {k}"


def check_tools_curves(out: Path, n_evals: int) -> None:
    """The tools quickstart's curves in its MLflow store: eval/accuracy at every evaluation,
    tools/calls_per_sample and tools/error_rate at every training step."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("rolegraph").experiment_id])[0]
    steps = int(run.data.params["run.steps"])
    assert len(client.get_metric_history(run.info.run_id, "eval/accuracy")) == n_evals
    for key in ("tools/calls_per_sample", "tools/error_rate"):
        assert len(client.get_metric_history(run.info.run_id, key)) == steps, key


def check_mlflow_run(out: Path, rows: list[dict]) -> None:
    """The run's MLflow store, read back: params, every step's metrics, artifacts, status."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("rolegraph").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["run.steps"] == str(rows[-1]["step"]) and run.data.params["algorithm.name"] == "grpo"
    for key in ("reward/mean", "actor/grad_norm", "timing_s/generate"):
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == {r["step"]: pytest.approx(r[key]) for r in rows if key in r}, key
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "graph.mmd"} <= names
    assert run.data.tags["checkpoint/latest"].endswith(f"step_{rows[-1]['step']:06d}")


def test_plain_python_runs_with_world_size_one(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "launch.train", "--config", "configs/quickstart.yaml",
                           f"run.output_dir={out}", "run.steps=1", *TINY[1:]],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_metrics(out)
    assert rows[-1]["step"] == 1 and rows[-1]["reshard/bytes"] > 0


def test_misspelled_key_on_the_command_line_names_the_nearest_key():
    proc = subprocess.run([sys.executable, "-m", "launch.train", "--config", "configs/quickstart.yaml",
                           "actor.lrr=0.1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "actor.lrr" in proc.stderr and "did you mean 'actor.lr'" in proc.stderr


def test_misspelled_key_in_yaml_names_the_nearest_key(tmp_path):
    from core.config import load_config
    from launch.config import JobConfig
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs" / "quickstart.yaml").read_text().replace("temperature:", "temprature:"))
    with pytest.raises(ValueError, match=r"rollout\.temprature.*did you mean 'rollout\.temperature'"):
        load_config(JobConfig, bad)


def _built_roles(overrides: list[str]) -> list[str]:
    from core.config import load_config
    from launch.build import build_job
    from launch.config import JobConfig
    cfg = load_config(JobConfig, str(ROOT / "configs" / "quickstart.yaml"), overrides)
    return sorted(build_job(cfg).roles.named())


@pytest.mark.dist
def test_only_roles_the_graph_uses_are_built():
    small = ["data.task.train_size=500", "data.task.eval_size=10"]
    assert run_distributed(_built_roles, small, world_size=1)[0] == ["actor", "reward", "rollout"]
    assert run_distributed(_built_roles, small + ["algorithm.loss.kl_coef=0.01"], world_size=1)[0] == \
        ["actor", "reference", "reward", "rollout"]


@pytest.mark.slow
@pytest.mark.dist
def test_quickstart_learns(tmp_path):
    """README command 1, exactly as shipped: held-out accuracy rises by >= 0.6.

    Measured (400 steps): 0.166 -> 0.976-0.984 over run.seed=0..3 with the sampler before the
    per-request one (gain 0.810-0.818, sd ~0.003), and 0.976 / 0.984 for seeds 0 / 1 with it
    (2026-12-01); 0.6 leaves ~0.2 (dozens of sd) for library releases. Its wall time is a
    benchmark figure (README), not a test."""
    out = tmp_path / "quickstart"
    t0 = time.perf_counter()
    torchrun("configs/quickstart.yaml", f"run.output_dir={out}")
    wall = time.perf_counter() - t0
    evals = [r["eval/accuracy"] for r in read_metrics(out) if "eval/accuracy" in r]
    print(f"quickstart: eval/accuracy {evals[0]:.3f} -> {evals[-1]:.3f} in {wall:.0f} s")
    assert evals[-1] - evals[0] >= 0.6


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_loads(path):
    from core.config import load_config
    from launch.config import JobConfig
    from launch.sft import SFTConfig
    from launch.build import build_plan
    schema = SFTConfig if "sft" in Path(path).name else JobConfig
    cfg = load_config(schema, ROOT / path)
    if schema is JobConfig:
        build_plan(cfg)  # the algorithm exists and its graphs validate
