"""Tensor-parallel resharding: from 2 FSDP2 ranks into tp=2 slices, for every parameter kind
of Qwen2- and Llama-style models, checked against the full weights and against the math of
column-, row- and vocab-parallel layers."""
from __future__ import annotations

import pytest
import torch

from core.models import ModelConfig, build_model
from core.reshard import tp_kind, tp_slice
from tests.dist_utils import run_distributed


def tiny(model_type: str, kv_heads: int = 2) -> ModelConfig:
    return ModelConfig(config=dict(model_type=model_type, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=kv_heads, vocab_size=41,
                                   tie_word_embeddings=False))


def slices_from_fsdp(cfg: ModelConfig, tp_size: int):
    """On each of 2 FSDP ranks: every tp rank's slices, streamed from the sharded model."""
    from core import dist
    from core.models import shard_model
    from core.reshard import tp_weight_buckets
    model = shard_model(build_model(cfg, seed=3), dist.mesh())
    hf = model.config
    out = {}
    for tp_rank in range(tp_size):
        for bucket in tp_weight_buckets(model, tp_rank=tp_rank, tp_size=tp_size,
                                        num_heads=hf.num_attention_heads,
                                        num_kv_heads=hf.num_key_value_heads, bucket_bytes=4096):
            for name, t in bucket:
                out[(tp_rank, name)] = t
    return out


KINDS = {"qwen2": {"vocab": 2, "column": 5 * 2 + 3 * 2, "row": 2 * 2, "replicated": 2 * 2 + 1},
         "llama": {"vocab": 2, "column": 5 * 2, "row": 2 * 2, "replicated": 2 * 2 + 1}}


@pytest.mark.dist
@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_fsdp_to_tp2_slices_equal_the_slices_of_the_full_weights(model_type):
    cfg = tiny(model_type)
    full = dict(build_model(cfg, seed=3).named_parameters())
    kinds = {}
    for name, p in full.items():
        kinds[tp_kind(name, p.dim())] = kinds.get(tp_kind(name, p.dim()), 0) + 1
    assert kinds == KINDS[model_type]  # every parameter kind of the model is covered
    per_fsdp_rank = run_distributed(slices_from_fsdp, cfg, 2)
    assert per_fsdp_rank[0].keys() == per_fsdp_rank[1].keys()
    for (tp_rank, name), got in per_fsdp_rank[0].items():
        torch.testing.assert_close(per_fsdp_rank[1][(tp_rank, name)], got, rtol=0, atol=0)
        w = full[name].detach()
        kind = tp_kind(name, w.dim())
        if kind == "column":
            want = w.chunk(2, dim=0)[tp_rank]
        elif kind == "row":
            want = w.chunk(2, dim=1)[tp_rank]
        elif kind == "vocab":  # 41 rows padded to 64: 32 per rank, rows 41..63 zero
            want = torch.cat([w, w.new_zeros(23, w.shape[1])]).chunk(2, dim=0)[tp_rank]
        else:
            want = w
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{name} tp_rank {tp_rank}")


def test_sliced_layers_compute_the_full_layers():
    """Column-parallel gate/up, row-parallel down summed over ranks = the full MLP; vocab-
    parallel logits concatenated = the full logits; attention heads split by rank."""
    model = build_model(tiny("qwen2"), seed=0)
    params = {n: p.detach() for n, p in model.named_parameters()}
    x = torch.randn(3, 32)
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        want = mlp(x)
        got = 0
        for r in range(2):
            s = {k: tp_slice(f"model.layers.0.mlp.{k}.weight", params[f"model.layers.0.mlp.{k}.weight"],
                             tp_rank=r, tp_size=2, num_heads=4, num_kv_heads=2)
                 for k in ("gate_proj", "up_proj", "down_proj")}
            h = torch.nn.functional.silu(x @ s["gate_proj"].T) * (x @ s["up_proj"].T)
            got = got + h @ s["down_proj"].T  # the all-reduce of a row-parallel layer
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        head = params["lm_head.weight"]
        logits = torch.cat([x @ tp_slice("lm_head.weight", head, tp_rank=r, tp_size=2, num_heads=4,
                                         num_kv_heads=2).T for r in range(2)], dim=-1)
        assert logits.shape[1] == 64 and (logits[:, 41:] == 0).all()
        logits = logits[:, :41]
        torch.testing.assert_close(logits, x @ head.T)


def test_kv_heads_fewer_than_ranks_are_replicated_by_head():
    w = torch.arange(16 * 3, dtype=torch.float32).reshape(16, 3)  # 2 KV heads of dim 8
    parts = [tp_slice("model.layers.0.self_attn.k_proj.weight", w, tp_rank=r, tp_size=4,
                      num_heads=4, num_kv_heads=2) for r in range(4)]
    assert torch.equal(parts[0], w[:8]) and torch.equal(parts[1], w[:8])
    assert torch.equal(parts[2], w[8:]) and torch.equal(parts[3], w[8:])
    with pytest.raises(ValueError, match="cannot be split"):
        tp_slice("model.layers.0.self_attn.q_proj.weight", torch.zeros(24, 3), tp_rank=0, tp_size=4,
                 num_heads=3, num_kv_heads=1)
    with pytest.raises(ValueError, match="no tensor-parallel layout"):
        tp_kind("model.layers.0.mystery.weight", 2)
