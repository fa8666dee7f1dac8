"""The rollout role: prompts in, sampled responses (ids, text, log-probs) out, via an engine.

The engine is the `rollout.engine` slot's choice (roles/rollout/engine.py): its Config builds
it. The role is the hybrid engine's weight sink: every call reaches the engine's own method.
With `algorithm.off_policy.max_staleness > 0` the training stream goes through the role's
rollout buffer (roles/rollout/buffer.py: partial rollouts, bounded staleness); evaluation and
any call with explicit sampling parameters stay synchronous.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
from transformers import PreTrainedModel

from core.batch import Batch
from core.config import RangeError, above, at_least, between
from core.graph import Phase, Result
from roles.rollout import sglang_engine, torch_engine  # noqa: F401  (register the engines)
from roles.rollout.buffer import RolloutBuffer
from roles.rollout.engine import Engine, EngineConfig, EngineContext, Generation, SamplingParams, to_generation
from roles.rollout.multiturn import MultiTurn, ToolsConfig, tool_stops

logger = logging.getLogger(__name__)


class Rollout:
    phase: ClassVar[Phase] = Phase.GENERATE

    @dataclass(kw_only=True, slots=True)
    class Config:
        engine: EngineConfig = field(default_factory=torch_engine.TorchEngineConfig)
        """The inference engine and its options: "torch" (built in; CPU and GPU; static KV cache,
        compiled decode) or "sglang" (GPU; pip install 'rolegraph[sglang]'), e.g.
        rollout.engine=sglang rollout.engine.tp_size=2."""
        n: int = 8
        """Samples per prompt (the GRPO group size)."""
        temperature: float = 1.0
        top_p: float = 1.0
        top_k: int = 0
        """0 disables top-k."""
        max_new_tokens: int = 16
        stop: list[str] = field(default_factory=list)
        """Extra stop tokens (each must be one token of the vocabulary); EOS always stops."""
        dtype: str = "float32"
        """Engine weight dtype; actor weights are cast to it at every sync."""
        tools: ToolsConfig = field(default_factory=ToolsConfig)
        """Multi-turn rollouts with tool calls (roles/rollout/multiturn.py); off without names."""

        def __post_init__(self) -> None:
            at_least(self, 1, "n", "max_new_tokens")
            at_least(self, 0, "temperature", "top_k")
            above(self, 0, "top_p")
            between(self, 0, 1, "top_p")
            if self.dtype not in ("float32", "bfloat16", "float16"):
                raise RangeError("dtype", "one of float32, bfloat16, float16", self.dtype)

    def __init__(self, cfg: Config, engine: Engine, tokenizer: Any, *, seed: int, rank: int,
                 buffer: RolloutBuffer | None = None) -> None:
        self.cfg = cfg
        self.engine = engine
        self.tokenizer = tokenizer
        self.stop_token_ids = stop_ids(tokenizer, cfg.stop + tool_stops(cfg.tools))
        self.multiturn = MultiTurn(cfg.tools, tokenizer) if cfg.tools.multi_turn else None
        """Tool calls and environment steps between turns (None: one response per sample)."""
        if self.multiturn is not None and buffer is not None:
            raise ValueError("multi-turn rollouts (rollout.tools.names, rollout.tools.env) run synchronously: set "
                             "algorithm.off_policy.max_staleness=0")
        if self.multiturn is not None and type(engine).generate_requests is Engine.generate_requests:
            raise ValueError(f"multi-turn tool rollouts continue requests turn by turn: the engine "
                             f"{type(engine).__name__} implements only the batch generate(), not generate_requests()")
        self._seed = seed
        self._rank = rank
        self.calls = 0
        """Number of generate() calls so far; part of the sampling seed (and of resume state)."""
        self.max_new_tokens = cfg.max_new_tokens
        """The response budget now (a length curriculum changes it between steps; the config
        keeps the value it was given)."""
        self.buffer = buffer
        """Off-policy steps: the training stream's in-flight groups (None: synchronous)."""
        self.policy_version = 0
        """Weight updates the engine received (a forced re-send of the same weights is not one)."""
        self._synced_actor_version: int | None = None

    @classmethod
    def build(cls, cfg: Config, *, policy: Callable[[], PreTrainedModel], tokenizer: Any,
              device: torch.device, seed: int, rank: int, dtype: torch.dtype,
              model_path: str | None = None, buffer: RolloutBuffer | None = None) -> Rollout:
        """The configured engine: `policy()` builds its own copy of the policy where the engine
        needs one (torch); sglang starts from the folder `model_path` instead."""
        ctx = EngineContext(policy=policy, model_path=model_path, pad_token_id=tokenizer.pad_token_id,
                            stop_token_ids=stop_ids(tokenizer, cfg.stop + tool_stops(cfg.tools)),
                            device=device, dtype=dtype,
                            seed=seed)
        return cls(cfg, cfg.engine.build(ctx), tokenizer, seed=seed, rank=rank, buffer=buffer)

    def sampling(self, **overrides) -> SamplingParams:
        """The configured sampling parameters, with overrides (e.g. temperature=0 for eval)."""
        base = SamplingParams(temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                              top_k=self.cfg.top_k, max_new_tokens=self.max_new_tokens,
                              n=self.cfg.n, stop_token_ids=self.stop_token_ids)
        return dataclasses.replace(base, **overrides)

    def generate(self, batch: Batch, sampling: SamplingParams | None = None, *,
                 prompts: Iterator[Batch] | None = None) -> Result:
        """Each prompt of `batch` expanded to n samples with response fields added (the value of
        the Result; metrics rollout/*, and off_policy/* from the buffer).

        Without `sampling`: the training stream (the configured parameters, a fresh seed per
        call and rank), through the rollout buffer when off-policy steps are on (`prompts` then
        tops it up). With `sampling` (evaluation): exactly those, seed included, synchronous, so
        evaluating never shifts the training stream.
        """
        if sampling is None:
            seed = (self._seed * 1_000_003 + self._rank * 10_007 + self.calls) % (2**63)
            sampling = self.sampling(seed=seed)
            self.calls += 1
            if self.buffer is not None:
                rows, completions, metrics, counts = self.buffer.generate(
                    self.engine, batch, sampling, version=self.policy_version, prompts=prompts)
                gen = to_generation(completions, self.tokenizer.pad_token_id, device=rows.prompt_ids.device)
                return Result(self._responses(rows, gen, [self.max_new_tokens] * len(completions)),
                              metrics=metrics | self._stats(), counts=counts)
        if self.multiturn is not None:
            episodes = ([{"prompt": p, "ground_truth": g, "data_source": d} for p, g, d in
                         zip(batch.prompt_text, batch.ground_truth, batch.data_source)]
                        if self.multiturn.env_factory is not None else None)
            turns = self.multiturn.generate(self.engine, batch.prompt_ids, batch.prompt_mask, sampling,
                                            self.tokenizer.pad_token_id, rows=episodes)
            rows = batch.repeat_interleave(sampling.n)
            gen = Generation(turns.response_ids, turns.response_mask, turns.logp, turns.finish_reason)
            return Result(self._responses(rows, gen, [sampling.max_new_tokens] * len(rows),
                                          observation_mask=turns.observation_mask, env_reward=turns.env_reward),
                          metrics=turns.metrics | self._stats(), counts=turns.counts)
        # the batch call: an engine that implements only generate() (not generate_requests) works
        gen = self.engine.generate(batch.prompt_ids, batch.prompt_mask, sampling)
        rows = batch.repeat_interleave(sampling.n)
        return Result(self._responses(rows, gen, [sampling.max_new_tokens] * len(rows)), metrics=self._stats())

    def _responses(self, rows: Batch, out: Generation, budgets: list[int], *,
                   observation_mask: torch.Tensor | None = None, env_reward: torch.Tensor | None = None) -> Batch:
        """The generated fields; `response_text` is the whole response (observations included:
        the transcript a scorer reads); `env_reward` 0 without an environment."""
        device = rows.prompt_ids.device
        out = Generation(out.response_ids.to(device), out.response_mask.to(device), out.logp.to(device),
                         out.finish_reason)
        observed = (torch.zeros_like(out.response_mask) if observation_mask is None
                    else observation_mask.to(device))
        real = (out.response_mask.bool() | observed.bool()).cpu()
        texts = [self.tokenizer.decode(ids[m].tolist(), skip_special_tokens=True)
                 for ids, m in zip(out.response_ids.cpu(), real)]
        return rows.with_fields(response_ids=out.response_ids, response_mask=out.response_mask,
                                observation_mask=observed, rollout_logp=out.logp, response_text=texts,
                                env_reward=(torch.zeros(len(rows), dtype=torch.float32) if env_reward is None
                                            else env_reward).to(device),
                                finish_reason=out.finish_reason,
                                response_budget=torch.tensor(budgets, dtype=torch.long, device=rows.prompt_ids.device))

    def _stats(self) -> dict[str, float]:
        """The engine's work of the last call (where it reports it): rollout/useful_token_frac."""
        stats = self.engine.work_stats()
        return {"rollout/useful_token_frac": stats["useful_frac"]} if "useful_frac" in stats else {}

    # --- the hybrid engine's weight sink: straight to the engine -----------------------------

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        return self.engine.load_weights(named_tensors)

    @property
    def needs_full_sync(self) -> bool:
        return self.engine.needs_full_sync

    def begin_weight_update(self) -> None:
        self.engine.begin_weight_update()

    def end_weight_update(self, version: int) -> None:
        """After a sync's last bucket; `version` is the actor's (optimizer steps taken)."""
        self.engine.end_weight_update(version)
        if version != self._synced_actor_version:
            self.policy_version += 1
            self._synced_actor_version = version

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    # --- checkpoint state ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"calls": self.calls, "policy_version": self.policy_version,
                                 "synced_actor_version": self._synced_actor_version}
        if self.buffer is not None:
            state["buffer"] = self.buffer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = state["calls"]
        # checkpoints written before off-policy steps existed hold only "calls"
        self.policy_version = state.get("policy_version", 0)
        self._synced_actor_version = state.get("synced_actor_version")
        if self.buffer is not None:
            self.buffer.load_state_dict(state["buffer"])

    def sharded_state(self) -> None:
        return None


def stop_ids(tokenizer: Any, extra: list[str]) -> tuple[int, ...]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for s in extra:
        tok = tokenizer.encode(s, add_special_tokens=False)
        if len(tok) != 1:
            raise ValueError(f"rollout.stop entry {s!r} is {len(tok)} tokens; each must be one token")
        ids.append(tok[0])
    if not ids:
        raise ValueError("the tokenizer has no EOS token and rollout.stop is empty: nothing stops")
    return tuple(dict.fromkeys(ids))
