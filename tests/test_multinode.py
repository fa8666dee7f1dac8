"""Multi-node on loopback: two torchrun launchers (one process each) meeting through a c10d
rendezvous on 127.0.0.1 train exactly like one launcher with two processes.

The two launchers run README's multi-node command line as written there (another port).
Metrics agree to 1e-5 relative, not bitwise: gloo may order a reduction differently between the
two topologies (measured 2026-12-01: no difference at that tolerance).
"""
from __future__ import annotations

import math
import os
import shlex
import socket
import subprocess
import sys

import pytest

from tests.test_train_e2e import ROOT, TINY, read_metrics, torchrun

pytestmark = pytest.mark.dist
README = ROOT / "README.md"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multinode_command(port: int, *overrides: str) -> list[str]:
    """README's multi-node command, as written there, on `port` with `overrides` appended."""
    line = next(ln.strip() for ln in README.read_text().splitlines() if ln.strip().startswith("torchrun --nnodes="))
    args = shlex.split(line.replace(":29500", f":{port}"))
    assert "--rdzv-endpoint=127.0.0.1:%d" % port in args, line
    return [sys.executable, "-m", "torch.distributed.run", *args[1:], *overrides]


def comparable(row: dict) -> dict[str, float]:
    """The numbers a run must reproduce: everything but wall-clock figures."""
    skip = ("timing_s/", "perf/tokens_per_s", "reshard/seconds", "reshard/gbps")
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not k.startswith(skip)}


def test_two_loopback_nodes_match_one_node_with_two_processes(tmp_path):
    overrides = ["tracking.enabled=false", "checkpoint.export_hf=false", *TINY]
    single = tmp_path / "single"
    torchrun("configs/quickstart.yaml", f"run.output_dir={single}", *overrides)
    multi = tmp_path / "multi"
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(multinode_command(port, f"run.output_dir={multi}", *overrides), cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-4000:]
    want, got = read_metrics(single), read_metrics(multi)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1, 2, 3]
    for w, g in zip(want, got):
        w, g = comparable(w), comparable(g)
        assert set(w) == set(g), sorted(set(w) ^ set(g))
        bad = {k: (w[k], g[k]) for k in w if not math.isclose(w[k], g[k], rel_tol=1e-5, abs_tol=1e-9)}
        assert not bad, f"step {w['step']}: {bad}"
