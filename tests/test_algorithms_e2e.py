"""Every registered algorithm runs 3 steps on the quickstart task with 2 processes, and its
per-step numbers and resolved preset equal the committed golden ones (tests/golden/algorithms/).

The runs use two optimizer steps per training step (actor.mini_batches=2, critic too), so the
second one is off-policy and the clip ranges, dual clip and the other loss terms shape the
numbers; with one on-policy update per step the ratio is exactly 1 and a clip range could
change without any metric moving. The golden file also holds the resolved algorithm preset, so
changing any default of an algorithm fails its test with the key named.

After an intended numerics or preset change, regenerate and commit with the reason:

    ROLEGRAPH_UPDATE_GOLDEN=1 python -m pytest -q tests/test_algorithms_e2e.py
"""
from __future__ import annotations

import json
import math
import os

import pytest
import yaml

from algorithms.base import ALGORITHMS
from core.config import flatten
from tests.test_train_e2e import ROOT, read_metrics, torchrun

pytestmark = pytest.mark.dist

GOLDEN_DIR = ROOT / "tests" / "golden" / "algorithms"
CRITIC = {"ppo", "orz", "vapo"}
SMALL = ["run.steps=3", "data.prompts_per_step=8", "rollout.n=4", "eval.every=0",
         "data.task.eval_size=40", "data.task.train_size=2000",
         "actor.mini_batches=2", "critic.mini_batches=2", "tracking.enabled=false",
         "checkpoint.export_hf=false"]
EXTRA = {"vapo": ["algorithm.value_pretrain_steps=2"],
         # a teacher folder (the start point itself) through the reference role, and the GRPO term
         # on, so the policy moves away from the teacher and the distillation signal is not zero
         "opd": ["algorithm.reward_coef=1.0", "reference.model_path=assets/quickstart-sft"]}
"""Per-algorithm overrides of the golden runs."""
WALL_CLOCK = ("timing_s/", "perf/tokens_per_s", "reshard/seconds", "reshard/gbps")
"""Keys that measure time, not numerics: never compared."""


def tolerance(golden: float, key: str = "") -> dict[str, float]:
    """Per-key tolerance: 1e-4 relative (every run is seeded and deterministic on the CPU; the
    slack absorbs reduction-order differences between library releases), except for a value
    that is ~0 in the golden run (|v| < 1e-6, e.g. a loss at ratio 1): it must stay below 1e-6,
    so it fails as soon as it becomes a real number; and `mismatch/*`, which measure the float
    rounding between the engine's and the trainer's log-probs themselves (~1e-6 in float32): a
    release that sums in another order moves them by their own size (torch 2.14.1 against
    2.13.0: max_abs_logratio 1.9e-6 -> 3.3e-6), so they get 1e-5 absolute (a real mismatch, an
    engine in bf16, is ~1e-2)."""
    if key.startswith("mismatch/"):
        return {"rel": 0.0, "abs": 1e-5}
    if abs(golden) < 1e-6:
        return {"rel": 0.0, "abs": 1e-6}
    return {"rel": 1e-4, "abs": 0.0}


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(WALL_CLOCK)
            and (isinstance(v, (int, float, str)))}


def preset(out) -> dict:
    """The resolved `algorithm:` section of the run (the preset and the run's overrides), flattened."""
    return flatten_dict(yaml.safe_load((out / "config.yaml").read_text())["algorithm"])


def flatten_dict(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_dict(v, key + "."))
        else:
            out[key] = v
    return out


def test_every_registered_algorithm_has_a_golden_file():
    have = sorted(p.stem for p in GOLDEN_DIR.glob("*.json"))
    assert have == ALGORITHMS.names(), "regenerate with ROLEGRAPH_UPDATE_GOLDEN=1 (module docstring)"


@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_algorithm_matches_its_golden_numbers_on_two_ranks(tmp_path, name):
    out = tmp_path / name
    extra = EXTRA.get(name, [])
    proc = torchrun("configs/quickstart.yaml", f"run.output_dir={out}", f"algorithm.name={name}", *SMALL, *extra)
    rows = read_metrics(out)
    train = [r for r in rows if "stage" not in r]
    assert [r["step"] for r in train] == [0, 1, 2, 3]
    for r in rows:
        bad = {k: v for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, f"non-finite metrics at step {r['step']}: {bad}"
    built = next(line for line in proc.stdout.splitlines() if "built roles:" in line)
    assert ("critic" in built) == (name in CRITIC), built
    assert ("critic/vf_loss" in train[1]) == (name in CRITIC)
    if name == "vapo":
        assert [r["stage_step"] for r in rows if r.get("stage") == "value_pretrain"] == [1, 2]
    if name == "reinforce_pp":  # k1 KL in the reward needs the reference
        assert "reference" in built

    got = {"algorithm": preset(out), "rows": [comparable(r) for r in rows]}
    path = GOLDEN_DIR / f"{name}.json"
    if os.environ.get("ROLEGRAPH_UPDATE_GOLDEN"):
        GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(got, indent=1) + "\n")
    golden = json.loads(path.read_text())
    assert got["algorithm"] == golden["algorithm"], sorted(
        (k, golden["algorithm"].get(k), got["algorithm"].get(k))
        for k in set(golden["algorithm"]) | set(got["algorithm"])
        if golden["algorithm"].get(k) != got["algorithm"].get(k))
    assert len(got["rows"]) == len(golden["rows"])
    for g, w in zip(got["rows"], golden["rows"]):
        where = f"step {w['step']}" + (f" ({w['stage']} {w['stage_step']})" if "stage" in w else "")
        assert set(g) == set(w), f"{where}: metrics differ: {sorted(set(g) ^ set(w))}"
        for k, want in w.items():
            if isinstance(want, str):
                assert g[k] == want, f"{where} {k}"
            else:
                assert g[k] == pytest.approx(want, **tolerance(want, k)), f"{where} {k}"


def test_golden_files_check_every_algorithm_default():
    """Each golden preset holds every field of its algorithm's config section."""
    from core.config import load_config
    from launch.config import JobConfig
    for name in ALGORITHMS.names():
        golden = json.loads((GOLDEN_DIR / f"{name}.json").read_text())["algorithm"]
        cfg = load_config(JobConfig, ROOT / "configs" / "quickstart.yaml", [f"algorithm.name={name}"])
        fields = {k for k in flatten(cfg) if k.startswith("algorithm.")}
        assert {f"algorithm.{k}" for k in golden} == fields, name
