"""Multi-turn samples (issue #18): observation tokens inside a response, the tools, the rollout.

The failure modes peers hit, each pinned: trained ids equal engine ids token for token; the
separator between turns survives; the end-of-turn token is inside the loss mask and observation
tokens are outside; earlier reasoning stays in the history the model conditions on; a tool that
raises, times out or is called malformed becomes a counted observation, never a crash.
"""
from __future__ import annotations

import time

import pytest
import torch

from core.batch import Batch, model_inputs, sample_sizes
from core.models import build_model, token_logprobs
from core.packing import pack_samples, response_logprobs
from roles.critic import ValueModel, response_values
from roles.rollout.tools import TOOLS, ToolSet, calculator, schema
from tests.helpers import VOCAB, tiny_model_config

# ---- observation tokens in the batch: attended to, never in a loss ----------------------------


def multiturn_batch() -> Batch:
    """Three samples: a call, its 2-token observation, an answer; a single-turn one; a call whose
    observation is the last thing before the answer's stop token."""
    g = torch.Generator().manual_seed(0)
    resp = torch.randint(3, VOCAB, (3, 8), generator=g)
    response_mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 0],
                                  [1, 1, 1, 1, 0, 0, 0, 0],
                                  [1, 0, 0, 0, 1, 0, 0, 0]])
    observation_mask = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0],
                                     [0, 0, 0, 0, 0, 0, 0, 0],
                                     [0, 1, 1, 1, 0, 0, 0, 0]])
    real = response_mask | observation_mask
    return Batch(prompt_ids=torch.tensor([[0, 5, 6], [7, 8, 9], [0, 0, 4]]),
                 prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]]),
                 response_ids=resp * real, response_mask=response_mask, observation_mask=observation_mask)


def test_the_model_attends_to_observations_and_positions_count_them():
    b = multiturn_batch()
    _, mask, pos = model_inputs(b)
    assert mask[0].tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    assert pos[0].tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 8]
    sizes = sample_sizes(b)
    assert sizes.response == [7, 4, 5] and sizes.response_span == [7, 4, 5]
    assert sizes.loss_tokens == [5.0, 4.0, 2.0]
    assert sizes.contiguous()


def test_an_observation_changes_what_follows_and_has_no_log_prob():
    model = build_model(tiny_model_config(), seed=0)
    b = multiturn_batch()
    logp, _ = token_logprobs(model, b)
    assert (logp[b.response_mask == 0] == 0).all() and (logp[b.response_mask == 1] != 0).all()
    other = b.response_ids.clone()
    other[0, 3] = (other[0, 3] + 1) % VOCAB  # another observation token
    logp2, _ = token_logprobs(model, b.with_fields(response_ids=other))
    assert torch.equal(logp[0, :3], logp2[0, :3])  # before the observation: the same
    assert not torch.allclose(logp[0, 5:7], logp2[0, 5:7])  # after it: conditioned on it


@pytest.mark.parametrize("one_row", [False, True])
def test_packed_multiturn_log_probs_and_values_equal_padded(one_row):
    model = build_model(tiny_model_config(), seed=0)
    b = multiturn_batch()
    packed = pack_samples(b, sample_sizes(b), one_row=one_row)
    want, want_ent = token_logprobs(model, b, with_entropy=True)
    got, got_ent = response_logprobs(model, b, packed, with_entropy=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_ent, want_ent, rtol=1e-6, atol=1e-6)
    critic = ValueModel(build_model(tiny_model_config(), seed=1), head_init_std=0.1, seed=1)
    torch.testing.assert_close(response_values(critic, b, packed), response_values(critic, b),
                               rtol=1e-6, atol=1e-6)
    assert (response_values(critic, b, packed)[b.response_mask == 0] == 0).all()


# ---- tools --------------------------------------------------------------------------------------


def test_calculator_is_exact_and_refuses_what_is_not_arithmetic():
    assert calculator("123 * 456") == "56088"
    assert calculator("(2 + 3) ** 2 - 7 // 2") == "22"
    assert calculator("10 / 4") == "2.5" and calculator("8 / 4") == "2"
    for bad in ("__import__('os').system('id')", "x + 1", "2 ** 10 ** 9", "[1] * 3", "'a' * 3"):
        with pytest.raises((ValueError, SyntaxError)):
            calculator(bad)


def test_tool_schema_comes_from_the_signature_without_the_sandbox():
    s = schema(TOOLS.get("python"))
    assert s["function"]["name"] == "python"
    assert list(s["function"]["parameters"]["properties"]) == ["code"]
    assert s["function"]["parameters"]["required"] == ["code"]


def _raises(text: str) -> str:
    """Raise.

    Args:
        text: ignored
    """
    raise RuntimeError("boom")


def _sleeps(seconds: str) -> str:
    """Sleep.

    Args:
        seconds: how long
    """
    time.sleep(float(seconds))
    return "awake"


def test_a_failing_slow_or_unknown_tool_is_an_observation():
    tools = ToolSet(["calculator"], timeout_s=0.2, max_chars=40)
    tools.tools |= {"raises": _raises, "sleeps": _sleeps}
    assert tools.call("calculator", {"expression": "2+2"}).text == "4"
    assert tools.call("raises", {"text": "x"}) == tools.call("raises", {"text": "x"})
    assert tools.call("raises", {"text": "x"}).status == "error"
    assert "boom" in tools.call("raises", {"text": "x"}).text
    assert tools.call("sleeps", {"seconds": "2"}).status == "timeout"
    assert tools.call("nope", {}).status == "unknown"
    assert tools.call("calculator", {"wrong": "2"}).status == "error"  # bad arguments
    assert tools.call("calculator", {"expression": "9 ** 60"}).text.endswith("...(truncated)")
