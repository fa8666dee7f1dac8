"""Checkpoint faults (issue #14): a damaged newest checkpoint is named and skipped, an explicit
one is an error naming the file, keep_last is validated, a full disk is a clear error after
which a restart works, partial saves do not survive a start, and a NonFiniteError names the
newest checkpoint that verifies. Real DCP saves of real models on real gloo groups.

`python -m tests.test_checkpoint_faults [WORLD_SIZE]` measures save, load and verification with
and without checksums on a ~100 MB model (the figures in core/checkpoint.py's docstring).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Literal

import pytest
import torch

from core.checkpoint import CheckpointConfig, Checkpointer, CheckpointError, ShardedState
from tests.dist_utils import run_distributed
from tests.helpers import random_batch, tiny_model_config
from tests.test_train_e2e import ROOT, read_metrics

QUICK = ["data.prompts_per_step=8", "rollout.n=2", "eval.every=0", "data.task.eval_size=20",
         "data.task.train_size=200", "tracking.enabled=false", "checkpoint.every=1",
         "checkpoint.export_hf=false"]


class _Records(logging.Handler):
    """The messages core.checkpoint logs while attached."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        logger = logging.getLogger("core.checkpoint")
        logger.setLevel(logging.INFO)
        logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _largest_shard(ckpt: Path) -> Path:
    return max((ckpt / "state").glob("*.distcp"), key=lambda p: p.stat().st_size)


def _overwrite_4k(ckpt: Path) -> str:
    shard = _largest_shard(ckpt)
    with open(shard, "r+b") as f:
        f.seek(shard.stat().st_size // 2)
        old = f.read(4096)
        f.seek(-len(old), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in old))  # same size, every byte changed
    return f"state/{shard.name}: checksum mismatch"


def _truncate(ckpt: Path) -> str:
    shard = _largest_shard(ckpt)
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    return f"state/{shard.name}: truncated ({size // 2} of {size} bytes)"


def _delete_rank_file(ckpt: Path) -> str:
    (ckpt / "rank_1.pt").unlink()
    return "rank_1.pt: missing file"


FAULTS: dict[str, Callable[[Path], str]] = {
    "overwritten_4k": _overwrite_4k, "truncated_shard": _truncate, "rank_file_deleted": _delete_rank_file}
"""Damage to the newest checkpoint -> the "file: reason" verification must report."""


def _error(call: Callable[..., Any], *args: Any, **kwargs: Any) -> str | None:
    try:
        call(*args, **kwargs)
    except CheckpointError as e:
        return str(e)
    return None


def _damaged_newest(out: str) -> dict[str, Any]:
    """2 ranks: save steps 1 and 2 of a tiny FSDP model and its AdamW state; then, for each
    fault, damage step 2 of a copy and resume it by `auto` and by explicit path."""
    from core import dist
    from core.models import build_model, full_state_dict, shard_model, token_logprobs
    rank = dist.info().rank
    model = shard_model(build_model(tiny_model_config(), seed=0), dist.mesh())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    base = Path(out) / "run"
    weights = {}
    for step in (1, 2):
        logp, _ = token_logprobs(model, random_batch(step))
        (-logp.sum()).backward()
        opt.step()
        opt.zero_grad()
        Checkpointer(CheckpointConfig(), base).save(step, sharded={"actor": ShardedState(model, opt)},
                                                    local={"rank": rank, "step": step}, meta={})
        weights[step] = full_state_dict(model)
    results: dict[str, Any] = {"weights": weights}
    for fault, damage in FAULTS.items():
        run = Path(out) / fault
        step2 = run / "checkpoints" / "step_000002"
        expected = ""
        if rank == 0:
            shutil.copytree(base, run)
            expected = damage(step2)
        expected = dist.broadcast_object(expected)
        ck = Checkpointer(CheckpointConfig(), run)
        log = _Records()
        chosen = ck.resolve("auto")
        assert chosen is not None
        local, _ = ck.load(chosen, sharded={"actor": ShardedState(model, opt)}, verified=True)
        row: dict[str, Any] = {"expected": expected, "chosen": chosen.name, "warnings": log.messages,
                               "local": local, "weights": full_state_dict(model)}
        logging.getLogger("core.checkpoint").removeHandler(log)
        sharded = {"actor": ShardedState(model, opt)}
        row["explicit"] = _error(ck.resolve, str(step2))
        row["load"] = _error(ck.load, step2, sharded=sharded)
        # no verification at all: still an error naming the path, not a bare EOFError
        row["unverified"] = _error(ck.load, step2, sharded=sharded, verified=True)
        ck.save(3, sharded=sharded, local={"rank": rank, "step": 3}, meta={})  # keep_last=2
        row["after_save"] = [p.name for p in ck.candidates()]
        results[fault] = row
    if rank == 0:
        (Path(out) / "run" / "checkpoints" / "step_000001" / "manifest.json").unlink()
        _truncate(Path(out) / "run" / "checkpoints" / "step_000002")
    dist.barrier()
    results["none_verifies"] = _error(Checkpointer(CheckpointConfig(), base).resolve, "auto")
    return results


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_distributed(_damaged_newest, str(tmp_path_factory.mktemp("damaged")), world_size=2)[0]


@pytest.mark.dist
@pytest.mark.parametrize("fault", list(FAULTS))
def test_damaged_newest_checkpoint_is_named_and_skipped(damaged: dict[str, Any], fault: str) -> None:
    """auto: a warning names the checkpoint, the file and the reason, and the run resumes from
    step 1, bitwise; an explicit path (or a load) of the damaged one is an error naming them."""
    row, step2 = damaged[fault], "step_000002"
    assert row["chosen"] == "step_000001"
    (warning,) = [m for m in row["warnings"] if "does not verify" in m]
    assert step2 in warning and row["expected"] in warning and "falling back" in warning
    assert row["local"]["step"] == 1
    assert all(torch.equal(row["weights"][k], v) for k, v in damaged["weights"][1].items())
    assert any(not torch.equal(damaged["weights"][2][k], v) for k, v in damaged["weights"][1].items())
    for call in ("explicit", "load"):
        assert row[call] is not None and step2 in row[call] and row["expected"] in row[call], row[call]
    # keep_last=2 counts checkpoints that verify: saving step 3 removed the damaged step 2
    assert row["after_save"] == ["step_000001", "step_000003"]
    if fault != "overwritten_4k":  # DCP has no checksums: only the manifest catches that one
        assert row["unverified"] is not None and step2 in row["unverified"], row["unverified"]


@pytest.mark.dist
def test_no_checkpoint_that_verifies_is_an_error(damaged: dict[str, Any]) -> None:
    """auto with checkpoints none of which verifies does not start over silently."""
    message = damaged["none_verifies"]
    assert message is not None and "no checkpoint in" in message and "run.resume=never" in message


def test_keep_last_zero_is_refused_at_config_load() -> None:
    from core.config import load_config
    from launch.config import JobConfig
    with pytest.raises(ValueError, match=r"checkpoint\.keep_last' must be >= 1.*got 0"):
        load_config(JobConfig, str(ROOT / "configs" / "quickstart.yaml"), ["checkpoint.keep_last=0"])
    assert load_config(JobConfig, str(ROOT / "configs" / "quickstart.yaml"),
                       ["checkpoint.keep_last=1"]).checkpoint.keep_last == 1


def _train_cli(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The real CLI on 2 gloo processes; the caller checks the exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "launch.train", "--config", "configs/quickstart.yaml", f"run.output_dir={out}", *QUICK,
           *overrides]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 16 MB tmpfs (room for two checkpoints of the quickstart, not three)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.dist
def test_disk_full_is_a_clear_error_and_a_restart_works(small_disk: Path) -> None:
    """Step 3's save does not fit: "no space left on <path>: needed ~N MB", the partial save is
    gone (the disk as free as before), steps 1 and 2 verify; a restart on the same disk with
    keep_last=1 (which the message suggests) resumes from step 2 and finishes."""
    out = small_disk / "run"
    full = _train_cli(out, "run.steps=3")
    text = full.stdout + full.stderr
    ckpts = out / "checkpoints"
    assert full.returncode != 0 and (ckpts / "step_000002").is_dir(), text[-3000:]
    assert f"no space left on {ckpts}: needed ~" in text, text[-3000:]
    needed_mb = float(text.split(f"no space left on {ckpts}: needed ~")[1].split(" MB")[0])
    on_disk_mb = sum(f.stat().st_size for f in (ckpts / "step_000002").rglob("*") if f.is_file()) / 1e6
    assert 0.8 * on_disk_mb <= needed_mb <= 1.2 * on_disk_mb, (needed_mb, on_disk_mb)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000001", "step_000002"]  # no partial
    ck = Checkpointer(CheckpointConfig(), out)
    assert [p.name for p in ck.complete()] == ["step_000001", "step_000002"]
    # what is left on the disk is the two checkpoints and the small run files
    assert shutil.disk_usage(small_disk).used < 2 * on_disk_mb * 1e6 + 1.5e6

    again = _train_cli(out, "run.steps=3", "checkpoint.keep_last=1")
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "resumed from" in again.stdout + again.stderr
    assert [r["step"] for r in read_metrics(out)][-1] == 3
    assert [p.name for p in ck.complete()] == ["step_000003"]


def _nonfinite_after_fallback(out: str) -> dict[str, Any]:
    """Train 2 steps (checkpoints 1 and 2); damage step 2, leave a partial save behind; the
    next run resumes (falling back to step 1) and its updates turn non-finite."""
    from core.config import load_config
    from core.optim import NonFiniteError
    from launch.build import build_job
    from launch.config import JobConfig
    from launch.train import Trainer
    overrides = [f"run.output_dir={out}", *QUICK, "actor.max_bad_steps=1"]
    config = str(ROOT / "configs" / "quickstart.yaml")
    Trainer(build_job(load_config(JobConfig, config, [*overrides, "run.steps=2"]))).fit()
    ckpts = Path(out) / "checkpoints"
    _overwrite_4k(ckpts / "step_000002")
    partial = ckpts / "step_000003.tmp-0123abcd"
    shutil.copytree(ckpts / "step_000001", partial)  # as a killed save leaves it
    job = build_job(load_config(JobConfig, config, [*overrides, "run.steps=4"]))

    def nan_logits(module: torch.nn.Module, args: Any, output: Any) -> Any:
        if module.training:  # the update's forward pass, not sampling or log-probs
            output.logits = output.logits * float("nan")
        return output
    job.roles.actor.model.register_forward_hook(nan_logits)
    log = _Records()
    try:
        Trainer(job).fit()
        message = None
    except NonFiniteError as e:
        message = str(e)
    return {"message": message, "partial_left": partial.exists(), "warnings": log.messages}


@pytest.mark.dist
def test_nonfinite_error_names_the_newest_verified_checkpoint(tmp_path: Path) -> None:
    """The newest checkpoint (step 2) is damaged: the message names step 1, which verifies;
    the partial save left by a killed save is removed at start."""
    got = run_distributed(_nonfinite_after_fallback, str(tmp_path), world_size=1)[0]
    good = tmp_path / "checkpoints" / "step_000001"
    assert got["message"] is not None and f"the newest verified checkpoint is {good}" in got["message"]
    assert "step_000002" not in got["message"]
    assert not got["partial_left"]
    assert any("step_000003.tmp-0123abcd" in m and "interrupted save" in m for m in got["warnings"])
    assert any("step_000002 does not verify" in m for m in got["warnings"])


def _measure(out: str, repeats: int) -> dict[str, float]:
    """Median seconds of save, load (with its verification) and verification alone, with
    checksums (verify=full) and without (verify=size), on a ~100 MB model with AdamW state."""
    from core import dist
    from core.models import ModelConfig, build_model, shard_model
    cfg = ModelConfig(config=dict(model_type="qwen2", vocab_size=4096, hidden_size=512, intermediate_size=2048,
                                  num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=4,
                                  max_position_embeddings=64, tie_word_embeddings=False))
    model = shard_model(build_model(cfg, seed=0), dist.mesh())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times: dict[str, list[float]] = {}
    modes: list[Literal["full", "size"]] = ["size", "full"]
    for mode in modes * repeats:
        ck = Checkpointer(CheckpointConfig(verify=mode, keep_last=1), f"{out}/{mode}")
        t0 = time.perf_counter()
        path = ck.save(1, sharded={"m": ShardedState(model, opt)}, local={}, meta={})
        t1 = time.perf_counter()
        ck.load(path, sharded={"m": ShardedState(model, opt)})
        t2 = time.perf_counter()
        assert not ck.verify(path, collective=True)
        t3 = time.perf_counter()
        for key, seconds in {"save": t1 - t0, "load": t2 - t1, "verify": t3 - t2}.items():
            times.setdefault(f"{key}_s/{mode}", []).append(seconds)
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "checkpoint_mb": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6,
            **{k: statistics.median(v) for k, v in sorted(times.items())}}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        figures = run_distributed(_measure, tmp, 5, world_size=int(sys.argv[1]) if len(sys.argv) > 1 else 1)[0]
    print(json.dumps(figures, indent=1))
