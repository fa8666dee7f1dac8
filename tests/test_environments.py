"""Stateful environments in multi-turn rollouts (issue #18): reset(row), step(action) ->
(observation, reward, done); their rewards summed per sample, combined with the scorer's in the
reward role and logged apart; a broken environment ends its episode, never the run."""
from __future__ import annotations

import math
import time

import pytest
import torch

from core.batch import Batch
from core.models import build_model, token_logprobs
from launch.tasks import char_tokenizer
from roles.reward import Reward
from roles.rollout.environments import ENVIRONMENTS, GuessNumber
from roles.rollout.multiturn import ToolsConfig
from roles.rollout.role import Rollout
from tests.helpers import tiny_model_config
from tests.test_multiturn import CALL, RecordingEngine, ScriptedEngine, chat_tokenizer, spans
from tests.test_train_e2e import read_metrics, torchrun


def episodes(tok, questions: list[tuple[str, object]]) -> Batch:
    """Prompts with their ground truths, as the data loader yields them."""
    ids = [tok.encode(q, add_special_tokens=False) for q, _ in questions]
    P = max(map(len, ids))
    return Batch(prompt_ids=torch.tensor([[0] * (P - len(x)) + x for x in ids]),
                 prompt_mask=torch.tensor([[0] * (P - len(x)) + [1] * len(x) for x in ids]),
                 prompt_text=[q for q, _ in questions], ground_truth=[a for _, a in questions],
                 data_source=["guess"] * len(questions))


def hermes_env_rollout(script, **over):
    tok = chat_tokenizer()
    engine = ScriptedEngine(tok, script)
    tools = ToolsConfig(**({"env": "guess_number", "format": "hermes"} | over))
    return Rollout(Rollout.Config(n=1, max_new_tokens=600, tools=tools), engine, tok, seed=0, rank=0), engine, tok


def sample_ids(b: Batch, i: int) -> list[int]:
    n = int((b.response_mask[i] | b.observation_mask[i]).sum())
    return b.response_ids[i, :n].tolist()


def test_guess_number_answers_higher_lower_and_ends_on_the_right_number():
    env = GuessNumber(reward=2.0)
    env.reset({"prompt": "?", "ground_truth": "37", "data_source": "guess"})
    assert env.step("I think 50") == ("lower", 0.0, False)
    assert env.step("25, no: 30") == ("higher", 0.0, False)
    assert env.step("no idea") == ("say a number", 0.0, False)
    assert env.step("37") == ("correct", 2.0, True)


def test_the_environment_answers_every_turn_until_done_and_its_rewards_are_the_samples():
    script = [["50<|im_end|>", "25<|im_end|>", "37<|im_end|>", "never asked<|im_end|>"],
              ["1<|im_end|>", "2<|im_end|>", "3<|im_end|>", "90<|im_end|>"]]
    rollout, engine, tok = hermes_env_rollout(script, max_turns=3)
    res = rollout.generate(episodes(tok, [("guess it", 37), ("guess it", 90)]))
    b = res.value
    user = "\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    want = "".join(t + (user.format(obs) if obs else "") for t, obs in
                   zip(script[0][:3], ["lower", "higher", None]))
    ids = sample_ids(b, 0)
    assert ids == tok.encode(want, add_special_tokens=False)  # each answer rendered as a user message
    obs = b.observation_mask[0, :len(ids)].bool().tolist()
    assert [tok.decode(ids[s:e]) for s, e in spans(obs)] == [user.format("lower"), user.format("higher")]
    assert not (b.response_mask[0].bool() & b.observation_mask[0].bool()).any()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ids[-1] == im_end and b.response_mask[0, len(ids) - 1] == 1
    assert b.env_reward.tolist() == [1.0, 0.0]  # found it at the last turn; never found in 3 turns
    assert len(engine.requests) == 3 + 3  # neither 4th turn was sampled
    assert res.metrics["env/reward"] == 0.5 and res.metrics["env/steps_per_sample"] == 3.0
    assert res.counts["tools/max_turns"] == 1 and res.counts["env/error"] == 0
    assert b.finish_reason == ["stop", "stop"]


def test_a_turn_with_a_tool_call_goes_to_the_tool_and_the_next_to_the_environment():
    script = [[CALL + "<|im_end|>", "56088<|im_end|>"]]
    rollout, engine, tok = hermes_env_rollout(script, names=["calculator"])
    res = rollout.generate(episodes(tok, [("123*456?", 56088)]))
    text = tok.decode(sample_ids(res.value, 0))
    assert "<tool_response>\n56088\n</tool_response>" in text  # the tool answered the call
    assert res.value.env_reward.tolist() == [1.0] and res.metrics["env/steps_per_sample"] == 1.0
    assert res.counts["tools/calls"] == 1 and len(engine.requests) == 2


class Broken:
    """Fails as its `how` says: at reset, in step, by returning a wrong shape, or by hanging."""

    def __init__(self, *, how: str) -> None:
        self.how, self.steps = how, 0

    def reset(self, row):
        if self.how == "reset":
            raise RuntimeError("no episode today")

    def step(self, action):
        self.steps += 1
        if self.steps == 1:
            return "go on", 0.5, False
        if self.how == "step":
            raise KeyError("state lost")
        if self.how == "shape":
            return "go on", float("nan"), False
        if self.how == "hang":
            time.sleep(3)
        return "end", 1.0, True


@pytest.mark.parametrize("how,count", [("reset", "env/error"), ("step", "env/error"), ("shape", "env/error"),
                                       ("hang", "env/timeout")])
def test_a_broken_environment_ends_its_episode_with_the_rewards_it_gave(monkeypatch, how, count):
    monkeypatch.setitem(ENVIRONMENTS._items, "broken", Broken)
    script = [["a<|im_end|>", "b<|im_end|>", "c<|im_end|>"]]
    rollout, engine, tok = hermes_env_rollout(script, env="broken", env_kwargs={"how": how}, timeout_s=0.3)
    res = rollout.generate(episodes(tok, [("q", 0)]))
    assert res.counts[count] == 1
    if how == "reset":  # no episode: the first turn ends the sample, as without an environment
        assert len(engine.requests) == 1 and res.value.env_reward.tolist() == [0.0]
    else:  # the first step's 0.5 is kept; the failed second step ends the episode
        assert len(engine.requests) == 2 and res.value.env_reward.tolist() == [0.5]
    assert all(math.isfinite(v) for v in res.metrics.values())


class Again:
    """Never done: answers every turn with "1" (a digit of the plain-format alphabet)."""

    def reset(self, row):
        self.prompt = row["prompt"]

    def step(self, action):
        return "1", 0.25, False


def test_plain_environment_turns_on_the_real_engine_are_the_engine_ids_token_for_token(monkeypatch):
    """The char tokenizer's turns end at EOS; the environment answers `{1}` and the model goes
    on, so EOS is sampled inside the response. Trained ids, masks and log-probs are the engine's."""
    monkeypatch.setitem(ENVIRONMENTS._items, "again", Again)
    tok = char_tokenizer("0123456789+-*=() []{}")
    model = build_model(tiny_model_config(vocab_size=len(tok)), seed=0)
    engine = RecordingEngine(model, pad_token_id=tok.pad_token_id, device=torch.device("cpu"))
    tools = ToolsConfig(env="again", format="plain", max_turns=3)
    rollout = Rollout(Rollout.Config(n=2, max_new_tokens=40, tools=tools), engine, tok, seed=0, rank=0)
    res = rollout.generate(episodes(tok, [("12*34=", 408), ("5+6=", 11)]))
    b = res.value
    final = {}
    for req, comp in engine.log:
        final[req.sampling.seed] = list(req.prefix) + list(comp.tokens)
    seeds = list(dict.fromkeys(r.sampling.seed for r, _ in engine.log))
    turns = 0
    for i in range(len(b)):
        ids = sample_ids(b, i)
        assert ids[:len(final[seeds[i]])] == final[seeds[i]]
        for s, e in spans(b.observation_mask[i, :len(ids)].bool().tolist()):
            assert ids[s - 1] == tok.eos_token_id and b.response_mask[i, s - 1] == 1  # EOS ended the turn
            assert tok.decode(ids[s:e]) == "{1}"[:e - s]
            turns += 1
        steps = sum(1 for r, _ in engine.log if r.sampling.seed == seeds[i])
        if b.finish_reason[i] == "stop":
            assert steps == 3 and b.env_reward[i] == pytest.approx(0.25 * 3)  # every turn scored
    assert turns > 0
    logp, _ = token_logprobs(model, b)
    m = b.response_mask.bool()
    torch.testing.assert_close(logp[m], b.rollout_logp[m], rtol=0, atol=1e-5)


def test_the_reward_adds_the_weighted_environment_reward_and_logs_both_parts():
    batch = Batch(response_text=["4", "5", "4"], ground_truth=["4", "4", "4"], data_source=["addition"] * 3,
                  env_reward=torch.tensor([0.0, 1.0, 0.5]))
    res = Reward(Reward.Config(scorer="addition", env_weight=0.5), environment=True).score(batch)
    torch.testing.assert_close(res.value, torch.tensor([1.0, 0.5, 1.25]))  # [1, 0, 1] + 0.5 x env
    assert res.metrics == pytest.approx({"reward/scorer": 2 / 3, "reward/env": 0.5})
    alone = Reward(Reward.Config(scorer="none"), environment=True).score(batch)
    torch.testing.assert_close(alone.value, torch.tensor([0.0, 1.0, 0.5]))
    # without an environment the field is all zeros and nothing more is logged
    plain = Reward(Reward.Config(scorer="addition")).score(batch.with_fields(env_reward=torch.zeros(3)))
    assert plain.metrics == {} and plain.value.tolist() == [1.0, 0.0, 1.0]


def test_an_environment_by_import_path_from_the_command_line_and_a_typo_named():
    from core.config import load_config
    from launch.config import JobConfig
    from tests.test_train_e2e import ROOT
    cfg = load_config(JobConfig, ROOT / "configs" / "quickstart.yaml",
                      ["rollout.tools.env=tests.test_environments:Again", "rollout.tools.format=plain"])
    rollout = Rollout(cfg.rollout, ScriptedEngine(char_tokenizer("0123"), []), char_tokenizer("0123"),
                      seed=0, rank=0)
    assert rollout.multiturn is not None and rollout.multiturn.env_factory is Again
    with pytest.raises(ValueError, match="guess_number"):
        ENVIRONMENTS.get("guess_numbr")


@pytest.mark.slow
@pytest.mark.dist
def test_the_tools_quickstart_trains_on_environment_rewards_alone(tmp_path):
    """3 steps of the tools quickstart with the scorer off and guess_number as the verifier of
    the final answer (the product is the hidden number): the reward is the environment's, logged
    as reward/env beside reward/scorer = 0, on 2 ranks."""
    out = tmp_path / "env"
    torchrun("configs/quickstart-tools.yaml", f"run.output_dir={out}", "run.steps=3", "data.prompts_per_step=8",
             "rollout.n=4", "eval.every=0", "data.task.eval_size=40", "tracking.enabled=false",
             "checkpoint.export_hf=false", "rollout.tools.env=guess_number", "reward.scorer=none")
    train = [r for r in read_metrics(out) if r["step"] > 0]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert r["reward/scorer"] == 0.0 and math.isfinite(r["reward/env"])
        assert r["reward/correctness"] == pytest.approx(r["reward/env"], abs=1e-6)
        assert r["env/reward"] == pytest.approx(r["reward/env"], abs=1e-6)
    assert max(r["reward/env"] for r in train) > 0  # the warm-up model gets some right
    cfg = (out / "config.yaml").read_text()
    assert "env: guess_number" in cfg
