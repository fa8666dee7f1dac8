"""The memory hand-off: a no-op (not a crash) on CPU, and its moving code, which is
device-agnostic, exercised on real FSDP2 optimizer state on 2 gloo ranks."""
from __future__ import annotations

import os

import pytest
import torch

from core.offload import MemoryHandoff, move_optimizer_state
from tests.dist_utils import run_distributed


def adam_on_fsdp():
    from core import dist
    from core.models import ModelConfig, build_model, shard_model
    cfg = ModelConfig(config=dict(model_type="qwen2", hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                  vocab_size=20))
    model = shard_model(build_model(cfg, seed=0), dist.mesh())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    full_bytes = sum(v.full_tensor().numel() * 4 for s in opt.state.values() for k, v in s.items()
                     if k != "step")
    handoff = MemoryHandoff(optimizers=[opt], modules=[model], device=torch.device("cpu"))
    noop = (handoff.to_generate(params=False), handoff.to_train(), handoff.active)
    moved = move_optimizer_state(opt, "cpu")  # already there: nothing moves
    # "meta" stands in for another device: only local shards move, DTensor wrappers stay
    away = move_optimizer_state(opt, "meta")
    kinds = {type(v).__name__ for s in opt.state.values() for k, v in s.items() if k != "step"}
    devices = {v._local_tensor.device.type for s in opt.state.values() for k, v in s.items() if k != "step"}
    return noop, moved, away, kinds, devices, full_bytes


@pytest.mark.dist
def test_handoff_is_a_no_op_on_cpu_and_moves_sharded_optimizer_state():
    ranks = run_distributed(adam_on_fsdp)
    for noop, moved, away, kinds, devices, full_bytes in ranks:
        assert noop == ({}, {}, False)
        assert moved == 0
        assert kinds == {"DTensor"} and devices == {"meta"}
    # each rank moved only its shards of exp_avg and exp_avg_sq: together, the full state once
    assert sum(r[2] for r in ranks) == ranks[0][5] > 0


def test_allocator_conf_drops_expandable_segments_only_for_sglang(monkeypatch):
    from roles.rollout.sglang_engine import SGLangConfig
    from roles.rollout.torch_engine import TorchEngineConfig
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True,max_split_size_mb:128")
    TorchEngineConfig().prepare_process()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True,max_split_size_mb:128"
    SGLangConfig().prepare_process()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
