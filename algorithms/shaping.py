"""Reward shaping: from scorer output (`scores`, 1 = correct) to the `rewards` an algorithm
trains on. Each term is logged apart (`reward/correctness`, `reward/overlong`,
`reward/exploration`) so shaping never hides how often the model is right.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from core.config import at_least, between
from core.graph import Result


@dataclass(kw_only=True, slots=True)
class RewardShaping:
    correct: float = 1.0
    """Reward for score 1; a score s in [0, 1] maps to wrong + s * (correct - wrong)."""
    wrong: float = 0.0
    truncated: float | None = None
    """Reward of a response cut by the length budget, whatever its score (ORZ: 0); None: as scored."""
    overlong_buffer_frac: float = 0.0
    """DAPO soft overlong punishment: buffer L_cache as a fraction of max_new_tokens (0 = off)."""
    overlong_penalty: float = 1.0
    """Scale of the soft overlong punishment (-penalty at L_max)."""
    exploration_coef: float = 0.0
    """RLSP exploration term: + coef * response length / max_new_tokens."""
    format_regex: str | None = None
    """Format term: a regex the whole response must match (re.DOTALL), e.g.
    "<think>.*</think>\\s*<answer>.*</answer>"; None: no format term."""
    format_bonus: float = 0.0
    """Added when the response matches format_regex."""
    format_penalty: float = 0.0
    """Added (use a negative value) when it does not."""

    def __post_init__(self) -> None:
        between(self, 0, 1, "overlong_buffer_frac")
        at_least(self, 0, "overlong_penalty")


def overlong_punishment(lengths_B: torch.Tensor, *, max_len: int | torch.Tensor,
                        buffer: int | torch.Tensor) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 if len <= L_max - L_cache; ((L_max - L_cache) - len) /
    L_cache inside the buffer; -1 past L_max. L_max and L_cache are scalars or per sample [B];
    a buffer of 0 turns the term off."""
    lengths = lengths_B.double()
    max_len_B = torch.as_tensor(max_len, dtype=torch.float64, device=lengths.device).expand_as(lengths)
    buffer_B = torch.as_tensor(buffer, dtype=torch.float64, device=lengths.device).expand_as(lengths)
    start_B = max_len_B - buffer_B
    inside = (start_B - lengths) / buffer_B.clamp(min=1.0)
    out = torch.where(lengths <= start_B, torch.zeros_like(lengths), inside)
    out = torch.where(lengths > max_len_B, torch.full_like(lengths, -1.0), out)
    return torch.where(buffer_B > 0, out, torch.zeros_like(lengths))


def format_term(texts: list[str], cfg: RewardShaping) -> torch.Tensor:
    """[B]: format_bonus where the response matches format_regex, else format_penalty."""
    if cfg.format_regex is None:
        return torch.zeros(len(texts), dtype=torch.float64)
    pattern = re.compile(cfg.format_regex, re.DOTALL)
    return torch.tensor([cfg.format_bonus if pattern.fullmatch(t.strip()) else cfg.format_penalty
                         for t in texts], dtype=torch.float64)


def shape_rewards(scores_B: torch.Tensor, response_mask_BR: torch.Tensor, finish_reason: list[str],
                  response_text: list[str], response_budget_B: torch.Tensor, *, cfg: RewardShaping) -> Result:
    """rewards [B] float32 from scores, lengths and format, with each term as a metric; the
    length terms are relative to each sample's own budget (max_new_tokens when generated)."""
    max_len = response_budget_B.to(device=scores_B.device, dtype=torch.float64)
    lengths_B = response_mask_BR.sum(-1)
    base = cfg.wrong + scores_B.double() * (cfg.correct - cfg.wrong)
    if cfg.truncated is not None:
        cut = torch.tensor([r == "length" for r in finish_reason], device=base.device)
        base = torch.where(cut, torch.full_like(base, cfg.truncated), base)
    overlong = cfg.overlong_penalty * overlong_punishment(
        lengths_B, max_len=max_len, buffer=torch.round(cfg.overlong_buffer_frac * max_len))
    explore = cfg.exploration_coef * lengths_B.double() / max_len
    fmt = format_term(response_text, cfg).to(base.device)
    rewards = (base + overlong + explore + fmt).float()
    return Result(rewards, metrics={"reward/correctness": float(scores_B.double().mean()),
                                    "reward/overlong": float(overlong.mean()),
                                    "reward/exploration": float(explore.mean()),
                                    "reward/format": float(fmt.mean())})
