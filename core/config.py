"""Typed, strict configuration: a dataclass tree, YAML files as instances of it, CLI overrides.

The schema is a tree of ``@dataclass(kw_only=True, slots=True)`` classes; a YAML file is an
instance of it written as nested mappings (``actor: {lr: 1e-6}``). Overrides address the same
tree with dotted keys, ``actor.lr=3e-6 run.steps=10 tags=[a,b]``, each value parsed as YAML
(``x=null`` is None, ``x=`` the empty string). Loading is strict: an unknown key is an error
naming the nearest valid key, a wrong type an error naming the key, the expected type and the
value; a missing key takes the dataclass default. Keys under ``dict[str, ...]`` or ``Any``
fields are free-form. Typical entry point::

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
from typing import Any, Literal, TypeVar

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


def load_config(
    schema: type[T], path: str | os.PathLike | None, overrides: Sequence[str] = ()
) -> T:
    """Read YAML from ``path`` (None: all defaults), apply ``overrides``, build ``schema``."""
    data = apply_overrides(_read_yaml(path) if path is not None else {}, overrides, schema=schema)
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
    for override in overrides:
        key, value = _parse_override(override)
        if schema is not None:
            _check_override_key(schema, key)
        _set_dotted(result, key, value)
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


def _build(cls: type, data: Mapping[str, Any], prefix: str, source: str) -> Any:
    fields = _init_fields(cls)
    for name in data:
        if name not in fields:
            hint = _suggest(str(name), list(fields), prefix)
            raise ValueError(f"unknown config key '{_join(prefix, name)}' (in {source}); {hint}")
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in data:
            kwargs[name] = _coerce(_hints(cls)[name], data[name], key, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"missing required config key '{key}' (in {source})")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it, converted where that is safe."""
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if tp is Any:
        return value
    if _is_schema(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _type_error(key, f"{tp.__name__} (a mapping)", value, source)
        return _build(tp, value, key, source)
    if origin in _UNIONS:
        return _coerce_union(tp, args, value, key, source)
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


def _coerce_union(tp: Any, args: tuple, value: Any, key: str, source: str) -> Any:
    members = [a for a in args if a is not type(None)]
    if value is None and len(members) < len(args):
        return None
    if len(members) == 1:  # Optional[X]: let X's own, more precise, errors through
        return _coerce(members[0], value, key, source)
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


def _check_override_key(schema: type, key: str) -> None:
    parts = key.split(".")
    cls = schema
    for i, part in enumerate(parts):
        if part not in _init_fields(cls):
            prefix, rest = ".".join(parts[:i]), ".".join(parts[i:])
            hint = _suggest(rest, _schema_paths(cls), prefix)
            raise ValueError(f"unknown override key '{key}'; {hint}")
        tp = _unwrap_optional(_hints(cls)[part])
        if _is_schema(tp):
            cls = tp
        elif tp is Any or (typing.get_origin(tp) or tp) in _MAPPINGS + _UNIONS:
            return  # free-form below this point
        elif i < len(parts) - 1:
            where = f"'{'.'.join(parts[: i + 1])}' is {_type_name(tp)}"
            raise ValueError(f"override key '{key}': {where}, it has no sub-keys")


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:  # absent, or an empty YAML section (`actor:`), which loads as None
            child = node[part] = {}
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
