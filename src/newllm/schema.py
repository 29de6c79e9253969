"""How a params.yaml section is checked against its dataclass: types, ranges, unknown and missing keys.

params.yaml is the one place where defaults live; a section's dataclass only says what each key may be
(`knob(lo=..., hi=...)`), so its fields have no defaults and every key must be in the file. A field of a
section may instead be *inherited*: a model section takes any `train:` key it does not set itself.
Nothing heavy is imported here (no torch, no MLflow): a typo fails in a second, naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any, Literal

from newllm.errors import PipelineError


class ConfigError(PipelineError):
    """A bad params.yaml: the message names the key and what is allowed."""


def knob(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Any:
    """A required dataclass field with an allowed range [lo, hi] ((lo, hi] with lo_open)."""
    return field(metadata={"lo": lo, "hi": hi, "lo_open": lo_open})


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of: " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " or null"
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int -> float etc.)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"params.yaml: {key} must be {type_name(tp)}, got {value!r}")
    if origin in (types.UnionType, typing.Union):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        try:
            return coerce(key, value, inner)
        except ConfigError:
            raise bad from None
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool):
            raise bad
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (inner,) = typing.get_args(tp)
        return [coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is bool or tp is str:
        if not isinstance(value, tp):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string; DVC's YAML 1.2 writer does not
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    raise TypeError(f"unsupported annotation {tp} for {key}")


def check_range(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    lo, hi, lo_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open", False)
    for v in value if isinstance(value, list) else [value]:
        if v is None or isinstance(v, (str, bool)):
            continue
        if lo is not None and (v < lo or (lo_open and v == lo)):
            rng = (f"> {lo}" if lo_open else f">= {lo}") + (f" and <= {hi}" if hi is not None else "")
            raise ConfigError(f"params.yaml: {key} must be {rng}, got {v!r}")
        if hi is not None and v > hi:
            raise ConfigError(f"params.yaml: {key} must be <= {hi}, got {v!r}")


def build(cls: type, raw: Any, prefix: str = "", inherited: typing.Mapping[str, Any] | None = None) -> Any:
    """The validated `cls` instance of the section `raw` (a mapping). Nested dataclass fields are built
    recursively; a field missing from `raw` is taken from `inherited` (already validated) or is an error."""
    if not isinstance(raw, dict):
        raise ConfigError(f"params.yaml: {prefix.rstrip('.') or 'the file'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"params.yaml: unknown key '{prefix}{unknown[0]}' (allowed: {', '.join(fields)})")
    inherited = inherited or {}
    missing = [name for name in fields if name not in raw and name not in inherited]
    if missing:
        raise ConfigError(f"params.yaml: missing key '{prefix}{missing[0]}' (params.yaml states every key; "
                          "the project's own params.yaml has the default)")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            kwargs[name] = inherited[name]
            continue
        tp, key = hints[name], prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, raw[name], key + ".")
        else:
            kwargs[name] = coerce(key, raw[name], tp)
            check_range(key, kwargs[name], f.metadata)
    return cls(**kwargs)
