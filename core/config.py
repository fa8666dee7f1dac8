"""Typed, strict configuration: a dataclass tree, YAML files as instances of it, CLI overrides.

The schema is a tree of ``@dataclass(kw_only=True, slots=True)`` classes; a YAML file is an
instance of it written as nested mappings (``actor: {lr: 1e-6}``). Overrides address the same
tree with dotted keys, ``actor.lr=3e-6 run.steps=10 tags=[a,b]``, each value parsed as YAML
(``x=null`` is None, ``x=`` the empty string). Loading is strict: an unknown key is an error
naming the nearest valid key, a wrong type an error naming the key, the expected type and the
value. A key the data does not set keeps the *default instance's* value: a section given in
part overlays the field's default (its ``default_factory()``), so a preset survives a partial
override of one of its nested fields. Keys under ``dict[str, ...]`` or ``Any`` fields are
free-form.

A section typed with a `Slot` subclass is a *typed slot*: its ``name`` field chooses the
concrete schema (``Slot.variant(name)``, e.g. ``algorithm.name=dapo`` makes the whole
``algorithm:`` section a ``DAPOConfig``), and a bare string stands for ``{name: <string>}``
(``rollout.engine=sglang``). Values are range-checked where a section's ``__post_init__`` says so
(`at_least`, `above`, `between`): the error names the full key, the allowed range and the
source. When a command-line override changes a slot's name from the one
the file chose, the file's other keys of that slot belong to the file's choice and are not
applied (logged); the new variant starts from its own defaults plus the command line's keys.
Typical entry point::

    path, overrides = parse_cli(sys.argv[1:])
    cfg = load_config(TrainConfig, path, overrides)
"""

from __future__ import annotations

import collections.abc as abc
import copy
import dataclasses
import difflib
import functools
import logging
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeGuard, TypeVar

import yaml

logger = logging.getLogger(__name__)

T = TypeVar("T")

USAGE = "usage: [--config PATH | --config=PATH] [key.subkey=value ...]"
_UNIONS = (typing.Union, types.UnionType)
_MAPPINGS = (dict, abc.Mapping)
_SEQUENCES = (list, tuple, abc.Sequence)


def from_dict(schema: type[T], data: Mapping[str, Any], *, source: str = "<config>") -> T:
    """Build a ``schema`` instance from plain nested data, strictly (see the module docstring)."""
    if not _is_schema(schema):
        raise TypeError(f"schema must be a dataclass type, got {schema!r}")
    if not isinstance(data, Mapping):
        raise ValueError(f"config (in {source}) must be a mapping, got {type(data).__name__}")
    return _build(schema, data, "", source)


class RangeError(ValueError):
    """A config value outside its allowed range; the loader names the full key and the source."""

    def __init__(self, field: str, allowed: str, value: Any) -> None:
        super().__init__(f"{field} must be {allowed}, got {value!r}")
        self.field, self.allowed, self.value = field, allowed, value


def at_least(cfg: Any, bound: float, *names: str) -> None:
    """Each named field of `cfg` (None skipped) is >= bound; for a `__post_init__`."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not value >= bound:
            raise RangeError(name, f">= {bound}", value)


def above(cfg: Any, bound: float, *names: str) -> None:
    """Each named field of `cfg` (None skipped) is > bound."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not value > bound:
            raise RangeError(name, f"> {bound}", value)


def between(cfg: Any, low: float, high: float, *names: str, open_high: bool = False) -> None:
    """Each named field of `cfg` (None skipped) is in [low, high] (or [low, high))."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not (low <= value < high if open_high else low <= value <= high):
            raise RangeError(name, f"in [{low}, {high}{')' if open_high else ']'}", value)


class Slot:
    """Base of a config section whose concrete schema its ``name`` field picks (a typed slot).

    Subclasses are dataclasses with a ``name: str`` field and implement ``variant``; each
    variant is a subclass of the slot's base class with its own defaults."""

    __slots__ = ()
    name: str

    @classmethod
    def variant(cls, name: str) -> type:
        """The concrete schema for ``name``; ValueError naming the valid names if unknown."""
        raise NotImplementedError


def load_config(
    schema: type[T], path: str | os.PathLike | None, overrides: Sequence[str] = ()
) -> T:
    """Read YAML from ``path`` (None: all defaults), apply ``overrides``, build ``schema``."""
    file_data = _read_yaml(path) if path is not None else {}
    data = apply_overrides(file_data, overrides, schema=schema)
    _drop_switched_slots(schema, file_data, data, [_parse_override(o) for o in overrides], "")
    parts = ([os.fspath(path)] if path is not None else []) + (["overrides"] if overrides else [])
    logger.debug("loading %s from %s", schema.__name__, parts or "defaults")
    return from_dict(schema, data, source=" + ".join(parts) or "<defaults>")


def apply_overrides(
    data: dict[str, Any], overrides: Sequence[str], *, schema: type | None = None
) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=yaml_value`` override set in it.

    With ``schema``, each key is checked against it first, so a typo fails before anything runs.
    """
    result = copy.deepcopy(dict(data))
    parsed = [_parse_override(o) for o in overrides]
    for key, value in parsed:
        _set_dotted(result, key, value)
    if schema is not None:  # after all are set: a slot's keys depend on its (overridden) name
        for key, _ in parsed:
            _check_override_key(schema, key, result)
    return result


def parse_cli(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Split ``argv`` into the ``--config`` path (or None) and the ``key=value`` overrides."""
    config_path: str | None = None
    overrides: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--config" or arg.startswith("--config="):
            if config_path is not None:
                raise ValueError(f"--config given more than once; {USAGE}")
            config_path = arg.partition("=")[2] if "=" in arg else next(args, "")
            if not config_path or config_path.startswith("-"):
                raise ValueError(f"--config needs a path; {USAGE}")
        elif arg.startswith("-") or "=" not in arg:
            raise ValueError(f"unrecognized argument {arg!r}; {USAGE}")
        else:
            overrides.append(arg)
    return config_path, overrides


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass instance -> plain nested dicts and lists (tuples become lists), for YAML."""
    if _is_schema(cfg) or not (dataclasses.is_dataclass(cfg) or isinstance(cfg, Mapping)):
        raise TypeError(f"to_dict expects a dataclass instance, got {cfg!r}")
    return _plain(cfg)


def to_yaml(cfg: Any) -> str:
    """YAML text that ``from_dict(type(cfg), yaml.safe_load(text))`` turns back into ``cfg``."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Any) -> dict[str, Any]:
    """``{"run.steps": 10, "actor.lr": 1e-06, ...}``: sections and dicts joined with dots.

    Lists stay values; an empty dict stays a value so its key is not lost.
    """
    out: dict[str, Any] = {}
    _flatten_into(to_dict(cfg), "", out)
    return out


def _build(cls: type, data: Mapping[str, Any], prefix: str, source: str, base: Any = None) -> Any:
    """``cls`` from ``data``; keys the data does not set come from ``base`` (the field's default
    instance) when it is of the same concrete class, else from the class's own defaults."""
    cls = _variant(cls, data, base, prefix)
    if type(base) is not cls:
        base = None
    fields = _init_fields(cls)
    for name in data:
        if name not in fields:
            hint = _suggest(str(name), _schema_paths(cls), prefix)
            raise ValueError(f"unknown config key '{_join(prefix, name)}' (in {source}); {hint}")
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        default = getattr(base, name) if base is not None else _default(f)
        if name in data:
            kwargs[name] = _coerce(_hints(cls)[name], data[name], key, source, default)
        elif base is not None:
            kwargs[name] = copy.deepcopy(default)
        elif default is dataclasses.MISSING:
            raise ValueError(f"missing required config key '{key}' (in {source})")
    try:
        return cls(**kwargs)
    except RangeError as e:
        raise ValueError(f"config key '{_join(prefix, e.field)}' must be {e.allowed}, got {e.value!r} "
                         f"(in {source})") from None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _is_slot(tp: Any) -> TypeGuard[type[Slot]]:
    return isinstance(tp, type) and issubclass(tp, Slot)


def _variant(cls: type, data: Mapping[str, Any], base: Any, prefix: str) -> type:
    """The concrete schema of a slot section (``cls`` itself for any other section)."""
    if not _is_slot(cls):
        return cls
    if "name" in data:
        name = data["name"]
    elif isinstance(base, cls):
        name = base.name
    else:
        name = _default(_init_fields(cls)["name"])
    if not isinstance(name, str):
        raise ValueError(f"config key '{_join(prefix, 'name')}' expects a name (str), got {name!r}")
    try:
        chosen = cls.variant(name)
    except ValueError as e:
        raise ValueError(f"config key '{_join(prefix, 'name')}': {e}") from None
    if not (isinstance(chosen, type) and issubclass(chosen, cls)):
        raise TypeError(f"'{_join(prefix, 'name')}={name}' resolves to {chosen!r}, not a {cls.__name__}")
    return chosen


def _coerce(tp: Any, value: Any, key: str, source: str, default: Any = None) -> Any:
    """Check ``value`` against the annotation ``tp``; return it, converted where that is safe.
    ``default`` is the field's default value, which a partial section overlays."""
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if tp is Any:
        return value
    if _is_schema(tp):
        if isinstance(value, tp):
            return value
        if _is_slot(tp) and isinstance(value, str):
            value = {"name": value}  # `rollout.engine=sglang` is `{name: sglang}`
        if not isinstance(value, Mapping):
            raise _type_error(key, f"{tp.__name__} (a mapping)", value, source)
        return _build(tp, value, key, source, default)
    if origin in _UNIONS:
        return _coerce_union(tp, args, value, key, source, default)
    if origin is Literal:
        # `True == 1`, so compare types too, or Literal[1] would accept true.
        if any(value == c and type(value) is type(c) for c in args):
            return value
        raise _type_error(key, "one of " + ", ".join(map(repr, args)), value, source)
    if origin in _MAPPINGS or origin in _SEQUENCES:
        return _coerce_container(tp, origin, args, value, key, source)
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:  # PyYAML follows YAML 1.1, which reads exponents without a dot (1e-6) as str
            return float(value)
        except ValueError:
            pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _type_error(key, _type_name(tp), value, source)


def _coerce_union(tp: Any, args: tuple, value: Any, key: str, source: str, default: Any = None) -> Any:
    members = [a for a in args if a is not type(None)]
    if value is None and len(members) < len(args):
        return None
    if len(members) == 1:  # Optional[X]: let X's own, more precise, errors through
        return _coerce(members[0], value, key, source, default)
    for member in members:
        try:
            return _coerce(member, value, key, source)
        except ValueError:
            continue
    raise _type_error(key, _type_name(tp), value, source)


def _coerce_container(tp: Any, origin: Any, args: tuple, value: Any, key: str, source: str) -> Any:
    if origin in _MAPPINGS:
        if not isinstance(value, Mapping):
            raise _type_error(key, _type_name(tp), value, source)
        kt, vt = args or (Any, Any)
        return {
            _coerce(kt, k, f"{key}.{k}", source): _coerce(vt, v, f"{key}.{k}", source)
            for k, v in value.items()
        }
    if not isinstance(value, (list, tuple)):
        raise _type_error(key, _type_name(tp), value, source)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise _type_error(key, f"{_type_name(tp)} ({len(args)} items)", value, source)
        item_tps = args
    else:
        item_tps = (args[0] if args else Any,) * len(value)
    items = [_coerce(t, v, f"{key}[{i}]", source) for i, (t, v) in enumerate(zip(item_tps, value))]
    return tuple(items) if origin is tuple else items


def _parse_override(override: str) -> tuple[str, Any]:
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or "" in key.split("."):
        raise ValueError(f"bad override {override!r}: expected key.subkey=value, e.g. run.steps=5")
    if not raw.strip():
        return key, ""  # yaml.safe_load("") is None; an empty value means the empty string
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or e
        raise ValueError(f"override {override!r}: value is not valid YAML ({problem})") from e


def _check_override_key(schema: type, key: str, data: Mapping[str, Any]) -> None:
    """Raise naming the nearest valid key unless ``key`` addresses the schema; slots resolve to
    the variant ``data`` (the merged file + overrides) names."""
    parts = key.split(".")
    cls = schema
    node: Any = data
    for i, part in enumerate(parts):
        if _is_slot(cls):
            cls = _variant(cls, node if isinstance(node, Mapping) else {}, None, ".".join(parts[:i]))
        if part not in _init_fields(cls):
            prefix, rest = ".".join(parts[:i]), ".".join(parts[i:])
            hint = _suggest(rest, _schema_paths(cls), prefix)
            raise ValueError(f"unknown override key '{key}'; {hint}")
        node = node.get(part) if isinstance(node, Mapping) else None
        if _is_slot(_unwrap_optional(_hints(cls)[part])) and isinstance(node, str):
            node = {"name": node}
        tp = _unwrap_optional(_hints(cls)[part])
        if _is_schema(tp):
            cls = tp
        elif tp is Any or (typing.get_origin(tp) or tp) in _MAPPINGS + _UNIONS:
            return  # free-form below this point
        elif i < len(parts) - 1:
            where = f"'{'.'.join(parts[: i + 1])}' is {_type_name(tp)}"
            raise ValueError(f"override key '{key}': {where}, it has no sub-keys")


def _drop_switched_slots(cls: type, file_data: Any, data: dict[str, Any],
                         overrides: Sequence[tuple[str, Any]], prefix: str) -> None:
    """Where an override changed a slot's name from the file's choice, keep only the
    overrides' keys in that slot (see the module docstring); recurses into sections."""
    if not isinstance(data, dict):
        return
    for name, f in _init_fields(cls).items():
        tp = _unwrap_optional(_hints(cls)[name])
        if not _is_schema(tp) or name not in data:
            continue
        path = _join(prefix, name)
        in_file = file_data.get(name) if isinstance(file_data, Mapping) else None
        if _is_slot(tp) and isinstance(in_file, Mapping):
            default = _default(f)
            chosen = _slot_name(in_file, default, tp)
            now = _slot_name(data[name], default, tp)
            if now != chosen:
                dropped = sorted(k for k in _flat_keys(in_file) if k != "name")
                kept: dict[str, Any] = {}
                for k, v in overrides:
                    if k == path or k.startswith(path + "."):
                        _set_dotted(kept, k.removeprefix(prefix + "." if prefix else ""), v)
                data[name] = kept[name]
                if dropped:
                    logger.info("%s.name=%s from the command line replaces %s: the file's %s keys %s "
                                "are not applied", path, now, chosen, path, ", ".join(dropped))
        variant = tp
        if _is_slot(tp):
            value = data[name] if isinstance(data[name], Mapping) else {"name": data[name]}
            variant = _variant(tp, value, _default(f), path)
        if isinstance(data[name], dict):
            _drop_switched_slots(variant, in_file, data[name], overrides, path)


def _slot_name(section: Any, default: Any, tp: type[Slot]) -> str:
    if isinstance(section, str):
        return section
    if isinstance(section, Mapping) and "name" in section:
        return section["name"]
    if isinstance(default, Slot):
        return default.name
    return _default(_init_fields(tp)["name"])


def _flat_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        if isinstance(v, Mapping) and v:
            out += _flat_keys(v, _join(prefix, k))
        else:
            out.append(_join(prefix, k))
    return out


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:  # absent, or an empty YAML section (`actor:`), which loads as None
            child = node[part] = {}
        elif isinstance(child, str):  # a slot's shorthand (`engine: sglang`) gains keys; any
            child = node[part] = {"name": child}  # other string section fails the schema check
        elif not isinstance(child, dict):
            where = f"'{'.'.join(parents[: i + 1])}' holds {child!r}"
            raise ValueError(f"cannot apply override '{key}': {where}, not a mapping")
        node = child
    node[leaf] = value


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    name = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {name}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or e
        raise ValueError(f"invalid YAML in {name}{where}: {problem}") from e
    if data is not None and not isinstance(data, dict):
        got = type(data).__name__
        raise ValueError(f"config file {name} must hold a mapping at the top level, got {got}")
    return data or {}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # Resolves string annotations left by `from __future__ import annotations`.
    return typing.get_type_hints(cls)


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _schema_paths(cls: type) -> list[str]:
    """Every dotted key under ``cls``, sections included, e.g. ``actor``, ``actor.lr``."""
    paths = []
    for name in _init_fields(cls):
        paths.append(name)
        tp = _unwrap_optional(_hints(cls)[name])
        if _is_schema(tp):
            paths += [f"{name}.{p}" for p in _schema_paths(tp)]
    return paths


def _unwrap_optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in _UNIONS and len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None))
    return tp


def _suggest(bad: str, candidates: Sequence[str], prefix: str) -> str:
    """The nearest candidate as a full dotted key, else the valid keys at this level."""
    close = difflib.get_close_matches(bad, candidates, n=1)
    close = close or [c for c in candidates if c.endswith("." + bad)][:1]  # `lr` -> `actor.lr`
    if close:
        return f"did you mean '{_join(prefix, close[0])}'?"
    names = ", ".join(c for c in candidates if "." not in c)
    return f"valid keys under '{prefix}': {names}" if prefix else f"valid keys: {names}"


def _type_error(key: str, expected: str, value: Any, source: str) -> ValueError:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    got = f"{type(value).__name__} {shown}"
    return ValueError(f"config key '{key}' expects {expected}, got {got} (in {source})")


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else repr(tp).replace("typing.", "")


def _is_schema(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _join(prefix: str, name: Any) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):  # slots=True dataclasses have no __dict__
        fields = [f for f in dataclasses.fields(value) if f.init]
        return {f.name: _plain(getattr(value, f.name)) for f in fields}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _flatten_into(tree: Mapping[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for k, v in tree.items():
        key = _join(prefix, k)
        if isinstance(v, Mapping) and v:
            _flatten_into(v, key, out)
        else:
            out[key] = v
