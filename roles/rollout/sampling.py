"""Token sampling with per-request randomness: a request's tokens depend on its own seed and on
how far it has come, never on which other requests share the batch.

Each draw uses one uniform number u = U(seed, t), t the index of the token in the request's
response (a continued partial rollout goes on counting after its prefix), from a counter-based
generator: SplitMix64's finaliser over (seed, t), in int64 tensor arithmetic (wrapping
multiplication, logical shifts), 53 bits to a float64 in [0, 1). The token is the inverse CDF of
the truncated (top-k, top-p) distribution at u. So continuous batching can admit and evict rows
freely, a request paused at one step and resumed at the next samples from the same stream, and
the numbers are the same on every device and rank count.

Log-probs are log softmax(logits / T) of the sampled token, before truncation (the convention of
verl and OpenRLHF), which is what the actor recomputes; greedy (T = 0) reports log softmax(logits).
"""
from __future__ import annotations

import torch

from roles.rollout.engine import SamplingParams


def _i64(x: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (>> on int64 is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def uniforms(seed_N: torch.Tensor, step_N: torch.Tensor) -> torch.Tensor:
    """[N] float64 in [0, 1): U(seed, step) per row (int64 inputs, any values)."""
    z = _mix(seed_N * _GOLDEN + _mix((step_N + 1) * _GOLDEN))
    return _shr(z, 11).double() * (1.0 / (1 << 53))


def sample_next(logits_NV: torch.Tensor, sampling: SamplingParams, seed_N: torch.Tensor,
                step_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its log-prob under softmax(logits / T) (T = 1 when greedy)."""
    if sampling.temperature == 0:
        tok_N = logits_NV.argmax(-1)
        logp_NV = logits_NV.log_softmax(-1)
    else:
        scaled = logits_NV / sampling.temperature
        logp_NV = scaled.log_softmax(-1)
        cdf_NV = truncate(scaled, sampling).softmax(-1).double().cumsum(-1)
        u_N1 = (uniforms(seed_N, step_N) * cdf_NV[:, -1])[:, None]
        tok_N = torch.searchsorted(cdf_NV, u_N1, right=True)[:, 0].clamp(max=logits_NV.shape[-1] - 1)
    return tok_N, logp_NV.gather(-1, tok_N[:, None])[:, 0]


def truncate(logits_NV: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering; removed tokens get -inf."""
    out = logits_NV
    if 0 < sampling.top_k < out.shape[-1]:
        kth = out.topk(sampling.top_k, dim=-1).values[:, -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = out.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= sampling.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out
