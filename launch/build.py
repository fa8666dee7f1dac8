"""Placement: build the graph, then only the roles it uses, on this process's device.

Every process builds every role the graph names (SPMD); the actor and reference are FSDP2-sharded
over all processes, the rollout engine holds a full copy, and the hybrid engine switches the
device between them. This is the one place that decides where things live.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

import algorithms  # noqa: F401  (registers the built-in algorithms)
from algorithms.base import get_algorithm
from core import dist
from core.data import PROMPT_FIELDS, PromptDataset, PromptStream, read_jsonl
from core.graph import Graph, Node
from core.hybrid import HybridEngine
from core.models import build_model, dtype_of, load_tokenizer, shard_model
from core.tasks import Task, build_task, char_tokenizer
from launch.config import JobConfig
from roles.actor import Actor
from roles.reference import Reference
from roles.reward import Reward
from roles.rollout import Rollout

logger = logging.getLogger(__name__)


@dataclass
class Job:
    cfg: JobConfig
    tokenizer: Any
    task: Task
    graph: Graph
    order: list[Node]
    roles: dict[str, Any]
    hybrid: HybridEngine
    stream: PromptStream


def build_graph(cfg: JobConfig) -> Graph:
    graph = get_algorithm(cfg.algorithm.name)(cfg)
    graph.validate(PROMPT_FIELDS)
    return graph


def build_job(cfg: JobConfig) -> Job:
    info = dist.info()
    graph = build_graph(cfg)
    tokenizer = load_tokenizer(cfg.model) or char_tokenizer()
    task = load_prompts(cfg, tokenizer)
    roles = build_roles(cfg, graph.roles(), tokenizer)
    graph.bind(roles)
    hybrid = HybridEngine(cfg.hybrid, actor=roles["actor"], rollout=roles["rollout"],
                          engine_dtype=dtype_of(cfg.rollout.dtype), device=info.device)
    if cfg.data.prompts_per_step % info.world_size:
        raise ValueError(f"data.prompts_per_step={cfg.data.prompts_per_step} is not divisible by "
                         f"the world size {info.world_size}")
    dataset = PromptDataset(task.train, tokenizer, max_prompt_len=cfg.data.max_prompt_len)
    stream = PromptStream(dataset, batch_size=cfg.data.prompts_per_step // info.world_size,
                          rank=info.rank, world_size=info.world_size, seed=cfg.run.seed,
                          pad_id=tokenizer.pad_token_id, shuffle=cfg.data.shuffle)
    return Job(cfg, tokenizer, task, graph, graph.order(PROMPT_FIELDS), roles, hybrid, stream)


def load_prompts(cfg: JobConfig, tokenizer) -> Task:
    """Training and held-out rows: from JSONL files when given, else the built-in task."""
    task = build_task(cfg.data.task) if not (cfg.data.train_files and cfg.data.eval_files) else None
    train = ([r for f in cfg.data.train_files for r in read_jsonl(f, cfg.data.format, tokenizer)]
             if cfg.data.train_files else task.train)
    held_out = ([r for f in cfg.data.eval_files for r in read_jsonl(f, cfg.data.format, tokenizer)]
                if cfg.data.eval_files else task.eval)
    return Task(cfg=cfg.data.task, train=train, eval=held_out)


def build_roles(cfg: JobConfig, used: set[str], tokenizer) -> dict[str, Any]:
    """The actor, rollout and reward always (training, syncing, evaluating need them); the
    reference and any other role only when a node uses it."""
    info = dist.info()
    known = {"actor", "rollout", "reward", "reference"}
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
        "rollout": Rollout.build(cfg.rollout, build_model(cfg.model, vocab_size=vocab, seed=cfg.run.seed),
                                 tokenizer, device=info.device, seed=cfg.run.seed, rank=info.rank,
                                 dtype=dtype_of(cfg.rollout.dtype)),
        "reward": Reward(cfg.reward, device=info.device),
    }
    if "reference" in used:
        roles["reference"] = Reference(cfg.reference, policy(), temperature=temperature)
    logger.info("built roles: %s", ", ".join(sorted(roles)))
    return roles
