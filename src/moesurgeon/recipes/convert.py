"""The one way from a config node to typed settings: `to_settings(SettingsClass, node, "key")`.

Every group the runner reads (model, data, export, the experiment's own settings) goes through it.
The dataclass's field annotations are the schema: nested dataclasses for sub-sections, `X | None`,
unions, lists, tuples, dicts, `Path`, `Any`. A key the dataclass does not have, a value of the wrong
type or a missing mandatory value (`???`) raises `ConfigError` naming the full key; the dataclass's
own `__post_init__` then checks ranges with its own messages. Numbers are accepted where text is
expected (a label `2024` on the command line is the text "2024"), integers where a float is.

`defaults_of` is the reverse: a dataclass's defaults as plain YAML-able values, for Hydra's ConfigStore.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from omegaconf import OmegaConf

from ..errors import ConfigError

T = TypeVar("T")
MISSING_VALUE = "???"  # OmegaConf's mark of a mandatory value nobody set


def to_settings(cls: type[T], node, key: str) -> T:
    """`node` (a DictConfig, a mapping, or already a `cls`) as a `cls`, every value checked against its field type.
    `key`: where the node sits in the config ("" for the root), for the messages."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True)
    return _build(cls, {} if node is None else node, key)


def _build(cls: type[T], values, key: str) -> T:
    if isinstance(values, cls):
        return values
    if not isinstance(values, Mapping):
        raise ConfigError(f"{key}={values!r}: expected a mapping of settings ({cls.__name__})")
    hints = get_type_hints(cls)
    known = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in known]
    unknown = sorted(str(k) for k in values if k not in names)
    if unknown:
        raise ConfigError(f"{_join(key, unknown[0])} is not a setting of {key or 'the run'}; its settings are: "
                          f"{', '.join(names)}")
    kwargs = {}
    for f in known:
        if f.name in values:
            kwargs[f.name] = _coerce(hints[f.name], values[f.name], _join(key, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(key, f.name)} is not set: pass {_join(key, f.name)}=VALUE")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if type(err) not in (TypeError, ValueError):  # a settings class's own error type names the key itself
            raise
        raise ConfigError(f"{key or cls.__name__}: {err}") from None


def _join(key: str, name) -> str:
    return f"{key}.{name}" if key else str(name)


def _coerce(tp, value, key: str):
    if isinstance(value, str) and value == MISSING_VALUE:
        raise ConfigError(f"{key} is not set: pass {key}=VALUE")
    if tp is Any:
        return value
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r}: expected {_describe(tp)}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected {_describe(tp)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}={list(value)!r}: expected {_describe(tp)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r}: expected {_describe(tp)}")
        key_type, value_type = args or (Any, Any)
        return {_coerce(key_type, k, f"{key} key {k!r}"): _coerce(value_type, v, _join(key, k))
                for k, v in value.items()}
    return _scalar(tp, value, key)


def _scalar(tp, value, key: str):
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and number and isinstance(value, int):
        return value
    if tp is float and number:
        return float(value)
    if tp is str and (isinstance(value, str) or number):
        return str(value)
    if tp is Path and isinstance(value, (str, Path)):
        return Path(value)
    if tp in (bool, int, float, str, Path):
        raise ConfigError(f"{key}={value!r}: expected {_describe(tp)}")
    raise TypeError(f"settings field {key}: type {tp!r} is not supported by moesurgeon.recipes.convert")


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "text", Path: "a path",
          type(None): "null"}


def _describe(tp) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping {{{_describe(args[0])}: {_describe(args[1])}}}" if args else "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of settings ({tp.__name__})"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def defaults_of(cls: type) -> dict:
    """{field: default} of a settings dataclass as plain values; `???` for a field without default."""
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = MISSING_VALUE
        out[f.name] = _plain(value)
    return out


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value
