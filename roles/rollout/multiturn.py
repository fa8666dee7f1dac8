"""Multi-turn rollouts with tool calls, token in and token out (issue #18).

A sample is generated turn by turn on the engine's request API: generate until the end of the
turn; if the turn holds a tool call, run the tool, append the observation's tokens and continue
the same request (`Request.prefix` is everything so far, so the engine conditions on exactly
the ids it produced and the ids of the observations; nothing is decoded and re-encoded). The
training sample is those ids:

    response_ids     [ sampled turn 1 | observation 1 | sampled turn 2 ... ]
    response_mask       1 1 ... 1       0 ... 0          1 1 ... 1 (EOS included)
    observation_mask    0 0 ... 0       1 ... 1          0 0 ... 0
    rollout_logp        engine's        0                engine's

One budget, `rollout.max_new_tokens`, bounds the whole response (observations included); an
observation is cut to `max_observation_tokens`. A malformed call, an unknown tool, a tool that
raises or times out is answered with an error observation and counted; the sample goes on.

Formats (`rollout.tools.format`):

* hermes: a turn ends at EOS (for a chat model, its end-of-turn token); `<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>` blocks in it are calls; the observations are rendered with
  the tokenizer's chat template as tool messages (the text after the assistant's end-of-turn
  token up to the next assistant header: the turn separator included). Earlier turns are never
  re-rendered, so a template that strips old reasoning cannot touch the history.
* plain (character tokenizers, the tools quickstart): a call is `[argument]` (or `[tool:argument]`
  with several tools) and ends its turn at `]`; the observation is `{result}`.
"""
from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch

from core.config import at_least
from roles.reward.sandbox import SandboxConfig
from roles.rollout.engine import Engine, Request, SamplingParams, batch_requests
from roles.rollout.environments import ENVIRONMENTS, Environment, checked_step
from roles.rollout.tools import Observation, ToolSet, parse_arguments, run_limited

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class ToolsConfig:
    names: list[str] = field(default_factory=list)
    """Tools the policy may call (built in: calculator, python; or "package.module:function");
    empty: single-turn rollouts."""
    format: Literal["hermes", "plain"] = "hermes"
    """How calls and observations are written (module docstring)."""
    env: str | None = None
    """A stateful environment that answers every turn without a tool call (built in:
    guess_number; or "package.module:Class"; roles/rollout/environments.py); its step rewards
    are the samples' env_reward. None: a turn without a call ends the sample."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the environment's constructor."""
    max_turns: int = 8
    """Sampled turns per sample at most: the last one's calls go unanswered, the environment
    still scores it (counted as tools/max_turns when a sample would have gone on)."""
    max_calls: int = 4
    """Tool calls per sample at most; a call past it ends the sample unanswered (counted)."""
    max_observation_tokens: int = 256
    """An observation's tokens at most (cut, then `...` is not added: the ids are cut)."""
    max_observation_chars: int = 2000
    """A tool's output is cut to this many characters before it is rendered."""
    timeout_s: float = 10.0
    """Wall-clock limit of one call (the python tool also has the sandbox's own limits)."""
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    """Limits of the python tool's sandbox."""

    @property
    def multi_turn(self) -> bool:
        """Whether tools or an environment are configured (otherwise one response per sample)."""
        return bool(self.names) or self.env is not None

    def __post_init__(self) -> None:
        at_least(self, 1, "max_turns", "max_calls", "max_observation_tokens", "max_observation_chars")
        at_least(self, 0.001, "timeout_s")


def tool_stops(cfg: ToolsConfig) -> list[str]:
    """The stop strings the configured format adds to `rollout.stop` (plain with tools: `]`)."""
    return [PlainFormat.stop] if cfg.names and cfg.format == "plain" else []


# --------------------------------------------------------------------------- formats


Call = tuple[str, dict[str, Any]]


class PlainFormat:
    """`[argument]` or `[tool:argument]` → `{result}`; `]` ends a turn."""
    stop = "]"

    def __init__(self, tool_names: Sequence[str]) -> None:
        self.tool_names = list(tool_names)

    def calls(self, turn: str, tools: ToolSet) -> list[Call | Observation]:
        if not turn.endswith("]"):
            return []
        body = turn[turn.rfind("[") + 1:-1] if "[" in turn else None
        if body is None:
            return [Observation("error: a call is [argument]", "malformed")]
        name, sep, arg = body.partition(":")
        if not (sep and name in self.tool_names):
            if len(self.tool_names) != 1:
                return [Observation(f"error: name the tool: [tool:argument], tools {self.tool_names}", "malformed")]
            name, arg = self.tool_names[0], body
        params = tools.parameters(name)
        return [(name, {params[0]: arg})] if params else [(name, {})]

    def render(self, observations: list[Observation], role: str = "tool") -> str:
        """Tool results and an environment's answer alike: `{text}`."""
        return "".join("{" + o.text + "}" for o in observations)


class HermesFormat:
    """`<tool_call>{json}</tool_call>` inside a turn that ends at EOS; tool messages through the
    chat template."""
    stop = None
    CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
    MARK = "\u2063assistant-turn\u2063"

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("rollout.tools.format=hermes renders observations with the tokenizer's chat "
                             "template, and this tokenizer has none (use format=plain)")
        self.tokenizer = tokenizer
        self.eot = tokenizer.decode([tokenizer.eos_token_id]) if tokenizer.eos_token_id is not None else ""

    def calls(self, turn: str, tools: ToolSet) -> list[Call | Observation]:
        out: list[Call | Observation] = []
        for body in self.CALL.findall(turn):
            try:
                call = json.loads(body)
                out.append((str(call["name"]), parse_arguments(json.dumps(call.get("arguments", {})))))
            except (ValueError, KeyError, TypeError) as e:
                out.append(Observation(f"error: malformed tool call ({e})", "malformed"))
        if not out and "<tool_call>" in turn:
            out.append(Observation("error: <tool_call> without </tool_call>", "malformed"))
        return out

    def render(self, observations: list[Observation], role: str = "tool") -> str:
        """Tool results as tool messages; an environment's answer (role user) as a user message."""
        messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": self.MARK}]
        messages += [{"role": role, "content": o.text} for o in observations]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        delta = text[text.index(self.MARK) + len(self.MARK):]
        # the sampled turn already ended with the end-of-turn token; what follows it (the
        # separator, the tool messages, the next assistant header) is the observation
        return delta[len(self.eot):] if self.eot and delta.startswith(self.eot) else delta


# --------------------------------------------------------------------------- the rollout


@dataclass
class _Sample:
    request: Request
    env: Environment | None = None
    """The sample's own episode (None: no environment, or its reset failed)."""
    tokens: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    observed: list[int] = field(default_factory=list)
    """1 where the token is an observation's."""
    turns: int = 0
    calls: int = 0
    env_steps: int = 0
    env_reward: float = 0.0
    finish: str = "stop"

    def add(self, tokens: Sequence[int], logp: Sequence[float] | None = None) -> None:
        """Sampled tokens with their log-probs, or (logp None) an observation's tokens."""
        self.tokens += tokens
        self.logp += [0.0] * len(tokens) if logp is None else logp
        self.observed += [int(logp is None)] * len(tokens)


@dataclass(frozen=True, slots=True)
class _EnvStep:
    """What the environment answered to a turn: ok, error (raised, or returned something
    else than (str, number, bool)) or timeout; only an ok step goes on."""
    observation: str
    reward: float
    done: bool
    status: str = "ok"


@dataclass(frozen=True, slots=True)
class MultiTurnOutput:
    response_ids: torch.Tensor      # [N, R] long, right-padded
    response_mask: torch.Tensor     # [N, R] 1 on sampled tokens
    observation_mask: torch.Tensor  # [N, R] 1 on observation tokens
    logp: torch.Tensor              # [N, R] float32, 0 off sampled tokens
    env_reward: torch.Tensor        # [N] float32, the sum of the environment's step rewards
    finish_reason: list[str]
    metrics: dict[str, float]
    """Rates (averaged over ranks): tools/calls_per_sample, tools/error_rate, env/reward, ..."""
    counts: dict[str, float]
    """Events (summed over ranks): tools/calls, tools/timeout, tools/malformed, env/error, ..."""


class MultiTurn:
    """Runs the turns of a batch of samples: every turn is one engine call for all samples
    still going (so a continuous-batching engine schedules them together)."""

    def __init__(self, cfg: ToolsConfig, tokenizer: Any) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.tools = ToolSet(cfg.names, timeout_s=cfg.timeout_s, max_chars=cfg.max_observation_chars,
                             sandbox=cfg.sandbox)
        self.format: PlainFormat | HermesFormat = (PlainFormat(list(self.tools.tools)) if cfg.format == "plain"
                                                   else HermesFormat(tokenizer))
        self.env_factory = ENVIRONMENTS.get(cfg.env) if cfg.env is not None else None

    def generate(self, engine: Engine, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 sampling: SamplingParams, pad_token_id: int, *,
                 rows: Sequence[dict[str, Any]] | None = None) -> MultiTurnOutput:
        """`rows` (one per prompt: prompt, ground_truth, data_source) start the environments'
        episodes; required with an environment."""
        counts = dict.fromkeys(("calls", "error", "malformed", "unknown", "timeout", "over_limit", "max_turns",
                                "env_error", "env_timeout"), 0)
        samples = [_Sample(r) for r in batch_requests(prompt_ids, prompt_mask, sampling)]
        if self.env_factory is not None:
            if rows is None or len(rows) * sampling.n != len(samples):
                raise ValueError("an environment needs one row per prompt to reset its episodes")
            for i, s in enumerate(samples):
                s.env = self._reset(rows[i // sampling.n], counts)
        budget = sampling.max_new_tokens
        active = list(range(len(samples)))
        rounds = 0
        while active:
            rounds += 1
            requests = [Request(s.request.prompt, s.request.sampling, prefix=tuple(s.tokens))
                        for s in (samples[i] for i in active)]
            pending: list[tuple[int, list[Call | Observation] | str]] = []
            for i, c in zip(active, engine.generate_requests(requests)):
                s = samples[i]
                s.add(c.tokens, c.logp)
                s.turns += 1
                if c.finish_reason == "length" or len(s.tokens) >= budget:
                    s.finish = "length"
                elif (answer := self._answer(s, c.tokens, counts)) is not None:
                    pending.append((i, answer))
            answers = self._run([a for _, a in pending], samples=[samples[i] for i, _ in pending])
            active = [i for (i, _), out in zip(pending, answers) if self._observe(samples[i], out, budget, counts)]
        return self._tensors(samples, pad_token_id, counts, rounds, env=self.env_factory is not None,
                             device=prompt_ids.device)

    def _reset(self, row: dict[str, Any], counts: dict[str, int]) -> Environment | None:
        try:
            env = self.env_factory(**self.cfg.env_kwargs)  # type: ignore[misc]
            env.reset(dict(row))
            return env
        except Exception:  # a broken environment never stops training: this sample has none
            logger.exception("environment %s failed to start an episode; the sample runs without it", self.cfg.env)
            counts["env_error"] += 1
            return None

    def _answer(self, s: _Sample, turn_ids: Sequence[int], counts: dict[str, int]
                ) -> list[Call | Observation] | str | None:
        """What answers the turn just sampled: its tool calls, or (the turn's text) the
        environment, which also scores the last turn; None: the sample ends."""
        turn = self.tokenizer.decode(list(turn_ids), skip_special_tokens=False)
        calls = self.format.calls(turn, self.tools) if self.tools.tools else []
        if calls:
            if s.turns >= self.cfg.max_turns:
                counts["max_turns"] += 1
                return None
            if s.calls + len(calls) > self.cfg.max_calls:
                counts["over_limit"] += 1
                return None
            s.calls += len(calls)
            return calls
        return turn if s.env is not None else None

    def _run(self, answers: list[list[Call | Observation] | str], *, samples: list[_Sample]
             ) -> list[list[Observation] | _EnvStep]:
        """Every tool call and environment step of a round, concurrently (a sandboxed program
        waits on its process, not on the interpreter), in order."""
        jobs: list[Callable[[], Observation | _EnvStep]] = []
        for answer, s in zip(answers, samples):
            if isinstance(answer, str):
                jobs.append(functools.partial(self._step, s, answer))
            else:
                jobs += [functools.partial(self.tools.call, *c) for c in answer if not isinstance(c, Observation)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(32, len(jobs)))) as pool:
            done = iter(list(pool.map(lambda job: job(), jobs)))
        return [next(done) if isinstance(answer, str)
                else [c if isinstance(c, Observation) else next(done) for c in answer]
                for answer in answers]

    def _step(self, s: _Sample, action: str) -> _EnvStep:
        env = s.env
        assert env is not None  # only a sample with an episode has its turns answered by it
        finished, out = run_limited(lambda: checked_step(env, action), self.cfg.timeout_s, name="env-step")
        if not finished:
            return _EnvStep("", 0.0, True, "timeout")
        if isinstance(out, Exception):
            logger.warning("environment %s step raised %s: %s; the episode ends", self.cfg.env,
                           type(out).__name__, out)
            return _EnvStep("", 0.0, True, "error")
        observation, reward, done = out
        return _EnvStep(self.tools.cut(observation), reward, done)

    def _observe(self, s: _Sample, answer: list[Observation] | _EnvStep, budget: int,
                 counts: dict[str, int]) -> bool:
        """Append the answer's observation tokens to the sample; whether it goes on."""
        if isinstance(answer, _EnvStep):
            s.env_steps += 1
            s.env_reward += answer.reward
            if answer.status != "ok":
                counts[f"env_{answer.status}"] += 1
            if answer.done:
                return False
            if s.turns >= self.cfg.max_turns:  # its last turn was scored; no more are sampled
                counts["max_turns"] += 1
                return False
            text = self.format.render([Observation(answer.observation)], role="user")
        else:
            counts["calls"] += len(answer)
            for o in answer:
                if o.status != "ok":
                    counts[o.status] += 1
            text = self.format.render(answer)
        ids = self.tokenizer.encode(text, add_special_tokens=False)[:self.cfg.max_observation_tokens]
        room = max(budget - len(s.tokens) - 1, 0)  # at least one sampled token must follow
        s.add(ids[:room])
        if room < len(ids):
            s.finish = "length"
            return False
        return True

    @staticmethod
    def _tensors(samples: list[_Sample], pad_token_id: int, counts: dict[str, int], rounds: int, *,
                 env: bool, device: torch.device) -> MultiTurnOutput:
        N = len(samples)
        R = max((len(s.tokens) for s in samples), default=0) or 1
        ids = torch.full((N, R), pad_token_id, dtype=torch.long)
        sampled = torch.zeros((N, R), dtype=torch.long)
        observed = torch.zeros((N, R), dtype=torch.long)
        logp = torch.zeros((N, R), dtype=torch.float32)
        for i, s in enumerate(samples):
            n = len(s.tokens)
            ids[i, :n] = torch.tensor(s.tokens, dtype=torch.long)
            obs = torch.tensor(s.observed, dtype=torch.long)
            observed[i, :n], sampled[i, :n] = obs, 1 - obs
            logp[i, :n] = torch.tensor(s.logp, dtype=torch.float32)
        env_reward = torch.tensor([s.env_reward for s in samples], dtype=torch.float32)
        calls = counts["calls"]
        failed = counts["error"] + counts["malformed"] + counts["unknown"] + counts["timeout"]
        metrics = {"tools/calls_per_sample": calls / max(N, 1),
                   "tools/error_rate": failed / calls if calls else 0.0,
                   "tools/turns": float(rounds),
                   "tools/observation_tokens_per_sample": float(observed.sum()) / max(N, 1)}
        events = {f"tools/{k}": float(v) for k, v in counts.items() if not k.startswith("env_")}
        if env:
            metrics |= {"env/reward": float(env_reward.double().mean()) if N else 0.0,
                        "env/steps_per_sample": sum(s.env_steps for s in samples) / max(N, 1)}
            events |= {"env/error": float(counts["env_error"]), "env/timeout": float(counts["env_timeout"])}
        return MultiTurnOutput(ids.to(device), sampled.to(device), observed.to(device), logp.to(device),
                               env_reward.to(device), [s.finish for s in samples], metrics, events)
