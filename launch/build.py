"""Placement: build the graph, then only the roles it uses, on this process's device.

Every process builds every role the graph names (SPMD); the actor and reference are FSDP2-sharded
over all processes, the rollout engine holds a full copy, and the hybrid engine switches the
device between them. This is the one place that decides where things live.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

import algorithms  # noqa: F401  (registers the built-in algorithms)
from algorithms.base import get_algorithm
from core import dist
from core.curriculum import CurriculumStream, difficulty_levels, length_levels
from core.data import PROMPT_FIELDS, PromptDataset, PromptStream, collate_prompts, read_prompts
from core.graph import Graph, Plan, as_plan
from core.hybrid import HybridEngine
from core.offload import MemoryHandoff
from core.models import ModelConfig, build_model, dtype_of, load_tokenizer, shard_model
from core.tasks import Task, build_task, char_tokenizer
from launch.config import JobConfig
from roles.actor import Actor
from roles.critic import Critic, ValueModel
from roles.reference import Reference
from roles.reward import Reward
from roles.rollout import Rollout

logger = logging.getLogger(__name__)


@dataclass
class Job:
    cfg: JobConfig
    tokenizer: Any
    task: Task
    plan: Plan
    roles: dict[str, Any]
    hybrid: HybridEngine
    stream: PromptStream | CurriculumStream

    @property
    def graph(self) -> Graph:
        return self.plan.train


def build_plan(cfg: JobConfig) -> Plan:
    """The algorithm's stages and training graph, each validated before anything is built."""
    algorithm = get_algorithm(cfg.algorithm.name)
    if not isinstance(cfg.algorithm, algorithm.config):
        raise TypeError(f"algorithm {cfg.algorithm.name!r} takes a {algorithm.config.__name__}, "
                        f"got {type(cfg.algorithm).__name__}")
    plan = as_plan(algorithm.build(cfg.algorithm))
    for graph in plan.graphs():
        graph.validate(PROMPT_FIELDS)
    return plan


def build_job(cfg: JobConfig) -> Job:
    info = dist.info()
    plan = build_plan(cfg)
    tokenizer = load_tokenizer(cfg.model) or char_tokenizer()
    task = load_prompts(cfg, tokenizer)
    if cfg.data.prompts_per_step % info.world_size:
        raise ValueError(f"data.prompts_per_step={cfg.data.prompts_per_step} is not divisible by "
                         f"the world size {info.world_size}")
    dataset = PromptDataset(task.train, tokenizer, max_prompt_len=cfg.data.max_prompt_len)
    stream_kwargs = dict(batch_size=cfg.data.prompts_per_step // info.world_size, rank=info.rank,
                         world_size=info.world_size, seed=cfg.run.seed, pad_id=tokenizer.pad_token_id,
                         shuffle=cfg.data.shuffle)
    roles = build_roles(cfg, plan.roles(), tokenizer)
    trained = [r for r in (roles["actor"], roles.get("critic")) if r is not None]
    handoff = MemoryHandoff(optimizers=[r.train_state.optimizer for r in trained], modules=[r.model for r in trained],
                            device=info.device, offload_optimizer=cfg.hybrid.offload_optimizer,
                            offload_params=cfg.hybrid.offload_params)
    hybrid = HybridEngine(cfg.hybrid, actor=roles["actor"], rollout=roles["rollout"],
                          engine_dtype=dtype_of(cfg.rollout.dtype), device=info.device, handoff=handoff)
    cur = cfg.data.curriculum
    if cur.kind == "none":
        stream: PromptStream | CurriculumStream = PromptStream(dataset, **stream_kwargs)
    else:
        levels = (length_levels(dataset, cur.stages, cumulative=cur.cumulative) if cur.kind == "length"
                  else difficulty_levels(probe_pass_rates(cfg, dataset, roles, hybrid), cur.stages))
        stream = CurriculumStream(cur, dataset, levels, **stream_kwargs)
    for graph in plan.graphs():
        graph.bind({**roles, "prompts": stream})
    return Job(cfg, tokenizer, task, plan, roles, hybrid, stream)


def probe_pass_rates(cfg: JobConfig, dataset: PromptDataset, roles: dict[str, Any],
                     hybrid: HybridEngine) -> list[float]:
    """The initial policy's pass rate on each prompt, from curriculum.probe_n samples (each rank
    probes its share; seeded, so a resumed run probes identically). -1 marks unprobed prompts."""
    info = dist.info()
    hybrid.sync_weights(force=True)
    n, rollout = cfg.data.curriculum.probe_n, roles["rollout"]
    mine = list(range(info.rank, len(dataset), info.world_size))
    rates: dict[int, float] = {}
    for start in range(0, len(mine), cfg.eval.batch_size):
        chunk = mine[start:start + cfg.eval.batch_size]
        prompts = collate_prompts([dataset[i] for i in chunk], pad_id=rollout.tokenizer.pad_token_id)
        out = rollout.generate(prompts.to(info.device), rollout.sampling(n=n, seed=cfg.run.seed + start))
        scores = roles["reward"].score(out).value.reshape(len(chunk), n).mean(-1)
        rates.update(zip(chunk, scores.tolist()))
    merged = {k: v for part in dist.all_gather_objects(rates) for k, v in part.items()}
    logger.info("difficulty probe: %d prompts x %d samples; %d with 0 < pass rate < 1", len(merged), n,
                sum(0 < p < 1 for p in merged.values()))
    return [merged.get(i, -1.0) for i in range(len(dataset))]


def value_model(cfg: JobConfig, vocab: int) -> ValueModel:
    """The critic: the policy's (or critic.model_path's) backbone plus a value head, FSDP2-sharded."""
    source = dataclasses.replace(cfg.model, path=cfg.critic.model_path) if cfg.critic.model_path else cfg.model
    model = ValueModel(build_model(source, vocab_size=vocab, seed=cfg.run.seed),
                       head_init_std=cfg.critic.head_init_std, seed=cfg.run.seed)
    param_dtype = dtype_of(cfg.critic.param_dtype)
    model = shard_model(model, dist.mesh(), param_dtype=None if param_dtype == torch.float32 else param_dtype)
    return model.to(dist.info().device)


def load_prompts(cfg: JobConfig, tokenizer) -> Task:
    """Training and held-out rows: from JSONL files when given, else the built-in task."""
    task = build_task(cfg.data.task) if not (cfg.data.train_files and cfg.data.eval_files) else None
    train = ([r for f in cfg.data.train_files for r in read_prompts(f, cfg.data.format, tokenizer)]
             if cfg.data.train_files else task.train)
    held_out = ([r for f in cfg.data.eval_files for r in read_prompts(f, cfg.data.format, tokenizer)]
                if cfg.data.eval_files else task.eval)
    return Task(cfg=cfg.data.task, train=train, eval=held_out)


def engine_model(model: ModelConfig, rollout: Rollout.Config, vocab: int, seed: int):
    """The rollout engine's own copy of the policy; None for sglang, which loads model.path."""
    if rollout.engine == "sglang":
        return None
    return build_model(model, vocab_size=vocab, seed=seed)


def build_roles(cfg: JobConfig, used: set[str], tokenizer) -> dict[str, Any]:
    """The actor, rollout and reward always (training, syncing, evaluating need them); the
    reference and any other role only when a node uses it."""
    info = dist.info()
    known = {"actor", "rollout", "reward", "reference", "critic"}
    if used - known:
        raise ValueError(f"the graph uses roles {sorted(used - known)}, which this build cannot "
                         f"place (known: {sorted(known)})")
    # Sampling temperature 0 (greedy) trains on the untempered distribution.
    temperature = cfg.rollout.temperature or 1.0
    vocab = len(tokenizer)
    param_dtype = dtype_of(cfg.actor.param_dtype)

    def policy() -> torch.nn.Module:
        model = build_model(cfg.model, vocab_size=vocab, seed=cfg.run.seed)
        model = shard_model(model, dist.mesh(), param_dtype=None if param_dtype == torch.float32
                            else param_dtype)
        return model.to(info.device)

    roles: dict[str, Any] = {
        "actor": Actor(cfg.actor, policy(), total_steps=cfg.run.steps, temperature=temperature),
        "rollout": Rollout.build(cfg.rollout, engine_model(cfg.model, cfg.rollout, vocab, cfg.run.seed),
                                 tokenizer, device=info.device, seed=cfg.run.seed, rank=info.rank,
                                 dtype=dtype_of(cfg.rollout.dtype), model_path=cfg.model.path),
        "reward": Reward(cfg.reward, device=info.device),
    }
    if "reference" in used:
        roles["reference"] = Reference(cfg.reference, policy(), temperature=temperature)
    if "critic" in used:
        roles["critic"] = Critic(cfg.critic, value_model(cfg, vocab), total_steps=cfg.run.steps)
    logger.info("built roles: %s", ", ".join(sorted(roles)))
    return roles
