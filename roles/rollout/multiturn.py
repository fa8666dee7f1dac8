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
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch

from core.config import at_least
from roles.reward.sandbox import SandboxConfig
from roles.rollout.engine import Engine, Request, SamplingParams, batch_requests
from roles.rollout.tools import Observation, ToolSet, parse_arguments


@dataclass(kw_only=True, slots=True)
class ToolsConfig:
    names: list[str] = field(default_factory=list)
    """Tools the policy may call (built in: calculator, python; or "package.module:function");
    empty: single-turn rollouts."""
    format: Literal["hermes", "plain"] = "hermes"
    """How calls and observations are written (module docstring)."""
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

    def __post_init__(self) -> None:
        at_least(self, 1, "max_calls", "max_observation_tokens", "max_observation_chars")
        at_least(self, 0.001, "timeout_s")


def tool_stops(cfg: ToolsConfig) -> list[str]:
    """The stop strings the configured format adds to `rollout.stop` (plain: `]`)."""
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
        params = [p for p in tools.parameters(name) if p != "sandbox"]
        return [(name, {params[0]: arg})] if params else [(name, {})]

    def render(self, observations: list[Observation]) -> str:
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

    def render(self, observations: list[Observation]) -> str:
        messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": self.MARK}]
        messages += [{"role": "tool", "content": o.text} for o in observations]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        delta = text[text.index(self.MARK) + len(self.MARK):]
        # the sampled turn already ended with the end-of-turn token; what follows it (the
        # separator, the tool messages, the next assistant header) is the observation
        return delta[len(self.eot):] if self.eot and delta.startswith(self.eot) else delta


# --------------------------------------------------------------------------- the rollout


@dataclass
class _Sample:
    request: Request
    tokens: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    observed: list[int] = field(default_factory=list)
    """1 where the token is an observation's."""
    turn_start: int = 0
    calls: int = 0
    finish: str = "stop"


@dataclass(frozen=True, slots=True)
class MultiTurnOutput:
    response_ids: torch.Tensor      # [N, R] long, right-padded
    response_mask: torch.Tensor     # [N, R] 1 on sampled tokens
    observation_mask: torch.Tensor  # [N, R] 1 on observation tokens
    logp: torch.Tensor              # [N, R] float32, 0 off sampled tokens
    finish_reason: list[str]
    metrics: dict[str, float]
    """Rates (averaged over ranks): tools/calls_per_sample, tools/error_rate, ..."""
    counts: dict[str, float]
    """Events (summed over ranks): tools/calls, tools/timeout, tools/malformed, ..."""


class MultiTurn:
    """Runs the turns of a batch of samples: every turn is one engine call for all samples
    still going (so a continuous-batching engine schedules them together)."""

    def __init__(self, cfg: ToolsConfig, tokenizer: Any) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.tools = ToolSet(cfg.names, timeout_s=cfg.timeout_s, max_chars=cfg.max_observation_chars,
                             sandbox=cfg.sandbox)
        self.format: PlainFormat | HermesFormat = (PlainFormat(list(self.tools.tools)) if cfg.format == "plain"
                                                   else HermesFormat(tokenizer))

    def generate(self, engine: Engine, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 sampling: SamplingParams, pad_token_id: int) -> MultiTurnOutput:
        samples = [_Sample(r) for r in batch_requests(prompt_ids, prompt_mask, sampling)]
        budget = sampling.max_new_tokens
        active = list(range(len(samples)))
        counts = {"calls": 0, "error": 0, "malformed": 0, "unknown": 0, "timeout": 0, "over_limit": 0}
        turns = 0
        while active:
            turns += 1
            requests = [Request(s.request.prompt, s.request.sampling, prefix=tuple(s.tokens))
                        for s in (samples[i] for i in active)]
            completions = engine.generate_requests(requests)
            pending: list[tuple[int, list[Call | Observation]]] = []
            for i, c in zip(active, completions):
                s = samples[i]
                s.turn_start = len(s.tokens)
                s.tokens += c.tokens
                s.logp += c.logp
                s.observed += [0] * len(c.tokens)
                if c.finish_reason == "length" or len(s.tokens) >= budget:
                    s.finish = "length"
                    continue
                turn = self.tokenizer.decode(s.tokens[s.turn_start:], skip_special_tokens=False)
                calls = self.format.calls(turn, self.tools)
                if not calls:
                    continue
                if s.calls + len(calls) > self.cfg.max_calls:
                    counts["over_limit"] += 1
                    continue
                s.calls += len(calls)
                pending.append((i, calls))
            active = []
            answered = self._run_calls([c for _, calls in pending for c in calls])
            for i, calls in pending:
                observations, answered = answered[:len(calls)], answered[len(calls):]
                counts["calls"] += len(observations)
                for o in observations:
                    if o.status != "ok":
                        counts[o.status] += 1
                ids = self.tokenizer.encode(self.format.render(observations), add_special_tokens=False)
                ids = ids[:self.cfg.max_observation_tokens]
                s = samples[i]
                room = budget - len(s.tokens) - 1  # at least one sampled token must follow
                if room < len(ids):
                    s.tokens += ids[:max(room, 0)]
                    s.logp += [0.0] * max(room, 0)
                    s.observed += [1] * max(room, 0)
                    s.finish = "length"
                    continue
                s.tokens += ids
                s.logp += [0.0] * len(ids)
                s.observed += [1] * len(ids)
                active.append(i)
        return self._tensors(samples, pad_token_id, counts, turns, device=prompt_ids.device)

    def _run_calls(self, calls: list[Call | Observation]) -> list[Observation]:
        """Every call of a turn, concurrently (a sandboxed program waits on its process, not on
        the interpreter), in order; an Observation (a malformed call) passes through."""
        todo = [c for c in calls if not isinstance(c, Observation)]
        if not todo:
            return [c for c in calls if isinstance(c, Observation)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, len(todo))) as pool:
            done = iter(list(pool.map(lambda c: self.tools.call(*c), todo)))
        return [c if isinstance(c, Observation) else next(done) for c in calls]

    @staticmethod
    def _tensors(samples: list[_Sample], pad_token_id: int, counts: dict[str, int], turns: int, *,
                 device: torch.device) -> MultiTurnOutput:
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
        calls = counts["calls"]
        failed = counts["error"] + counts["malformed"] + counts["unknown"] + counts["timeout"]
        metrics = {"tools/calls_per_sample": calls / max(N, 1),
                   "tools/error_rate": failed / calls if calls else 0.0,
                   "tools/turns": float(turns),
                   "tools/observation_tokens_per_sample": float(observed.sum()) / max(N, 1)}
        return MultiTurnOutput(ids.to(device), sampled.to(device), observed.to(device), logp.to(device),
                               [s.finish for s in samples], metrics,
                               {f"tools/{k}": float(v) for k, v in counts.items()})
