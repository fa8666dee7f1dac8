"""The side-by-side harness against TRL (tools/bench_trl.py, issue #19): the parts that run
without TRL installed (CI installs only the test extra): its equal-settings overrides are valid
rolegraph config, its random model has the issue's shape, and it flags a busy machine. With
trl installed (pip install -e '.[bench]'), one short side-by-side run as well."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import time

import pytest

from core.config import load_config
from launch.config import JobConfig
from tests.test_train_e2e import ROOT
from tools.bench_trl import equal_settings, random_model, timed_run


@pytest.mark.parametrize("bf16", [False, True])
def test_the_equal_settings_are_valid_rolegraph_config(bf16):
    cfg = load_config(JobConfig, ROOT / "configs" / "quickstart.yaml", equal_settings(7, bf16=bf16))
    assert cfg.run.steps == 7 and cfg.eval.every == 7 and not cfg.tracking.enabled
    assert cfg.algorithm.loss.kl_coef == 0.0 and cfg.algorithm.loss.agg_mode == "token-mean"
    assert cfg.algorithm.recompute_old_logp is False
    assert (cfg.actor.param_dtype, cfg.rollout.dtype) == (("bfloat16",) * 2 if bf16 else ("float32",) * 2)


def test_the_random_model_has_the_issues_17m_shape(tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    folder = random_model("384x8x6x2", "assets/quickstart-sft", tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 17.3
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (6, 2)
    assert "17.3M parameters" in capsys.readouterr().out


def test_a_busy_machine_is_flagged():
    """A process spinning on one of the cores while the timed command sleeps: other processes
    took ~1/cores of the machine (0.5 on this 2-core box), far above the 10% flag."""
    import os
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        run = timed_run(["sleep", "1.5"])
    finally:
        spin.kill()
        spin.wait()
    assert run["wall_s"] >= 1.5
    assert run["other_cpu_share"] > 0.5 / (os.cpu_count() or 1), run


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is the bench extra's")
def test_a_short_side_by_side_run(tmp_path):
    from tools.bench_trl import main
    out = main(["--steps", "1", "--warmup", "1", "--work", str(tmp_path), "--out", str(tmp_path / "r.json")])
    assert out["ratio"] > 0
    for side in ("rolegraph", "trl"):
        assert 0 <= out[side]["accuracy"] <= 1 and len(out[side]["step_s"]) == 1
