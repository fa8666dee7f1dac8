"""Process groups, devices and small collectives.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; we read them and start
the default process group: nccl on CUDA, gloo on CPU. A plain `python -m launch.train` (no
torchrun) still gets a real process group of size 1 over an in-memory store, so every code path
(FSDP2, collectives, checkpointing) is the same at every world size.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_INFO: DistInfo | None = None
_MESH: DeviceMesh | None = None


def init_distributed(*, device: str = "auto") -> DistInfo:
    """Start the default process group from torchrun's environment (idempotent).

    device: "auto" (CUDA when available, else CPU), "cpu" or "cuda".
    """
    global _INFO, _MESH
    if _INFO is not None:
        return _INFO
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        _share_cpu_threads(local_world)
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, store=_attempt_store(rank, world), rank=rank,
                                    world_size=world, device_id=dev if use_cuda else None)
        else:
            # Single process without torchrun: an in-memory store, no network port.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    _INFO = DistInfo(rank, world, local_rank, local_world, dev, backend)
    _MESH = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    return _INFO


def _attempt_store(rank: int, world: int) -> dist.Store:
    """The rendezvous store, under a prefix unique to this torchrun restart attempt.

    After a worker dies, torchrun restarts every worker against the same store; without a
    per-attempt prefix a new rank can read the previous attempt's gloo/nccl addresses and fail
    to connect (seen with --max-restarts on gloo)."""
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
                          is_master=rank == 0 and not agent_hosts, wait_for_workers=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"rolegraph/attempt_{attempt}", store)


def _share_cpu_threads(local_world: int) -> None:
    # N processes on one CPU box must not each spawn one thread per core: oversubscription
    # makes every rank several times slower. An explicit OMP_NUM_THREADS wins.
    if "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))


def info() -> DistInfo:
    if _INFO is None:
        raise RuntimeError("init_distributed() has not been called")
    return _INFO


def mesh() -> DeviceMesh:
    if _MESH is None:
        raise RuntimeError("init_distributed() has not been called")
    return _MESH


def destroy() -> None:
    global _INFO, _MESH
    if dist.is_initialized():
        dist.destroy_process_group()
    _INFO = None
    _MESH = None


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce a tensor out of place; op is "sum", "max" or "min"."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    out = t.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=ops[op])
    return out


def all_reduce_scalars(values: dict[str, float], op: str = "sum") -> dict[str, float]:
    """All-reduce a dict of Python floats in one collective (keys must match on every rank)."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=info().device if _INFO else "cpu")
    t = all_reduce(t, op)
    return dict(zip(keys, t.tolist()))


def all_gather_objects(obj: Any) -> list[Any]:
    """Gather one picklable object from every rank, in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = _INFO.rank if _INFO is not None else int(os.environ.get("RANK", 0))
        return True


def setup_logging(level: int = logging.INFO, *, all_ranks: bool = False) -> None:
    """One rank-prefixed format for the whole process; non-zero ranks log warnings only
    unless all_ranks is set."""
    rank = int(os.environ.get("RANK", 0))
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(_RankFilter())
    handler.setFormatter(logging.Formatter(
        "[rank%(rank)s %(asctime)s %(levelname).1s %(name)s] %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if (rank == 0 or all_ranks) else logging.WARNING)
    for noisy in ("urllib3", "filelock", "mlflow", "alembic", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
