"""launch.bench end to end on 2 gloo processes (tiny shape): the breakdown is written and its
numbers are consistent with each other."""
from __future__ import annotations

import json

import pytest

from launch.bench import SHAPES, summarize
from tests.test_train_e2e import torchrun


@pytest.mark.dist
def test_bench_writes_a_consistent_breakdown(tmp_path):
    out = tmp_path / "bench"
    proc = torchrun("configs/quickstart.yaml", f"run.output_dir={out}", "bench.shape=tiny",
                    "bench.steps=2", "data.prompts_per_step=8", "rollout.n=2", module="launch.bench")
    s = json.loads((out / "bench.json").read_text())
    assert "generation" in proc.stdout and "weight reshard" in proc.stdout
    assert s["device"] == "cpu" and s["world_size"] == 2 and "mfu" not in s  # no peak known on CPU
    assert s["reshard/bytes"] == s["params"] * 4  # every float32 weight crosses once per sync
    assert s["generate_tokens_per_s"] == pytest.approx(s["response_tokens"] / s["generate_s"])
    assert s["prompt_tokens"] == 8 * 2 * 8  # 8 prompts x 2 samples x "ddd+ddd=" (8 characters)
    assert 0 < s["response_tokens"] <= 8 * 2 * 6
    assert "qwen2.5-0.5b" in SHAPES


def test_mfu_is_six_n_t_over_time_and_peak():
    rows = [{"timing_s/generate": 2.0, "timing_s/update_actor": 4.0, "perf/response_tokens": 300.0,
             "perf/prompt_tokens": 100.0, "timing_s/step": 7.0}] * 2
    s = summarize(rows, n_params=10**9, world=2, epochs=1, peak=1.2)
    assert s["generate_tokens_per_s"] == 150 and s["train_tokens_per_s_per_device"] == 50
    assert s["train_tflops_per_device"] == pytest.approx(6 * 1e9 * 400 / 4 / 2 / 1e12)  # 0.3
    assert s["mfu"] == pytest.approx(0.25)
