"""Typed configs from YAML and `key=value` overrides: one coercion for every dataclass config of the toolkit
(predict, train, experiment). Every error is one line naming the key (and the file, where there is one)."""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path

import yaml


def coerce(cls, key: str, value):
    """`value` (from YAML or a key=value string) as the type of `cls`'s field `key`; errors are one line."""
    hints = typing.get_type_hints(cls)
    if key not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ValueError(f"unknown config key '{key}' (known: {known})")
    hint = hints[key]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    base = typing.get_origin(hint) if typing.get_origin(hint) in (list, dict) else (args[0] if optional else hint)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
        if optional:
            return None
        raise ValueError(f"config key '{key}' cannot be empty")
    try:
        if base is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if base is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            return [str(v).strip() for v in items if str(v).strip()]
        if base is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("true", "yes", "1", "on"):
                return True
            if s in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if base is int:
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        if base is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        name = getattr(base, "__name__", str(base))
        raise ValueError(f"config key '{key}' expects {name}, got {value!r}") from None


def build(cls, values: dict):
    """An instance of dataclass `cls` from untyped values (YAML, flags, key=value)."""
    return cls(**{k: coerce(cls, k, v) for k, v in values.items()})


def parse_overrides(items: typing.Iterable[str]) -> dict:
    """['lr=1e-4', 'train.preset=fast'] -> {'lr': '1e-4', 'train.preset': 'fast'} (values stay strings)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override '{item}' is not key=value")
        out[key.strip()] = value
    return out


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{p}: not UTF-8 text") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{p}: expected a mapping of config keys")
    return raw
