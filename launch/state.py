"""What a checkpoint holds for a job, gathered from its roles, and how it is put back.

Each role owns its state: `sharded_state()` (a DCP entry, or None: the actor and critic with
their optimizers, a moving reference) and `state_dict()` / `load_state_dict()` (its small
per-rank state). The job adds the RNG streams and the data position.
"""
from __future__ import annotations

from typing import Any

from core.checkpoint import rng_state, set_rng_state
from core.curriculum import CurriculumStream
from launch.build import Job


def sharded_state(job: Job) -> dict[str, Any]:
    """DCP entries by role name."""
    entries = {name: role.sharded_state() for name, role in job.roles.named().items()}
    return {name: state for name, state in entries.items() if state is not None}


def local_state(job: Job) -> dict[str, Any]:
    """This rank's small state: every role's, RNG streams, data position."""
    return {"roles": {name: role.state_dict() for name, role in job.roles.named().items()},
            "rng": rng_state(), "stream": job.stream.state_dict(), "position": job.stream.position(),
            "world_size": job.stream.sampler.world}


def load_local_state(job: Job, state: dict[str, Any]) -> None:
    for name, role in job.roles.named().items():
        role.load_state_dict(state["roles"][name])
    set_rng_state(state["rng"])
    if isinstance(job.stream, CurriculumStream):
        job.stream.set_stage(state["stream"]["stage"])
    if state["same_world"]:
        job.stream.load_state_dict(state["stream"])
    else:
        epoch, consumed = state["position"]
        global_consumed = consumed * state["world_size"]
        job.stream.seek(epoch, global_consumed // job.stream.sampler.world)
