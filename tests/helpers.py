"""Tiny models and batches shared by the tests (built locally; nothing is downloaded)."""
from __future__ import annotations

import torch

from core.batch import Batch
from core.models import ModelConfig

VOCAB = 20


def tiny_model_config(**overrides) -> ModelConfig:
    cfg = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, tie_word_embeddings=False)
    cfg.update(overrides)
    return ModelConfig(config=cfg)


def random_batch(seed: int, B: int = 8, P: int = 6, R: int = 5) -> Batch:
    """Left-padded prompts and right-padded responses of varied lengths, random advantages."""
    g = torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(2, P + 1, (B,), generator=g)
    resp_len = torch.randint(1, R + 1, (B,), generator=g)
    cols_P, cols_R = torch.arange(P), torch.arange(R)
    prompt_mask = (cols_P[None] >= P - prompt_len[:, None]).long()
    response_mask = (cols_R[None] < resp_len[:, None]).long()
    prompt_ids = torch.randint(3, VOCAB, (B, P), generator=g) * prompt_mask
    response_ids = torch.randint(3, VOCAB, (B, R), generator=g) * response_mask
    return Batch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                 response_mask=response_mask, advantages=torch.randn(B, R, generator=g) * response_mask,
                 group_ids=torch.arange(B) // 4, rewards=torch.randn(B, generator=g))
