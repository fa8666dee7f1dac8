"""Advantage estimators: pure tensor functions (formulas in ALGORITHMS.md, "Advantages").

Conventions for every function here: B sequences, R response tokens; `mask_BR` is 0/1 (any
dtype) marking real response tokens, a prefix of each row (padding after the end). The
sequence-level reward sits on the last real response token. `values_BR[b, t]` is V(s_t), the
critic's value of the state before response token t. Outputs are float32, zero at masked
positions and NaN-free, also for rows with no real token.
"""
from __future__ import annotations

import torch
import torch.distributed as torch_dist

from core import dist


def group_stats(values_B: torch.Tensor, group_ids_B: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (group mean, unbiased group std, group size), each [B].

    A group of one has std 0. Groups are identified by equal ids; they need not be contiguous.
    """
    _, inv_B = torch.unique(group_ids_B, return_inverse=True)
    G = int(inv_B.max()) + 1 if len(inv_B) else 0
    v = values_B.double()
    count_G = torch.zeros(G, dtype=torch.float64, device=v.device).index_add_(0, inv_B, torch.ones_like(v))
    mean_G = torch.zeros_like(count_G).index_add_(0, inv_B, v) / count_G
    dev_B = v - mean_G[inv_B]
    var_G = torch.zeros_like(count_G).index_add_(0, inv_B, dev_B**2) / (count_G - 1).clamp(min=1)
    return mean_G[inv_B], var_G.sqrt()[inv_B], count_G[inv_B]


def grpo_advantages(rewards_B: torch.Tensor, group_ids_B: torch.Tensor,
                    response_mask_BR: torch.Tensor, *, norm_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean_g) / (std_g + eps), unbiased std; without norm_std (Dr. GRPO)
    A_i = r_i - mean_g. A group of one gets 0. Broadcast over the response tokens: [B, R]."""
    mean_B, std_B, count_B = group_stats(rewards_B, group_ids_B)
    adv_B = rewards_B.double() - mean_B
    if norm_std:
        adv_B = adv_B / (std_B + eps)
    adv_B = torch.where(count_B > 1, adv_B, torch.zeros_like(adv_B))
    return adv_B.to(torch.float32)[:, None] * response_mask_BR.to(torch.float32)


def _zero_padding(x_BR: torch.Tensor, mask_BR: torch.Tensor) -> torch.Tensor:
    """x as float32 with masked positions set to 0 (where, not a product: padding may hold NaN/inf)."""
    return torch.where(mask_BR.bool(), x_BR.to(torch.float32), 0.0)


def rloo_advantages(rewards_B: torch.Tensor, group_ids_B: torch.Tensor,
                    mask_BR: torch.Tensor) -> torch.Tensor:
    """RLOO: A_i = r_i - mean_{j != i} r_j = G / (G - 1) (r_i - mean_g), G the group size.

    A group of one has no other sample to form a baseline from and gets 0. Groups are equal ids,
    not necessarily contiguous. Returns [B, R] float32, A_i broadcast over i's real tokens.
    """
    mean_B, _, count_B = group_stats(rewards_B, group_ids_B)
    scale_B = count_B / (count_B - 1).clamp(min=1)  # clamp: no division by zero for a group of one
    adv_B = torch.where(count_B > 1, scale_B * (rewards_B.double() - mean_B), torch.zeros_like(mean_B))
    return adv_B.to(torch.float32)[:, None] * mask_BR.to(torch.float32)


def last_token_rewards(rewards_B: torch.Tensor, mask_BR: torch.Tensor) -> torch.Tensor:
    """Place each sequence-level reward r_b on row b's last real token: [B] -> [B, R] float32.

    Rows with no real token are all zeros (the reward has nowhere to go).
    """
    mask_BR = mask_BR.to(torch.float32)
    B, R = mask_BR.shape
    positions_R = torch.arange(R, device=mask_BR.device, dtype=torch.float32)
    # argmax of position * mask finds the last real token (also if the mask were not a prefix).
    last_B = (positions_R * mask_BR).argmax(dim=1)
    has_token_B = mask_BR.sum(dim=1) > 0
    out_BR = torch.zeros(B, R, dtype=torch.float32, device=mask_BR.device)
    out_BR[torch.arange(B, device=mask_BR.device), last_B] = torch.where(
        has_token_B, rewards_B.to(torch.float32), 0.0)
    return out_BR


def gae(token_rewards_BR: torch.Tensor, values_BR: torch.Tensor, mask_BR: torch.Tensor, *,
        gamma: float, lam: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, not whitened: (advantages_BR, returns_BR), float32.

    delta_t = r_t + gamma V_{t+1} - V_t, with V = 0 past the end of the sequence (the state
    after the last real token is terminal); A_t = delta_t + gamma lam A_{t+1}; returns = A + V
    (the critic's targets). `lam` is a float or a per-sequence [B] tensor (length-adaptive
    lambda, see `length_adaptive_lambda`). Rewards and values at masked positions are ignored.

    Interior masked spans (a tool's observation between two sampled turns, mask
    [1,1,0,0,1,1,0]) are skipped, not terminal: "t+1" is the next *sampled* token, so the last
    token of a turn bootstraps from the first token of the next turn and the advantage carries
    across the observation, undiscounted by its length (the environment's tokens are not
    decisions). This is multi-turn PPO's convention in verl. A mask that is a prefix of ones
    (single-turn) gives the same numbers either way.
    """
    mask_BR = mask_BR.to(torch.float32)
    B, R = mask_BR.shape
    rewards_BR = _zero_padding(token_rewards_BR, mask_BR)
    values_BR = _zero_padding(values_BR, mask_BR)  # V = 0 at and after the end
    if isinstance(lam, torch.Tensor):
        if lam.shape != (B,):
            raise ValueError(f"lam must be a float or a [B] = [{B}] tensor, got shape {tuple(lam.shape)}")
        decay_B = gamma * lam.to(device=mask_BR.device, dtype=torch.float32)
    else:
        decay_B = torch.full((B,), gamma * lam, dtype=torch.float32, device=mask_BR.device)
    adv_BR = torch.zeros_like(values_BR)
    next_value_B = torch.zeros(B, dtype=torch.float32, device=mask_BR.device)
    next_adv_B = torch.zeros_like(next_value_B)
    for t in reversed(range(R)):
        m_B = mask_BR[:, t]
        delta_B = rewards_BR[:, t] + gamma * next_value_B - values_BR[:, t]
        adv_B = delta_B + decay_B * next_adv_B
        adv_BR[:, t] = adv_B * m_B
        # A masked position passes the next sampled token's value and advantage through
        # unchanged; trailing padding passes the initial zeros (the terminal state).
        next_adv_B = torch.where(m_B > 0, adv_B, next_adv_B)
        next_value_B = torch.where(m_B > 0, values_BR[:, t], next_value_B)
    returns_BR = (adv_BR + values_BR) * mask_BR
    return adv_BR, returns_BR


def length_adaptive_lambda(lengths_B: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """VAPO's length-adaptive lambda_policy = 1 - 1 / (alpha l), l the response length: [B] float32.

    Clamped into [0, 1]: for l < 1 / alpha (l < 20 at alpha = 0.05) the formula is negative,
    which would weight future TD errors with alternating signs; 0 instead gives the one-step TD
    advantage A_t = delta_t, the nearest meaningful value. Lengths below 1 are treated as 1
    (such rows have no tokens, so their lambda is never used) to avoid dividing by zero.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    lengths_B = lengths_B.to(torch.float32).clamp(min=1.0)
    return (1.0 - 1.0 / (alpha * lengths_B)).clamp(0.0, 1.0)


def decoupled_gae(token_rewards_BR: torch.Tensor, values_BR: torch.Tensor, mask_BR: torch.Tensor, *,
                  gamma: float, lam_critic: float | torch.Tensor, lam_policy: float | torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """VAPO's decoupled GAE: (advantages_BR, returns_BR), float32.

    The policy's advantages use lam_policy (float or [B], e.g. length-adaptive); the critic's
    targets use lam_critic (1.0 in VAPO: unbiased Monte-Carlo-like targets), returns = A_critic + V.
    """
    adv_BR, _ = gae(token_rewards_BR, values_BR, mask_BR, gamma=gamma, lam=lam_policy)
    _, returns_BR = gae(token_rewards_BR, values_BR, mask_BR, gamma=gamma, lam=lam_critic)
    return adv_BR, returns_BR


def whiten(x_BR: torch.Tensor, mask_BR: torch.Tensor, *, eps: float = 1e-8, shift_mean: bool = True,
           distributed: bool = True) -> torch.Tensor:
    """(x - mean) / (std + eps) over the real tokens: [B, R] float32, 0 at masked positions.

    std is the population (biased, divide by n) std, as OpenRLHF's masked_whiten; verl's
    masked_whiten divides by n - 1 (unbiased), so on a batch of n tokens verl's whitened values
    are sqrt((n - 1) / n) times these (a difference that fades as n grows). With `distributed`
    and an initialised process group of world size > 1, mean and std are over every rank's
    tokens (one all-reduce of sum, sum of squares and count, in float64). shift_mean=False adds
    the mean back (scale only). No real token anywhere gives zeros; a single token gives 0.
    """
    mask_BR = mask_BR.to(torch.float32)
    x64_BR = torch.where(mask_BR.bool(), x_BR.double(), 0.0)
    stats = {"count": mask_BR.double().sum(), "sum": x64_BR.sum(), "sumsq": (x64_BR**2).sum()}
    if distributed and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        reduced = dist.all_reduce_scalars({k: v.item() for k, v in stats.items()})
        stats = {k: torch.tensor(v, dtype=torch.float64, device=x_BR.device) for k, v in reduced.items()}
    count = stats["count"].clamp(min=1.0)  # no 0/0 when no token is real
    mean = stats["sum"] / count
    # E[x^2] - mean^2 can round below 0 for near-constant data: clamp before the sqrt.
    var = (stats["sumsq"] / count - mean**2).clamp(min=0.0)
    out_BR = (x64_BR - mean) / (var.sqrt() + eps)
    if not shift_mean:
        out_BR = out_BR + mean
    return _zero_padding(out_BR, mask_BR)


def reinforce_pp_advantages(rewards_B: torch.Tensor, mask_BR: torch.Tensor, *,
                            kl_BR: torch.Tensor | None = None, kl_coef: float = 0.0,
                            group_ids_B: torch.Tensor | None = None, baseline: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (and -baseline): (advantages_BR, returns_BR), float32.

    Per-token reward = r on the last real token minus kl_coef * kl_BR on every real token
    (kl_BR is k1 = logp - ref_logp, [B, R]; None means no penalty). With `baseline` the group
    mean reward is subtracted from r first (needs group_ids_B). Returns are reverse cumulative
    sums over the real tokens (gamma = 1); advantages are the returns whitened over all real
    tokens of the global batch (every rank, when a process group of size > 1 is running).
    """
    mask_BR = mask_BR.to(torch.float32)
    r_B = rewards_B.to(torch.float32)
    if baseline:
        if group_ids_B is None:
            raise ValueError("reinforce_pp_advantages(baseline=True) needs group_ids_B")
        mean_B, _, _ = group_stats(rewards_B, group_ids_B)
        r_B = (rewards_B.double() - mean_B).to(torch.float32)
    token_rewards_BR = last_token_rewards(r_B, mask_BR)
    if kl_BR is not None and kl_coef != 0.0:
        token_rewards_BR = token_rewards_BR - kl_coef * _zero_padding(kl_BR, mask_BR)
    # Reverse cumulative sum: returns_t = sum_{s >= t} reward_s (padding contributes 0).
    returns_BR = token_rewards_BR.flip(1).cumsum(1).flip(1) * mask_BR
    advantages_BR = whiten(returns_BR, mask_BR)
    return advantages_BR, returns_BR
