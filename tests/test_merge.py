"""Branch-merge: weighted average and task arithmetic, tensor by tensor in bounded memory."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from core.models import build_model
from launch.merge import MergeConfig, merge
from tests.helpers import tiny_model_config
from tests.test_train_e2e import ROOT


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, seed in (("base", 0), ("m1", 1), ("m2", 2)):
        build_model(tiny_model_config(), seed=seed).save_pretrained(root / name)
        out[name] = root / name
    return out


def test_a_model_merged_with_itself_is_unchanged(folders, tmp_path):
    out = merge(MergeConfig(models=[str(folders["m1"])] * 2, output=str(tmp_path / "self")))
    a, b = load_file(folders["m1"] / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    AutoModelForCausalLM.from_pretrained(out, local_files_only=True)  # a loadable folder


def test_task_arithmetic_matches_hand_computation(folders, tmp_path):
    out = merge(MergeConfig(models=[str(folders["m1"]), str(folders["m2"])], weights=[0.3, 0.7],
                            method="task_arithmetic", base=str(folders["base"]), scale=0.5,
                            output=str(tmp_path / "ta")))
    base, m1, m2 = (load_file(folders[n] / "model.safetensors") for n in ("base", "m1", "m2"))
    got = load_file(out / "model.safetensors")
    for k in base:
        expect = base[k] + 0.5 * (0.3 * (m1[k] - base[k]) + 0.7 * (m2[k] - base[k]))
        torch.testing.assert_close(got[k], expect, rtol=1e-6, atol=1e-6)
    avg = load_file(merge(MergeConfig(models=[str(folders["m1"]), str(folders["m2"])],
                                      output=str(tmp_path / "avg"))) / "model.safetensors")
    torch.testing.assert_close(avg["lm_head.weight"], 0.5 * m1["lm_head.weight"] + 0.5 * m2["lm_head.weight"])


def test_mismatched_models_are_rejected(folders, tmp_path):
    other = tmp_path / "other"
    build_model(tiny_model_config(num_hidden_layers=1), seed=0).save_pretrained(other)
    with pytest.raises(ValueError, match="different tensors"):
        merge(MergeConfig(models=[str(folders["m1"]), str(other)], output=str(tmp_path / "x")))
    with pytest.raises(ValueError, match="needs base"):
        merge(MergeConfig(models=[str(folders["m1"])], method="task_arithmetic", output=str(tmp_path / "y")))


BUILD = """
import sys
from core.models import build_model, ModelConfig
cfg = ModelConfig(config=dict(model_type="qwen2", vocab_size=1000, hidden_size=512, intermediate_size=2048,
                              num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8))
for i in range(4):
    build_model(cfg, seed=i).save_pretrained(f"{sys.argv[1]}/m{i}")
"""
PEAK = """
import json, os, resource, sys
from launch.merge import MergeConfig, merge
root = sys.argv[1]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
merge(MergeConfig(models=[f"{root}/m{i}" for i in range(1, 4)], method="task_arithmetic",
                  base=f"{root}/m0", output=f"{root}/out"))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"model_bytes": os.path.getsize(f"{root}/m0/model.safetensors"), "peak_growth": after - before}))
"""


@pytest.mark.slow
def test_peak_memory_stays_near_one_model(tmp_path):
    """Base + 3 models of 105 MB: merging (in a fresh process) grows the peak RSS by about one model,
    the merged model being built, not by four."""
    subprocess.run([sys.executable, "-c", BUILD, str(tmp_path)], cwd=ROOT, check=True, timeout=600)
    proc = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"model {m['model_bytes'] / 1e6:.0f} MB, peak RSS growth {m['peak_growth'] / 1e6:.0f} MB")
    assert m["peak_growth"] < 2.0 * m["model_bytes"]
