"""What a checkpoint holds for a job, gathered from its roles, and how it is put back."""
from __future__ import annotations

from typing import Any

from core.checkpoint import ShardedState, rng_state, set_rng_state
from launch.build import Job


def sharded_state(job: Job) -> dict[str, Any]:
    """DCP entries: every trainable model with its optimizer, and the reference if it moves."""
    out: dict[str, Any] = {"actor": job.roles["actor"].train_state.sharded_state()}
    if "critic" in job.roles:
        out["critic"] = job.roles["critic"].train_state.sharded_state()
    if "reference" in job.roles and job.cfg.reference.anchor != "fixed":
        out["reference"] = ShardedState(job.roles["reference"].model)
    return out


def local_state(job: Job) -> dict[str, Any]:
    """This rank's small state: RNG streams, data position, counters, schedulers."""
    roles = job.roles
    state: dict[str, Any] = {"rng": rng_state(), "stream": job.stream.state_dict(),
                             "position": job.stream.position(), "world_size": job.stream.sampler.world,
                             "actor": roles["actor"].train_state.local_state(),
                             "rollout_calls": roles["rollout"].calls}
    if "critic" in roles:
        state["critic"] = roles["critic"].train_state.local_state()
    if "reference" in roles:
        state["reference"] = {"steps": roles["reference"].steps, "resets": roles["reference"].resets}
    return state


def load_local_state(job: Job, state: dict[str, Any]) -> None:
    roles = job.roles
    roles["actor"].train_state.load_local_state(state["actor"])
    if "critic" in roles:
        roles["critic"].train_state.load_local_state(state["critic"])
    if "reference" in roles:
        roles["reference"].steps = state["reference"]["steps"]
        roles["reference"].resets = state["reference"]["resets"]
    roles["rollout"].calls = state["rollout_calls"]
    set_rng_state(state["rng"])
    if "stage" in state["stream"]:
        job.stream.set_stage(state["stream"]["stage"])
    if state["same_world"]:
        job.stream.load_state_dict(state["stream"])
    else:
        epoch, consumed = state["position"]
        global_consumed = consumed * state["world_size"]
        job.stream.seek(epoch, global_consumed // job.stream.sampler.world)
