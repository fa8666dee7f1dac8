"""Advantage estimators: pure tensor functions (formulas in ALGORITHMS.md, "Advantages")."""
from __future__ import annotations

import torch


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
