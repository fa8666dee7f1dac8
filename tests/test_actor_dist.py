"""The FSDP2 actor on 2 gloo ranks against a single process, and the loss-scaling contract."""
from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.helpers import random_batch, tiny_model_config

pytestmark = pytest.mark.dist


def _actor(micro_batch_size: int):
    from core import dist
    from core.models import build_model, shard_model
    from roles.actor import Actor
    model = shard_model(build_model(tiny_model_config(), seed=0), dist.mesh())
    return Actor(Actor.Config(lr=1e-2, micro_batch_size=micro_batch_size, grad_clip=1.0), model,
                 total_steps=10)


def _full_params(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def _full_grads(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in model.named_parameters()}


def _my_shard(batch):
    from core import dist
    info = dist.info()
    n = len(batch) // info.world_size
    return batch.select(range(info.rank * n, (info.rank + 1) * n))


def grads_and_update(agg_mode: str, micro_batch_size: int) -> dict:
    """Gradient of one step, then parameters after two AdamW updates, on this rank's half."""
    from algorithms.losses import PolicyLoss
    actor = _actor(micro_batch_size)
    batch = random_batch(0, B=8)
    old = actor.log_probs(batch)
    noise = torch.randn(old.shape, generator=torch.Generator().manual_seed(1))
    batch = _my_shard(batch.with_fields(old_logp=old + 0.05 * noise))
    loss_fn = PolicyLoss(agg_mode=agg_mode, norm_const=5.0)
    metrics = actor.accumulate(batch, loss_fn)
    grads = _full_grads(actor.model)
    actor.optimizer.zero_grad(set_to_none=True)
    update = [actor.update(batch, loss_fn=loss_fn).metrics for _ in range(2)]
    return {"metrics": metrics, "grads": grads, "params": _full_params(actor.model), "update": update}


AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def all_modes(micro_batch_size: int) -> dict:
    return {mode: grads_and_update(mode, micro_batch_size) for mode in AGG_MODES}


@pytest.fixture(scope="module")
def runs():
    return {"single": run_distributed(all_modes, 8, world_size=1)[0],
            "micro": run_distributed(all_modes, 2, world_size=1)[0],
            "two": run_distributed(all_modes, 2, world_size=2)}


@pytest.mark.parametrize("agg_mode", AGG_MODES)
def test_two_ranks_equal_one_process(runs, agg_mode):
    """Same model, same 8 samples: 1 process x 1 micro-batch vs 1 process x 4 micro-batches vs
    2 ranks x 2 micro-batches: same loss, same gradient, same parameters after 2 updates."""
    single = runs["single"][agg_mode]
    for other in (runs["micro"][agg_mode], runs["two"][0][agg_mode], runs["two"][1][agg_mode]):
        assert other["metrics"]["loss"] == pytest.approx(single["metrics"]["loss"], rel=1e-5, abs=1e-7)
        for name, g in single["grads"].items():
            torch.testing.assert_close(other["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
        for name, p in single["params"].items():
            # Adam divides by sqrt(v): elements with near-zero gradient turn float noise into
            # visible steps, so parameters agree to 1% of one step (lr 1e-2), gradients to 1e-6.
            torch.testing.assert_close(other["params"][name], p, rtol=1e-4, atol=1e-4, msg=name)
        assert other["update"][0]["actor/grad_norm"] == pytest.approx(
            single["update"][0]["actor/grad_norm"], rel=1e-4)
    # The step moved the weights (a test that cannot fail would not).
    assert single["update"][0]["actor/grad_norm"] > 0
