"""Stateful environments a multi-turn rollout talks to (issue #18).

An environment is a small class: `reset(row)` starts an episode for one sample (`row` holds
the prompt's `prompt`, `ground_truth` and `data_source`), and `step(action)` takes the text of
one sampled turn and returns `(observation, reward, done)`. Each sample gets its own instance,
built with `rollout.tools.env_kwargs`. Register one by name, or name it by import path
("package.module:Class") in YAML, as with tools and algorithms:

    @ENVIRONMENTS.register("echo")
    class Echo:
        def reset(self, row): self.answer = row["ground_truth"]
        def step(self, action): return "again", float(self.answer in action), self.answer in action

In the rollout (roles/rollout/multiturn.py) a turn that holds tool calls is answered by the
tools; any other turn goes to the environment. Until it says done, its observation is appended
like a tool's, and the model goes on. The rewards of a sample's steps are summed into
`env_reward`, which the reward role adds to the scorer's score (`reward.env_weight`) and logs
separately. An environment that raises, runs past `rollout.tools.timeout_s` or returns
something else than `(str, number, bool)` ends that sample's episode with the rewards it had
given (counted `env/error`, `env/timeout`); training goes on.

Built in: `guess_number`, find the hidden integer (the row's ground truth) from the answers
"higher" and "lower".
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Protocol

from core.registry import Registry


class Environment(Protocol):
    def reset(self, row: dict[str, Any]) -> None:
        """Start the episode of one sample."""

    def step(self, action: str) -> tuple[str, float, bool]:
        """The sampled turn's text in; (observation, reward, done) out."""


ENVIRONMENTS: Registry[Callable[..., Environment]] = Registry("environment", importable=True)


def checked_step(env: Environment, action: str) -> tuple[str, float, bool]:
    """env.step(action), with its result checked (TypeError names what came back instead)."""
    out = env.step(action)
    if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[0], str)
            and isinstance(out[1], (int, float)) and not isinstance(out[1], bool) and math.isfinite(out[1])):
        raise TypeError(f"step() must return (observation: str, reward: finite number, done: bool), got {out!r:.200}")
    return out[0], float(out[1]), bool(out[2])


@ENVIRONMENTS.register("guess_number")
class GuessNumber:
    """Find the hidden integer (the row's ground truth): each turn's last integer is a guess,
    answered "higher" or "lower"; the right one scores `reward` and ends the episode. A turn
    without a number is answered "say a number"."""

    def __init__(self, *, reward: float = 1.0) -> None:
        self.reward = reward
        self.target = 0

    def reset(self, row: dict[str, Any]) -> None:
        self.target = int(row["ground_truth"])

    def step(self, action: str) -> tuple[str, float, bool]:
        numbers = re.findall(r"-?\d+", action)
        if not numbers:
            return "say a number", 0.0, False
        guess = int(numbers[-1])
        if guess == self.target:
            return "correct", self.reward, True
        return ("higher" if guess < self.target else "lower"), 0.0, False
