"""YAML files + dotted key=value overrides -> a typed dataclass tree, with "did you mean" errors."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Iterable, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration the user can fix: the message names the key and the fix."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(path: str, key: str, valid: Iterable[str]) -> ConfigError:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{path}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{path}{key}'.{hint} Valid keys here: {', '.join(valid)}")


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(value, args[0], where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"config key '{where}' expects true/false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"config key '{where}' expects a number, got {value!r}")
        try:
            out = typ(value) if typ is float else int(str(value), 0) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{where}' expects {typ.__name__}, got {value!r}") from None
        if typ is int and isinstance(value, float) and value != out:
            raise ConfigError(f"config key '{where}' expects an integer, got {value!r}")
        return out
    if typ is str:
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, path: str = "") -> T:
    """Build dataclass `cls` from a nested dict; unknown keys are errors that name the closest key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{path.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            raise _unknown_key(path, key, types_)
        typ = types_[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = from_dict(typ, value, f"{path}{key}.")
        else:
            kwargs[key] = _coerce(value, typ, f"{path}{key}")
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(cfg: T, overrides: Iterable[str]) -> T:
    """Apply `a.b.c=value` strings (value parsed as YAML scalar) to a copy of `cfg`."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node, node_cls, prefix = data, type(cfg), ""
        for k in keys[:-1]:
            types_ = _field_types(node_cls)
            if k not in types_ or not dataclasses.is_dataclass(types_[k]):
                raise _unknown_key(prefix, k, [n for n, t in types_.items() if dataclasses.is_dataclass(t)])
            node, node_cls, prefix = node[k], types_[k], f"{prefix}{k}."
        last = keys[-1]
        types_ = _field_types(node_cls)
        if last not in types_:
            raise _unknown_key(prefix, last, types_)
        node[last] = yaml.safe_load(raw) if raw.strip() else None
    return from_dict(type(cfg), data)


def read_json(path: str, error: type[Exception] = ConfigError):
    """json.load with an error that names the file (for config.json, metadata, manifests)."""
    import json

    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None


def load_config(cls: type[T], yaml_path: str | None = None, overrides: Iterable[str] = ()) -> T:
    data = {}
    if yaml_path:
        try:
            with open(yaml_path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {yaml_path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {yaml_path} is not valid YAML: {exc}") from None
    cfg = from_dict(cls, data)
    return apply_overrides(cfg, overrides)


def dump_config(cfg, path: str) -> None:
    from megatron_spot.utils.atomic import atomic_file

    with atomic_file(path) as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
