from __future__ import annotations  # the loader must resolve string annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
import yaml

from core.config import (
    apply_overrides,
    flatten,
    from_dict,
    load_config,
    parse_cli,
    to_dict,
    to_yaml,
)


@dataclass(kw_only=True, slots=True)
class RunConfig:
    output_dir: str = "runs/x"
    """Where checkpoints and metrics go."""
    steps: int = 10
    """Optimizer steps."""
    seed: int = 0
    """Global seed."""


@dataclass(kw_only=True, slots=True)
class ActorConfig:
    lr: float = 1e-6
    """Peak learning rate."""
    warmup_steps: int = 0
    """Linear warmup length, in steps."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""


@dataclass(kw_only=True, slots=True)
class AlgoConfig:
    name: Literal["grpo", "ppo"] = "grpo"
    """Which algorithm runs."""
    group_size: Optional[int] = None
    """Samples per prompt; None takes the algorithm's default."""


@dataclass(kw_only=True, slots=True)
class Top:
    run: RunConfig = field(default_factory=RunConfig)
    """Run bookkeeping."""
    actor: ActorConfig = field(default_factory=ActorConfig)
    """Policy optimizer."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """Algorithm choice."""
    model_config: dict[str, Any] = field(default_factory=dict)
    """Free-form kwargs for the model constructor."""
    tags: list[str] = field(default_factory=list)
    """Labels for the tracker."""
    x: list[int] = field(default_factory=list)
    """A list of ints, for override tests."""
    note: str | None = None
    """Free text."""


@dataclass(kw_only=True, slots=True)
class NeedsName:
    name: str
    """Required: no default."""
    size: int = 1
    """Has a default."""


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- loading -----------------------------------------------------------------------------------


def test_defaults_when_no_file_and_when_file_is_empty(tmp_path):
    assert load_config(Top, None) == Top()
    assert load_config(Top, write(tmp_path, "")) == Top()
    assert load_config(Top, write(tmp_path, "# only a comment\n")) == Top()


def test_nested_values_and_partial_sections(tmp_path):
    path = write(
        tmp_path,
        """
run:
  steps: 200
actor:
  warmup_steps: 5
  betas: [0.8, 0.95]
algo:
  name: ppo
model_config:
  hidden_size: 32
  layers: [1, 2]
tags: [a, b]
""",
    )
    cfg = load_config(Top, path)
    assert cfg.run == RunConfig(steps=200)  # untouched keys keep their defaults
    assert cfg.actor.warmup_steps == 5 and cfg.actor.lr == 1e-6
    assert cfg.actor.betas == (0.8, 0.95) and isinstance(cfg.actor.betas, tuple)
    assert cfg.algo.name == "ppo"
    assert cfg.model_config == {"hidden_size": 32, "layers": [1, 2]}
    assert cfg.tags == ["a", "b"]


def test_exponent_float_that_yaml_reads_as_str_becomes_float(tmp_path):
    path = write(tmp_path, "actor:\n  lr: 3e-6\n")
    assert yaml.safe_load(path.read_text())["actor"]["lr"] == "3e-6"  # the YAML 1.1 quirk
    cfg = load_config(Top, path)
    assert cfg.actor.lr == 3e-6 and type(cfg.actor.lr) is float


def test_int_accepted_for_float():
    cfg = from_dict(Top, {"actor": {"lr": 1}})
    assert cfg.actor.lr == 1.0 and type(cfg.actor.lr) is float


def test_round_trip_through_yaml(tmp_path):
    cfg = Top(
        run=RunConfig(steps=3, output_dir="runs/y"),
        actor=ActorConfig(lr=2.5e-7, betas=(0.5, 0.6)),
        algo=AlgoConfig(name="ppo", group_size=8),
        model_config={"hidden_size": 64, "act": "gelu", "dims": [1, 2]},
        tags=["t1"],
        note="hello",
    )
    text = to_yaml(cfg)
    assert text.startswith("run:\n")  # field order, not sorted
    assert from_dict(Top, yaml.safe_load(text)) == cfg
    assert load_config(Top, write(tmp_path, text)) == cfg
    assert load_config(Top, write(tmp_path, to_yaml(Top()), "d.yaml")) == Top()


def test_to_dict_is_plain():
    d = to_dict(Top())
    assert d["actor"] == {"lr": 1e-6, "warmup_steps": 0, "betas": [0.9, 0.999]}
    assert d["note"] is None and d["tags"] == []
    with pytest.raises(TypeError):
        to_dict(3)


def test_missing_required_key_is_named():
    with pytest.raises(ValueError, match=r"missing required config key 'name'"):
        from_dict(NeedsName, {"size": 2})
    assert from_dict(NeedsName, {"name": "a"}) == NeedsName(name="a")


# --- unknown keys ------------------------------------------------------------------------------


def test_misspelled_nested_key_names_path_and_suggestion(tmp_path):
    path = write(tmp_path, "actor:\n  lrr: 0.1\n")
    with pytest.raises(ValueError) as e:
        load_config(Top, path)
    msg = str(e.value)
    assert "'actor.lrr'" in msg and "did you mean 'actor.lr'?" in msg and str(path) in msg


def test_misspelled_section_names_section(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'acter'.*did you mean 'actor'\?"):
        load_config(Top, write(tmp_path, "acter:\n  lr: 0.1\n"))


def test_unknown_key_with_nothing_close_lists_valid_keys():
    with pytest.raises(ValueError) as e:
        from_dict(Top, {"actor": {"zzzzzz": 1}})
    assert "'actor.zzzzzz'" in str(e.value)
    assert "valid keys under 'actor': lr, warmup_steps, betas" in str(e.value)


def test_misspelled_override_names_full_dotted_key():
    with pytest.raises(ValueError, match=r"unknown override key 'actor.lrr'; did you mean 'actor.lr'\?"):
        load_config(Top, None, ["actor.lrr=0.1"])
    with pytest.raises(ValueError, match=r"did you mean 'actor.lr'\?"):
        apply_overrides({}, ["actr.lr=0.1"], schema=Top)
    with pytest.raises(ValueError, match=r"valid keys under 'actor': lr, warmup_steps, betas"):
        apply_overrides({}, ["actor.qqqqqq=1"], schema=Top)


def test_override_below_a_scalar_is_rejected():
    with pytest.raises(ValueError, match=r"'run.steps' is int, it has no sub-keys"):
        apply_overrides({}, ["run.steps.x=1"], schema=Top)


# --- overrides ---------------------------------------------------------------------------------


def test_override_values_are_parsed_as_yaml(tmp_path):
    path = write(tmp_path, "run:\n  steps: 100\nnote: from file\n")
    cfg = load_config(
        Top,
        path,
        ["x=[1,2]", "actor.lr=0.5", "run.steps=3", "note=null", "model_config.hidden_size=64"],
    )
    assert cfg.x == [1, 2]
    assert cfg.actor.lr == 0.5
    assert cfg.run.steps == 3
    assert cfg.note is None
    assert cfg.model_config == {"hidden_size": 64}


def test_override_of_key_absent_from_yaml(tmp_path):
    path = write(tmp_path, "run:\n  steps: 100\n")
    cfg = load_config(Top, path, ["actor.warmup_steps=7", "algo.name=ppo", "actor.lr=1e-5"])
    assert cfg.actor.warmup_steps == 7 and cfg.algo.name == "ppo" and cfg.actor.lr == 1e-5
    assert cfg.run.steps == 100


def test_override_fills_an_empty_yaml_section(tmp_path):
    cfg = load_config(Top, write(tmp_path, "actor:\n"), ["actor.lr=0.25"])
    assert cfg.actor.lr == 0.25


def test_apply_overrides_parsing_and_copy():
    data = {"a": {"b": 1}}
    out = apply_overrides(data, ["a.b=2", "a.c.d=true", "e=", "f=hello", "g=0.5", "h=a=b"])
    assert data == {"a": {"b": 1}}  # input untouched
    assert out == {"a": {"b": 2, "c": {"d": True}}, "e": "", "f": "hello", "g": 0.5, "h": "a=b"}


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1", ".a=1"])
def test_malformed_override(bad):
    with pytest.raises(ValueError, match="expected key.subkey=value"):
        apply_overrides({}, [bad])


def test_override_into_a_scalar_without_schema():
    with pytest.raises(ValueError, match=r"'a' holds 1, not a mapping"):
        apply_overrides({"a": 1}, ["a.b=2"])


# --- types -------------------------------------------------------------------------------------


def test_wrong_type_names_key_expected_and_value(tmp_path):
    path = write(tmp_path, "run:\n  steps: ten\n")
    with pytest.raises(ValueError) as e:
        load_config(Top, path)
    assert str(e.value) == f"config key 'run.steps' expects int, got str 'ten' (in {path})"


def test_bool_and_float_rejected_for_int():
    with pytest.raises(ValueError, match=r"'run.steps' expects int, got bool True"):
        from_dict(Top, {"run": {"steps": True}})
    with pytest.raises(ValueError, match=r"'run.steps' expects int, got float 3.0"):
        from_dict(Top, {"run": {"steps": 3.0}})


def test_float_rejects_non_numeric_str_and_bool():
    with pytest.raises(ValueError, match=r"'actor.lr' expects float, got str 'fast'"):
        from_dict(Top, {"actor": {"lr": "fast"}})
    with pytest.raises(ValueError, match=r"'actor.lr' expects float, got bool False"):
        from_dict(Top, {"actor": {"lr": False}})


def test_literal_error_lists_choices():
    with pytest.raises(ValueError) as e:
        from_dict(Top, {"algo": {"name": "dpo"}})
    assert "'algo.name' expects one of 'grpo', 'ppo', got str 'dpo'" in str(e.value)


def test_optional_accepts_none_and_checks_the_rest():
    assert from_dict(Top, {"algo": {"group_size": None}}).algo.group_size is None
    assert from_dict(Top, {"algo": {"group_size": 4}}).algo.group_size == 4
    with pytest.raises(ValueError, match=r"'algo.group_size' expects int, got str 'x'"):
        from_dict(Top, {"algo": {"group_size": "x"}})


def test_containers_check_their_items():
    with pytest.raises(ValueError, match=r"'tags\[1\]' expects str, got int 3"):
        from_dict(Top, {"tags": ["a", 3]})
    with pytest.raises(ValueError, match=r"'tags' expects list\[str\], got str 'a'"):
        from_dict(Top, {"tags": "a"})
    with pytest.raises(ValueError, match=r"'actor.betas' expects tuple\[float, float\] \(2 items\)"):
        from_dict(Top, {"actor": {"betas": [0.9]}})
    with pytest.raises(ValueError, match=r"'model_config' expects dict\[str, Any\], got list"):
        from_dict(Top, {"model_config": [1]})


def test_none_for_a_non_optional_section_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"'actor' expects ActorConfig \(a mapping\), got NoneType None"):
        load_config(Top, write(tmp_path, "actor:\n"))


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ValueError, match="must be a mapping"):
        from_dict(Top, [1, 2])  # type: ignore[arg-type]


# --- files -------------------------------------------------------------------------------------


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "run:\n  steps: 1\n  seed: [1, 2\n")
    with pytest.raises(ValueError) as e:
        load_config(Top, path)
    msg = str(e.value)
    assert str(path) in msg and "invalid YAML" in msg and "line 4" in msg


def test_non_mapping_top_level(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ValueError, match=r"must hold a mapping at the top level, got list"):
        load_config(Top, path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config file not found: .*nope\.yaml"):
        load_config(Top, tmp_path / "nope.yaml")


# --- cli and flatten ---------------------------------------------------------------------------


def test_parse_cli():
    assert parse_cli(["--config", "a.yaml", "k=v"]) == ("a.yaml", ["k=v"])
    assert parse_cli(["k=v", "--config=a.yaml", "x.y=[1, 2]"]) == ("a.yaml", ["k=v", "x.y=[1, 2]"])
    assert parse_cli(["actor.lr=1e-6"]) == (None, ["actor.lr=1e-6"])
    assert parse_cli([]) == (None, [])


@pytest.mark.parametrize(
    "argv", [["--lr=1"], ["-h"], ["--help"], ["positional"], ["--config"], ["--config="],
             ["--config", "a.yaml", "--config", "b.yaml"]]
)
def test_parse_cli_rejects(argv):
    with pytest.raises(ValueError, match=r"usage: \[--config PATH"):
        parse_cli(argv)


def test_flatten_uses_dotted_keys():
    cfg = Top(model_config={"hidden_size": 64, "rope": {"theta": 1e4}}, tags=["a"])
    flat = flatten(cfg)
    assert flat["run.steps"] == 10 and flat["actor.lr"] == 1e-6
    assert flat["actor.betas"] == [0.9, 0.999]
    assert flat["model_config.hidden_size"] == 64 and flat["model_config.rope.theta"] == 1e4
    assert flat["tags"] == ["a"] and flat["note"] is None
    assert flatten(Top())["model_config"] == {}  # an empty dict keeps its key
    assert not any(isinstance(v, dict) and v for v in flat.values())


# --- default instances and typed slots -------------------------------------------------------

from core.config import Slot  # noqa: E402


@dataclass(kw_only=True, slots=True)
class Clip:
    low: float = 0.2
    high: float = 0.2
    agg: str = "token-mean"


@dataclass(kw_only=True, slots=True)
class Method(Slot):
    name: str = "plain"
    clip: Clip = field(default_factory=Clip)
    steps: int = 1

    @classmethod
    def variant(cls, name: str) -> type:
        table = {"plain": Method, "wide": Wide, "deep": Deep}
        if name not in table:
            raise ValueError(f"unknown method {name!r}; valid: {', '.join(table)}")
        return table[name]


@dataclass(kw_only=True, slots=True)
class WideClip(Clip):
    high: float = 0.28
    agg: str = "seq-mean"


@dataclass(kw_only=True, slots=True)
class Wide(Method):
    name: str = "wide"
    clip: WideClip = field(default_factory=WideClip)
    steps: int = 5


@dataclass(kw_only=True, slots=True)
class Deep(Method):
    name: str = "deep"
    layers: int = 3


@dataclass(kw_only=True, slots=True)
class WithPreset:
    # a preset written as a default instance (what the old loader ignored)
    clip: Clip = field(default_factory=lambda: Clip(high=0.3, agg="seq-mean"))
    method: Method = field(default_factory=Method)


def test_a_partial_section_overlays_the_default_instance():
    cfg = load_config(WithPreset, None, ["clip.low=0.1"])
    assert (cfg.clip.low, cfg.clip.high, cfg.clip.agg) == (0.1, 0.3, "seq-mean")


def test_slot_name_picks_the_variant_and_partial_overrides_keep_its_preset():
    cfg = load_config(WithPreset, None, ["method.name=wide", "method.clip.low=0.1"])
    assert type(cfg.method) is Wide and type(cfg.method.clip) is WideClip
    assert (cfg.method.clip.low, cfg.method.clip.high, cfg.method.clip.agg, cfg.method.steps) == \
        (0.1, 0.28, "seq-mean", 5)
    assert load_config(WithPreset, None, ["method=deep", "method.layers=4"]).method.layers == 4


def test_slot_keys_are_checked_against_the_chosen_variant():
    with pytest.raises(ValueError, match=r"unknown override key 'method.layerz'.*did you mean 'method.layers'"):
        load_config(WithPreset, None, ["method.name=deep", "method.layerz=4"])
    with pytest.raises(ValueError, match=r"unknown override key 'method.layers'"):
        load_config(WithPreset, None, ["method.layers=4"])  # plain has no layers
    with pytest.raises(ValueError, match=r"method.name.*unknown method 'wdie'; valid: plain, wide, deep"):
        load_config(WithPreset, None, ["method.name=wdie"])


def test_a_slot_in_a_file_round_trips_through_yaml(tmp_path):
    cfg = load_config(WithPreset, write(tmp_path, "method: {name: wide, steps: 2}\n"))
    assert type(cfg.method) is Wide and cfg.method.steps == 2 and cfg.method.clip.high == 0.28
    again = from_dict(WithPreset, yaml.safe_load(to_yaml(cfg)))
    assert again == cfg and type(again.method) is Wide


def test_switching_a_slot_on_the_command_line_drops_the_files_keys_for_it(tmp_path, caplog):
    path = write(tmp_path, "method: {name: plain, steps: 7, clip: {agg: x}}\n")
    with caplog.at_level("INFO", logger="core.config"):
        cfg = load_config(WithPreset, path, ["method.name=wide", "method.clip.low=0.05"])
    assert type(cfg.method) is Wide and cfg.method.steps == 5  # Wide's preset, not the file's 7
    assert (cfg.method.clip.low, cfg.method.clip.agg) == (0.05, "seq-mean")
    assert "method.name=wide" in caplog.text and "clip.agg, steps" in caplog.text
    same = load_config(WithPreset, path, ["method.name=plain", "method.clip.low=0.05"])
    assert same.method.steps == 7 and same.method.clip.agg == "x"  # no switch: the file applies


@pytest.mark.parametrize("config,has_critic", [("configs/grpo.yaml", False), ("configs/quickstart.yaml", False),
                                               ("configs/ppo.yaml", True)])
def test_a_runs_resolved_config_holds_at_most_150_keys_and_only_used_roles(tmp_path, config, has_critic):
    """Issue #12: a resolved GRPO config has at most 150 leaf keys; config.yaml leaves out the
    sections of optional roles the plan does not use (PPO keeps its critic), and loading it back
    gives the run's config again."""
    from launch.build import build_plan
    from launch.config import JobConfig
    from launch.train import run_config
    cfg = load_config(JobConfig, config, [])
    tree = run_config(cfg, build_plan(cfg).roles())
    assert ("critic" in tree) == has_critic
    if not has_critic:
        assert len(flatten(tree)) <= 150, len(flatten(tree))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    again = load_config(JobConfig, tmp_path / "config.yaml", [])
    assert run_config(again, build_plan(again).roles()) == tree
