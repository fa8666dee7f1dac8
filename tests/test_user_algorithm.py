"""The user-defined example algorithm: short, selected by import path, and it runs."""
from __future__ import annotations

import math

import pytest
import torch

from examples.median_grpo import median_advantages
from tests.test_train_e2e import ROOT, read_metrics, torchrun


def test_example_is_short():
    assert len((ROOT / "examples" / "median_grpo.py").read_text().splitlines()) <= 80


def test_median_advantages_hand_computed():
    # group 0: [1, 0, 0] median 0 -> [1, 0, 0]; group 1: [3, 5, 10] median 5 -> [-2, 0, 5]
    adv = median_advantages(torch.tensor([1.0, 0.0, 0.0, 3.0, 5.0, 10.0]), torch.tensor([0, 0, 0, 1, 1, 1]),
                            torch.ones(6, 2), scale=2.0)
    torch.testing.assert_close(adv[:, 1], torch.tensor([2.0, 0.0, 0.0, -4.0, 0.0, 10.0]))


@pytest.mark.dist
def test_example_runs_from_yaml_import_path(tmp_path):
    out = tmp_path / "median"
    torchrun("configs/quickstart.yaml", f"run.output_dir={out}", "algorithm.name=examples.median_grpo:build_graph",
             "algorithm.scale=2.0", "run.steps=2", "data.prompts_per_step=8", "rollout.n=4",
             "eval.every=0", "data.task.eval_size=20", "data.task.train_size=1000")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    assert "timing_s/advantages" in rows[1]


def test_example_is_loaded_as_strictly_as_a_builtin_algorithm():
    from core.config import load_config
    from examples.median_grpo import MedianConfig
    from launch.config import JobConfig
    path = ROOT / "configs" / "quickstart.yaml"
    with pytest.raises(ValueError, match=r"unknown override key 'algorithm.scal'; did you mean 'algorithm.scale'"):
        load_config(JobConfig, path, ["algorithm.name=examples.median_grpo:build_graph", "algorithm.scal=2"])
    cfg = load_config(JobConfig, path, ["algorithm.name=examples.median_grpo:build_graph", "algorithm.scale=3"])
    assert type(cfg.algorithm) is MedianConfig and cfg.algorithm.scale == 3.0
    assert cfg.algorithm.loss.agg_mode == "seq-mean-token-mean"  # its Config's GRPO loss preset
