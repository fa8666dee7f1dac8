"""Exact resume, fault tolerance under torchrun restarts, crash-safe saves, export, bad input."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.helpers import random_batch, tiny_model_config
from tests.test_train_e2e import ROOT, read_metrics, torchrun

SMALL = ["run.steps=4", "data.prompts_per_step=8", "rollout.n=4", "eval.every=2",
         "data.task.eval_size=40", "data.task.train_size=2000"]
VOLATILE = ("timing_s/", "perf/tokens_per_s", "reshard/seconds", "reshard/gbps")


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("straight")
    torchrun("configs/quickstart.yaml", f"run.output_dir={out}", *SMALL)
    return read_metrics(out)


@pytest.mark.dist
def test_resume_is_bitwise_identical(tmp_path, straight):
    """4 steps straight == 2 steps, stop, resume, 2 steps: every non-timing metric, bitwise."""
    out = tmp_path / "resumed"
    torchrun("configs/quickstart.yaml", f"run.output_dir={out}", *SMALL, "run.stop_after=2")
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2]
    proc = torchrun("configs/quickstart.yaml", f"run.output_dir={out}", *SMALL)
    assert "resumed from" in proc.stdout
    assert comparable(read_metrics(out)) == comparable(straight)
    assert (out / "hf" / "model.safetensors").exists()
    from tests.test_train_e2e import check_mlflow_run
    check_mlflow_run(out, read_metrics(out))  # one MLflow run across the restart, every step


def _find_worker(rank: int, output_dir: Path) -> int | None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"launch.train" in cmd and str(output_dir).encode() in cmd and f"RANK={rank}".encode() in env \
                and b"TORCHELASTIC_RESTART_COUNT=0" in env:
            return int(pid)
    return None


@pytest.mark.dist
@pytest.mark.slow
def test_sigkill_mid_run_restarts_and_resumes_without_losing_steps(tmp_path, straight):
    """torchrun --max-restarts=1: SIGKILL one worker after the step-2 checkpoint; the restarted
    job resumes and ends with exactly the rows of an uninterrupted run."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=1", "-m", "launch.train", "--config", "configs/quickstart.yaml",
           f"run.output_dir={out}", *SMALL, "checkpoint.every=2"]
    log_file = (tmp_path / "torchrun.log").open("w")  # a file, not a pipe: the log is long
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=log_file, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    killed = False
    while time.time() < deadline and proc.poll() is None and not killed:
        if (out / "checkpoints" / "step_000002").exists():
            pid = _find_worker(1, out)
            if pid:
                os.kill(pid, signal.SIGKILL)
                killed = True
        time.sleep(0.05)
    try:
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # never leave a hung job behind
        log_file.close()
    log = (tmp_path / "torchrun.log").read_text()
    assert killed, "never found the worker to kill:\n" + log[-3000:]
    assert proc.returncode == 0, log[-4000:]
    assert "resumed from" in log
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # nothing lost, nothing twice
    assert comparable(rows) == comparable(straight)


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run_distributed(_crash_during_save, str(tmp_path), world_size=1)
    from core.checkpoint import CheckpointConfig, Checkpointer
    ck = Checkpointer(CheckpointConfig(), tmp_path)
    assert [p.name for p in ck.complete()] == ["step_000001"]
    assert ck.resolve("auto").name == "step_000001"
    assert list((tmp_path / "checkpoints").glob("step_000002.tmp-*"))  # the torn save, ignored


def _crash_during_save(out: str) -> None:
    import torch.distributed.checkpoint as dcp
    import core.checkpoint as ckpt
    from core.models import build_model
    model = build_model(tiny_model_config(), seed=0)
    ck = ckpt.Checkpointer(ckpt.CheckpointConfig(), out)
    ck.save(1, sharded={"m": ckpt.ShardedState(model)}, local={"x": 1}, meta={})
    real = dcp.save

    def torn(state, checkpoint_id):  # write the shards, then die before the manifest
        real(state, checkpoint_id=checkpoint_id)
        raise RuntimeError("power cut")
    ckpt.dcp.save = torn
    try:
        ck.save(2, sharded={"m": ckpt.ShardedState(model)}, local={"x": 2}, meta={})
    except RuntimeError:
        pass
    finally:
        ckpt.dcp.save = real


@pytest.mark.dist
def test_resume_two_ranks_checkpoint_with_one_process(tmp_path):
    a, b = tmp_path / "two", tmp_path / "one"
    torchrun("configs/quickstart.yaml", f"run.output_dir={a}", *SMALL, "run.steps=2")
    torchrun("configs/quickstart.yaml", f"run.output_dir={b}", *SMALL, "run.steps=3",
             f"run.resume={a}/checkpoints/step_000002", nproc=1)
    rows = read_metrics(b)
    assert [r["step"] for r in rows] == [3]  # continued after the 2-process checkpoint's step
    from safetensors.torch import load_file
    # the 1-process run started from exactly the 2-process weights: same first-step loss input
    assert load_file(a / "hf" / "model.safetensors").keys() == load_file(b / "hf" / "model.safetensors").keys()


def _export_and_logits(out: str) -> torch.Tensor:
    from core import dist
    from core.models import build_model, save_hf_folder, shard_model, token_logprobs
    from core.tasks import char_tokenizer
    from roles.actor import Actor
    from algorithms.losses import PolicyLoss
    actor = Actor(Actor.Config(lr=1e-2), shard_model(build_model(tiny_model_config(), seed=0), dist.mesh()),
                  total_steps=1)
    batch = random_batch(0, B=8)
    actor.update(batch.with_fields(old_logp=actor.log_probs(batch)), loss_fn=PolicyLoss())
    save_hf_folder(actor.model, char_tokenizer(), out, is_main=dist.info().is_main)
    with torch.no_grad():
        return token_logprobs(actor.model, batch)[0]


@pytest.mark.dist
def test_export_loads_with_from_pretrained_and_matches_the_actor(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from core.models import token_logprobs
    actor_logp = run_distributed(_export_and_logits, str(tmp_path / "hf"), world_size=2)[0]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    with torch.no_grad():
        exported = token_logprobs(model, random_batch(0, B=8))[0]
    torch.testing.assert_close(exported, actor_logp, rtol=1e-5, atol=1e-6)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").decode([5, 6]) == "23"


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    p = _cli("--config", "configs/quickstart.yaml", f"run.output_dir={tmp_path}", "model.path=/no/such/model")
    assert p.returncode != 0 and "model folder '/no/such/model' does not exist" in p.stderr


def test_bad_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  steps: 3\n  seed: [1, 2\n")
    p = _cli("--config", str(bad))
    assert p.returncode != 0 and str(bad) in p.stderr and "line" in p.stderr


def test_dataset_without_mapped_field_names_file_and_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n{"question": "2+2", "answer": "4"}\n')
    p = _cli("--config", "configs/quickstart.yaml", f"run.output_dir={tmp_path / 'out'}",
             f"data.train_files=[{data}]", f"data.eval_files=[{data}]", "data.format.chat_template=false")
    assert p.returncode != 0 and f"{data}:2: missing field(s) ['problem']" in p.stderr


def test_unwritable_output_dir_is_a_clear_error():
    p = _cli("--config", "configs/quickstart.yaml", "run.output_dir=/proc/rolegraph-run", "run.steps=1",
             "data.task.train_size=500", "data.task.eval_size=10")
    assert p.returncode != 0 and "cannot write to run.output_dir '/proc/rolegraph-run'" in p.stderr
