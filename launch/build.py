"""Placement: build the graph, then only the roles it uses, on this process's device.

Every process builds every role the graph names (SPMD); the actor and reference are FSDP2-sharded
over all processes, the rollout engine holds a full copy (or SGLang loads model.path), and the
hybrid engine switches the device between them. This is the one place that decides where things
live; `build_policy` is the one way a trained policy is made (RL and SFT).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

import algorithms  # noqa: F401  (registers the built-in algorithms)
from algorithms import off_policy
from algorithms.base import OffPolicy, get_algorithm
from core import dist
from core.curriculum import CurriculumStream, difficulty_levels, length_levels
from core.data import PROMPT_FIELDS, PromptDataset, PromptRow, PromptStream, read_prompts
from core.graph import PROMPTS, Graph, Plan, as_plan
from core.hybrid import HybridEngine
from core.lora import LoraConfig, apply_lora
from core.models import ModelConfig, build_model, dtype_of, load_tokenizer, shard_model
from core.offload import MemoryHandoff
from launch.config import JobConfig
from launch.evaluate import probe_pass_rates
from launch.tasks import Task, build_task, char_tokenizer
from roles.actor import Actor
from roles.critic import Critic, ValueModel
from roles.reference import Reference
from roles.reward import Reward
from roles.reward.role import has_scorer
from roles.rollout import Rollout
from roles.rollout.buffer import RolloutBuffer
from roles.rollout.tools import tool_schemas

logger = logging.getLogger(__name__)


@dataclass
class Roles:
    """The built roles of a job; the reference and the critic only when the graph uses them."""
    actor: Actor
    rollout: Rollout
    reward: Reward
    reference: Reference | None = None
    critic: Critic | None = None

    def named(self) -> dict[str, Any]:
        """Role name -> role, for the built ones (what a graph binds)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @property
    def trained(self) -> list[Actor | Critic]:
        return [r for r in (self.actor, self.critic) if r is not None]


@dataclass
class Job:
    cfg: JobConfig
    tokenizer: Any
    task: Task
    plan: Plan
    roles: Roles
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
    plan = off_policy.rewrite(as_plan(algorithm.build(cfg.algorithm)), cfg.algorithm.off_policy)
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
    handoff = MemoryHandoff(optimizers=[r.train_state.optimizer for r in roles.trained],
                            modules=[r.model for r in roles.trained], device=info.device,
                            offload_optimizer=cfg.hybrid.offload_optimizer, offload_params=cfg.hybrid.offload_params)
    hybrid = HybridEngine(cfg.hybrid, actor=roles.actor, rollout=roles.rollout,
                          engine_dtype=dtype_of(cfg.rollout.dtype), device=info.device, handoff=handoff)
    cur = cfg.data.curriculum
    if cur.kind == "none":
        stream: PromptStream | CurriculumStream = PromptStream(dataset, **stream_kwargs)
    elif cur.kind == "length":
        stream = CurriculumStream(cur, dataset, length_levels(dataset, cur.stages, cumulative=cur.cumulative),
                                  **stream_kwargs)
    else:
        hybrid.sync_weights(force=True)
        rates = probe_pass_rates(dataset, rollout=roles.rollout, reward=roles.reward, tokenizer=tokenizer,
                                 n=cur.probe_n, batch_size=cfg.eval.batch_size,
                                 max_prompt_len=cfg.data.max_prompt_len, seed=cfg.run.seed)
        stream = CurriculumStream(cur, dataset, difficulty_levels(rates, cur.stages), **stream_kwargs)
    for graph in plan.graphs():
        graph.bind({**roles.named(), PROMPTS: stream})
    return Job(cfg, tokenizer, task, plan, roles, hybrid, stream)


def build_policy(model: ModelConfig, *, vocab: int, seed: int, param_dtype: str,
                 lora: LoraConfig | None = None) -> torch.nn.Module:
    """A trained (or reference) policy: the model, LoRA adapters if asked, FSDP2 over every
    process, on this process's device. Seeded: every rank builds identical weights."""
    module: torch.nn.Module = build_model(model, vocab_size=vocab, seed=seed)
    if lora is not None and lora.enabled:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = apply_lora(module, lora)
    dtype = dtype_of(param_dtype)
    module = shard_model(module, dist.mesh(), param_dtype=None if dtype == torch.float32 else dtype)
    return module.to(dist.info().device)


def value_model(cfg: JobConfig, vocab: int) -> ValueModel:
    """The critic: the policy's (or critic.model_path's) backbone plus a value head, FSDP2-sharded."""
    source = dataclasses.replace(cfg.model, path=cfg.critic.model_path) if cfg.critic.model_path else cfg.model
    model = ValueModel(build_model(source, vocab_size=vocab, seed=cfg.run.seed),
                       head_init_std=cfg.critic.head_init_std, seed=cfg.run.seed)
    param_dtype = dtype_of(cfg.critic.param_dtype)
    shard_model(model, dist.mesh(), param_dtype=None if param_dtype == torch.float32 else param_dtype)  # in place
    return model.to(dist.info().device)


def load_prompts(cfg: JobConfig, tokenizer: Any) -> Task:
    """Training and held-out rows: from JSONL files when given, else the built-in task."""
    task = build_task(cfg.data.task) if not (cfg.data.train_files and cfg.data.eval_files) else None
    tools = tool_schemas(cfg.rollout.tools.names)

    def read(path: str) -> list[PromptRow]:
        return read_prompts(path, cfg.data.format, tokenizer, known_source=lambda s: has_scorer(cfg.reward, s),
                            tools=tools)

    train = [r for f in cfg.data.train_files for r in read(f)]
    held_out = [r for f in cfg.data.eval_files for r in read(f)]
    if task is not None:
        train, held_out = train or task.train, held_out or task.eval
    return Task(cfg=cfg.data.task, train=train, eval=held_out)


def build_rollout(rollout: Rollout.Config, model: ModelConfig, *, vocab: int, tokenizer: Any,
                  seed: int, off: OffPolicy | None = None) -> Rollout:
    """The rollout role; its engine builds its own copy of the policy if it needs one; with
    off-policy steps (`off.max_staleness > 0`) its training stream goes through a buffer."""
    info = dist.info()
    buffer = None
    if off is not None and off.max_staleness > 0:
        buffer = RolloutBuffer(max_staleness=off.max_staleness, partial_rollouts=off.partial_rollouts,
                               in_flight=off.in_flight, stale=off.stale, n=rollout.n,
                               pad_token_id=tokenizer.pad_token_id)
    return Rollout.build(rollout, policy=lambda: build_model(model, vocab_size=vocab, seed=seed),
                         tokenizer=tokenizer, device=info.device, seed=seed, rank=info.rank,
                         dtype=dtype_of(rollout.dtype), model_path=model.path, buffer=buffer)


def build_roles(cfg: JobConfig, used: set[str], tokenizer: Any) -> Roles:
    """The actor, rollout and reward always (training, syncing, evaluating need them); the
    reference and the critic only when a node uses them."""
    known = {f.name for f in dataclasses.fields(Roles)}
    if used - known:
        raise ValueError(f"the graph uses roles {sorted(used - known)}, which this build cannot "
                         f"place (known: {sorted(known)})")
    # Sampling temperature 0 (greedy) trains on the untempered distribution.
    temperature = cfg.rollout.temperature or 1.0
    vocab = len(tokenizer)

    def policy(model: ModelConfig = cfg.model) -> torch.nn.Module:
        return build_policy(model, vocab=vocab, seed=cfg.run.seed, param_dtype=cfg.actor.param_dtype)

    roles = Roles(actor=Actor(cfg.actor, policy(), total_steps=cfg.run.steps, temperature=temperature),
                  rollout=build_rollout(cfg.rollout, cfg.model, vocab=vocab, tokenizer=tokenizer, seed=cfg.run.seed,
                                        off=cfg.algorithm.off_policy),
                  reward=Reward(cfg.reward, device=dist.info().device, environment=cfg.rollout.tools.env is not None))
    if "reference" in used:
        roles.reference = Reference(cfg.reference, policy(cfg.reference.source(cfg.model)), temperature=temperature)
    if "critic" in used:
        roles.critic = Critic(cfg.critic, value_model(cfg, vocab), total_steps=cfg.run.steps)
    logger.info("built roles: %s", ", ".join(sorted(roles.named())))
    return roles
