"""Run a function in N real gloo processes (torchrun's environment, spawned) and collect results."""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world: int, port: int, out: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from core import dist
    try:
        dist.init_distributed(device="cpu")
        result = fn(*args)
        torch.save(result, Path(out) / f"{rank}.pt")
        dist.barrier()  # leave together (see launch/entry.py)
    except BaseException:
        (Path(out) / f"{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy()


def run_distributed(fn: Callable, *args: Any, world_size: int = 2, timeout: float = 300) -> list[Any]:
    """fn(*args) on every rank of a fresh gloo group; returns the per-rank results in rank order."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out:
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, out, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        errors = []
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                errors.append(f"rank {r} timed out after {timeout} s")
            elif p.exitcode != 0:
                err = Path(out) / f"{r}.err"
                errors.append(f"rank {r} exit {p.exitcode}:\n" + (err.read_text() if err.exists() else ""))
        if errors:
            raise AssertionError("\n".join(errors))
        return [torch.load(Path(out) / f"{r}.pt", weights_only=False) for r in range(world_size)]
