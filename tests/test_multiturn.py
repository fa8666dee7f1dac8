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

from core.batch import Batch, model_inputs
from core.microbatch import sample_sizes
from core.models import build_model, token_logprobs
from core.packing import pack_samples, response_logprobs
from launch.tasks import char_tokenizer
from roles.critic import ValueModel, response_values
from roles.rollout.engine import Completion, Engine, Request
from roles.rollout.multiturn import ToolsConfig
from roles.rollout.role import Rollout
from roles.rollout.tools import TOOLS, ToolSet, calculator, schema
from roles.rollout.torch_engine import TorchEngine
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


def test_a_failing_slow_or_unknown_tool_is_an_observation(monkeypatch):
    monkeypatch.setitem(TOOLS._items, "raises", _raises)
    monkeypatch.setitem(TOOLS._items, "sleeps", _sleeps)
    tools = ToolSet(["calculator", "raises", "sleeps"], timeout_s=0.2, max_chars=40)
    assert tools.call("calculator", {"expression": "2+2"}).text == "4"
    assert tools.call("raises", {"text": "x"}) == tools.call("raises", {"text": "x"})
    assert tools.call("raises", {"text": "x"}).status == "error"
    assert "boom" in tools.call("raises", {"text": "x"}).text
    assert tools.call("sleeps", {"seconds": "2"}).status == "timeout"
    assert tools.call("nope", {}).status == "unknown"
    assert tools.call("calculator", {"wrong": "2"}).status == "error"  # bad arguments
    assert tools.call("calculator", {"expression": "9 ** 60"}).text.endswith("...(truncated)")


# ---- the turn loop on the real torch engine and a real (random) model ------------------------

TOOL_ALPHABET = "0123456789+-*=() []{}"


class RecordingEngine(TorchEngine):
    """The real engine, keeping every request it was given and what it returned."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log: list[tuple[Request, Completion]] = []

    def generate_requests(self, requests, *, pause=None):
        out = super().generate_requests(requests, pause=pause)
        self.log += list(zip(requests, out))
        return out


def plain_rollout(seed: int = 0, **tools_over) -> tuple[Rollout, RecordingEngine, object]:
    tok = char_tokenizer(TOOL_ALPHABET)
    model = build_model(tiny_model_config(vocab_size=len(tok)), seed=seed)
    engine = RecordingEngine(model, pad_token_id=tok.pad_token_id, device=torch.device("cpu"))
    tools = ToolsConfig(**({"names": ["calculator"], "format": "plain", "max_calls": 3,
                            "max_observation_tokens": 12} | tools_over))
    rollout = Rollout(Rollout.Config(n=4, max_new_tokens=40, tools=tools), engine, tok, seed=seed, rank=0)
    return rollout, engine, model


def prompts(tok, texts: list[str]) -> Batch:
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    P = max(map(len, ids))
    return Batch(prompt_ids=torch.tensor([[0] * (P - len(x)) + x for x in ids]),
                 prompt_mask=torch.tensor([[0] * (P - len(x)) + [1] * len(x) for x in ids]))


def test_trained_ids_are_the_engine_ids_token_for_token():
    """Random weights over a 24-character vocabulary sample `]` often, so calls (mostly
    malformed expressions, answered with error observations) happen without any training."""
    rollout, engine, model = plain_rollout()
    tok = rollout.tokenizer
    res = rollout.generate(prompts(tok, ["12*34=", "5+6=", "(1+2)*3=", "99*9="]))
    b = res.value
    assert res.counts["tools/calls"] >= 8, res.counts  # this seed calls often; the checks below need it
    eos, close = tok.eos_token_id, tok.convert_tokens_to_ids("]")
    final = {}
    for req, comp in engine.log:  # the last call of each sample holds all it consumed
        final[req.sampling.seed] = list(req.prefix) + list(comp.tokens)
    seeds = [r.sampling.seed for r, _ in engine.log[:len(b)]]
    for i in range(len(b)):
        n = int((b.response_mask[i] | b.observation_mask[i]).sum())
        ids = b.response_ids[i, :n].tolist()
        # everything the engine consumed or produced is the sample, in order, nothing re-encoded
        assert ids[:len(final[seeds[i]])] == final[seeds[i]]
        for req, comp in engine.log:
            if req.sampling.seed == seeds[i]:
                assert ids[:len(req.prefix)] == list(req.prefix)
                start = len(req.prefix)
                assert ids[start:start + len(comp.tokens)] == list(comp.tokens)
                assert b.response_mask[i, start:start + len(comp.tokens)].all()  # sampled, in the loss
                assert b.rollout_logp[i, start:start + len(comp.tokens)].tolist() == \
                    pytest.approx(list(comp.logp), abs=0)
        obs = b.observation_mask[i, :n].bool()
        assert not (b.response_mask[i, :n].bool() & obs).any()
        assert (b.rollout_logp[i, :n][obs] == 0).all()
        for s, e in spans(obs.tolist()):  # each observation follows the `]` that ended its call
            assert ids[s - 1] == close and b.response_mask[i, s - 1] == 1
            assert tok.decode(ids[s:e]).startswith("{")
        if b.finish_reason[i] == "stop":  # the model's own end: EOS, sampled, in the loss
            assert ids[-1] == eos and b.response_mask[i, n - 1] == 1
    # the trainer, recomputing log-probs on the batch, sees what the engine saw
    logp, _ = token_logprobs(model, b)
    m = b.response_mask.bool()
    torch.testing.assert_close(logp[m], b.rollout_logp[m], rtol=0, atol=1e-5)
    assert res.metrics["tools/calls_per_sample"] == res.counts["tools/calls"] / len(b)


def spans(mask: list[bool]) -> list[tuple[int, int]]:
    out, start = [], None
    for j, v in enumerate(mask + [False]):
        if v and start is None:
            start = j
        elif not v and start is not None:
            out.append((start, j))
            start = None
    return out


def test_the_observation_is_the_tools_answer_cut_to_its_budget():
    rollout, engine, _ = plain_rollout(max_observation_tokens=6)
    tok = rollout.tokenizer
    b = rollout.generate(prompts(tok, ["12*34=", "5+6="])).value
    seen = 0
    for i in range(len(b)):
        n = int((b.response_mask[i] | b.observation_mask[i]).sum())
        ids = b.response_ids[i, :n].tolist()
        for s, e in spans(b.observation_mask[i, :n].bool().tolist()):
            call = tok.decode(ids[:s])
            body = call[call.rfind("[") + 1:-1]
            try:
                answer = calculator(body)
            except Exception:
                answer = None
            text = tok.decode(ids[s:e])
            assert e - s <= 6
            if answer is not None:
                assert text == ("{" + answer + "}")[:6]
            else:
                assert text.startswith("{")  # an error observation (its words fall outside the alphabet)
            seen += 1
    assert seen > 0


# ---- the hermes format with a chat template: the model's choices scripted --------------------

QWEN_LIKE_TEMPLATE = (  # Qwen2.5's tool layout; like Qwen3's, it drops earlier turns' reasoning
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif m.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + m.content.split('</think>')[-1] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<think>", "</think>"]


def chat_tokenizer():
    tok = char_tokenizer("".join(chr(c) for c in range(32, 127)) + "\n")
    tok.add_special_tokens({"additional_special_tokens": CHAT_SPECIALS})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = QWEN_LIKE_TEMPLATE
    return tok


class ScriptedEngine(Engine):
    """Plays the model: sample j's turn k is script[j][k] (tokenised), log-prob -0.5 per token.
    The rollout loop, tokenizer, template and tools are the real ones."""

    def __init__(self, tok, script: list[list[str]]):
        self.tok, self.script, self.pad_token_id = tok, script, tok.pad_token_id
        self.requests: list[Request] = []
        self.index: dict[int, int] = {}

    def generate_requests(self, requests, *, pause=None):
        out = []
        for r in requests:
            self.requests.append(r)
            j = self.index.setdefault(r.sampling.seed, len(self.index))
            turn = sum(1 for q in self.requests[:-1] if q.sampling.seed == r.sampling.seed)
            ids = self.tok.encode(self.script[j][turn], add_special_tokens=False)
            out.append(Completion(tuple(ids), (-0.5,) * len(ids), "stop"))
        return out


def hermes_rollout(script, **tools_over):
    tok = chat_tokenizer()
    engine = ScriptedEngine(tok, script)
    tools = ToolsConfig(**({"names": ["calculator"], "format": "hermes"} | tools_over))
    rollout = Rollout(Rollout.Config(n=1, max_new_tokens=400, tools=tools), engine, tok, seed=0, rank=0)
    return rollout, engine, tok


CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "123*456"}}</tool_call>'


def test_hermes_turns_keep_the_separator_the_end_of_turn_and_the_reasoning():
    script = [["<think>multiply first</think>" + CALL + "<|im_end|>", "<think>so</think>56088<|im_end|>"]]
    rollout, engine, tok = hermes_rollout(script)
    res = rollout.generate(prompts(tok, ["<|im_start|>user\n123*456?<|im_end|>\n<|im_start|>assistant\n"]))
    b = res.value
    n = int((b.response_mask[0] | b.observation_mask[0]).sum())
    ids = b.response_ids[0, :n].tolist()
    first = tok.encode(script[0][0], add_special_tokens=False)
    observation = "\n<|im_start|>user\n<tool_response>\n56088\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    obs_ids = tok.encode(observation, add_special_tokens=False)
    second = tok.encode(script[0][1], add_special_tokens=False)
    assert ids == first + obs_ids + second  # the separator after <|im_end|> is there
    assert b.response_mask[0, :n].tolist() == [1] * len(first) + [0] * len(obs_ids) + [1] * len(second)
    assert b.observation_mask[0, :n].tolist() == [0] * len(first) + [1] * len(obs_ids) + [0] * len(second)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ids[len(first) - 1] == im_end and b.response_mask[0, len(first) - 1] == 1  # learns to stop
    # the second turn conditioned on the first one as sampled, reasoning included
    assert list(engine.requests[1].prefix) == first + obs_ids
    assert "multiply first" in tok.decode(engine.requests[1].prefix)
    assert res.counts["tools/calls"] == 1 and res.metrics["tools/error_rate"] == 0


def _slow(seconds: str) -> str:
    """Sleep, then answer.

    Args:
        seconds: how long to sleep
    """
    time.sleep(float(seconds))
    return "late"


def test_a_malformed_call_an_unknown_tool_and_a_timeout_are_counted_observations(monkeypatch):
    monkeypatch.setitem(TOOLS._items, "slow", _slow)
    script = [['<tool_call>{"name": "calculator", "arguments": </tool_call><|im_end|>', "a<|im_end|>"],
              ['<tool_call>{"name": "nope", "arguments": {}}</tool_call><|im_end|>', "b<|im_end|>"],
              ['<tool_call>{"name": "slow", "arguments": {"seconds": "3"}}</tool_call><|im_end|>', "c<|im_end|>"],
              ["no call at all<|im_end|>"]]
    rollout, engine, tok = hermes_rollout(script, names=["calculator", "slow"], timeout_s=0.3)
    res = rollout.generate(prompts(tok, ["q1", "q2", "q3", "q4"]))
    assert res.counts["tools/calls"] == 3
    assert (res.counts["tools/malformed"], res.counts["tools/unknown"], res.counts["tools/timeout"]) == (1, 1, 1)
    assert res.metrics["tools/error_rate"] == 1.0
    texts = res.value.response_text
    assert "malformed tool call" in texts[0] and "unknown tool 'nope'" in texts[1] and "timed out" in texts[2]
    assert texts[3] == "no call at all" and res.value.finish_reason == ["stop"] * 4


def test_the_prompt_lists_the_tools_for_the_chat_template():
    from core.data import PromptFormat, render_prompt
    from roles.rollout.tools import tool_schemas
    tok = chat_tokenizer()
    tok.chat_template = ("{%- if tools %}{{- '<|im_start|>system\\ntools:' }}{%- for t in tools %}"
                         "{{- ' ' + t.function.name }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
                         + QWEN_LIKE_TEMPLATE)
    fmt = PromptFormat(chat_template=True)
    with_tools = render_prompt("2+2?", fmt, tok, tools=tool_schemas(["calculator", "python"]))
    assert with_tools.startswith("<|im_start|>system\ntools: calculator python<|im_end|>\n")
    assert render_prompt("2+2?", fmt, tok).startswith("<|im_start|>user\n2+2?")
    assert tool_schemas([]) is None


def test_a_users_tool_by_import_path_from_the_command_line():
    from core.config import load_config, parse_cli
    from launch.config import JobConfig
    from tests.test_train_e2e import ROOT
    _, overrides = parse_cli(["--config", "configs/quickstart.yaml",
                              "rollout.tools.names=[calculator,examples.unit_convert:convert]"])
    cfg = load_config(JobConfig, ROOT / "configs" / "quickstart.yaml", overrides)
    assert cfg.rollout.tools.names == ["calculator", "examples.unit_convert:convert"]
    tools = ToolSet(cfg.rollout.tools.names, timeout_s=1, max_chars=100)
    assert list(tools.tools) == ["calculator", "convert"]
    assert tools.call("convert", {"value": 10, "unit_from": "km", "unit_to": "mi"}).text == "6.21371 mi"
    assert tools.call("convert", {"value": 1, "unit_from": "km", "unit_to": "kg"}).status == "error"
    assert [s["function"]["name"] for s in tools.schemas] == ["calculator", "convert"]
    assert list(tools.schemas[1]["function"]["parameters"]["properties"]) == ["value", "unit_from", "unit_to"]


def test_tools_need_a_request_engine_and_a_synchronous_rollout():
    from roles.rollout.buffer import RolloutBuffer

    class BatchOnly(Engine):
        pad_token_id = 0

    tok = char_tokenizer(TOOL_ALPHABET)
    cfg = Rollout.Config(tools=ToolsConfig(names=["calculator"], format="plain"))
    with pytest.raises(ValueError, match="only the batch generate"):
        Rollout(cfg, BatchOnly(), tok, seed=0, rank=0)
    with pytest.raises(ValueError, match="max_staleness=0"):
        Rollout(cfg, BatchOnly(), tok, seed=0, rank=0, buffer=object.__new__(RolloutBuffer))
    with pytest.raises(ValueError, match="chat template"):
        Rollout(Rollout.Config(tools=ToolsConfig(names=["calculator"], format="hermes")),
                RecordingEngine(build_model(tiny_model_config(vocab_size=len(tok)), seed=0), pad_token_id=0,
                                device=torch.device("cpu")), tok, seed=0, rank=0)
