"""Checkpoints: sharded model/optimizer state through torch.distributed.checkpoint, plus each
rank's small state (RNG, data position, counters, schedulers) and a manifest.

Layout of `<run.output_dir>/checkpoints/step_000040/`:

    state/          DCP shards of every trainable or moving model and its optimizer
    rank_<r>.pt     this rank's local state (loaded with weights_only=True)
    meta.json       step, world size, the resolved config, stages done, tracking run id

A checkpoint is written under `step_000040.tmp-<nonce>` and renamed by rank 0 once every rank
has finished, so a crash mid-save leaves the previous checkpoint as the latest; leftovers of
interrupted saves are removed by the next save. `resume: auto` picks the newest complete one.
Resuming with another world size works for the DCP state (it reshards on load); the data
position then continues from the same epoch and global sample count, and RNG streams restart
from rank 0's, so only same-size resumes are bitwise exact.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from core import dist

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    every: int = 0
    """Save every this many steps (and after the last step); 0: only after the last step."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted after a successful save."""
    export_hf: bool = True
    """Write the final actor as a Hugging Face folder to <run.output_dir>/hf at the end."""


class ShardedState(Stateful):
    """A sharded model (and its optimizer) as one DCP entry; DCP calls these on save/load."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"])
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])


def rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    assert match is not None, path
    return int(match.group(1))


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, output_dir: str | Path) -> None:
        self.cfg = cfg
        self.root = Path(output_dir) / "checkpoints"

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and (p / "meta.json").exists()]
        return sorted(found, key=_step_of)

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint `run.resume` asks for: "auto" (newest, if any), "never", or a path."""
        if resume == "never":
            return None
        if resume == "auto":
            done = self.complete()
            return done[-1] if done else None
        path = Path(resume)
        if not (path / "meta.json").exists():
            raise FileNotFoundError(f"run.resume={resume!r} is not a complete checkpoint folder "
                                    f"(no meta.json); use auto, never or a checkpoints/step_* path")
        return path

    def save(self, step: int, *, sharded: Mapping[str, Stateful], local: Mapping[str, Any],
             meta: Mapping[str, Any]) -> Path:
        """Collective: every rank calls it with its own `local` state."""
        info = dist.info()
        final = self.root / f"step_{step:06d}"
        nonce = dist.broadcast_object(uuid.uuid4().hex[:8])
        tmp = self.root / f"{final.name}.tmp-{nonce}"
        t0 = time.perf_counter()
        if info.is_main:
            tmp.mkdir(parents=True, exist_ok=False)
        dist.barrier()
        dcp.save(dict(sharded), checkpoint_id=str(tmp / "state"))
        torch.save(dict(local), tmp / f"rank_{info.rank}.pt")
        dist.barrier()  # every rank's files are on disk before the rename makes them "latest"
        if info.is_main:
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": info.world_size}))
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        dist.barrier()
        logger.info("checkpoint step %d saved to %s in %.2f s", step, final, time.perf_counter() - t0)
        return final

    def load(self, path: Path, *, sharded: Mapping[str, Stateful]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore `sharded` in place; returns (this rank's local state, meta)."""
        info = dist.info()
        meta = json.loads((path / "meta.json").read_text())
        dcp.load(dict(sharded), checkpoint_id=str(path / "state"))
        same_world = meta["world_size"] == info.world_size
        source = path / f"rank_{info.rank if same_world else 0}.pt"
        local = torch.load(source, weights_only=True)
        local["same_world"] = same_world
        if not same_world:
            logger.warning("resuming a %d-process checkpoint with %d processes: model and optimizer "
                           "state are resharded exactly; data order and sampling seeds are not "
                           "bitwise those of an uninterrupted run", meta["world_size"], info.world_size)
        logger.info("resumed from %s (step %d)", path, meta["step"])
        return local, meta

    def _prune(self) -> None:
        for leftover in self.root.glob("step_*.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        done = self.complete()
        for old in done[:max(0, len(done) - self.cfg.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
