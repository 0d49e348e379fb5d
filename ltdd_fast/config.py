"""Distillation settings: YAML presets shipped with the package, files, and key=value overrides."""
import difflib
import types
import typing
from dataclasses import asdict, fields
from pathlib import Path

import yaml

from .distill import DistillConfig
from .errors import ConfigError
from .files import write_atomic

PRESET_DIR = Path(__file__).parent / "presets"


def list_presets():
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _field_types():
    out = {}
    for f in fields(DistillConfig):
        kinds = typing.get_args(f.type) if isinstance(f.type, types.UnionType) else (f.type,)
        out[f.name] = tuple(k for k in kinds if k is not type(None)), type(None) in kinds
    return out


def _coerce(key, value, source):
    types_, nullable = _field_types()[key]
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
        if nullable:
            return None
        raise ConfigError(f"{key} may not be null ({source})")
    kind = types_[0]
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
                return value.lower() in ("true", "yes", "on", "1")
            if isinstance(value, bool) or value in (0, 1):
                return bool(value)
            raise ValueError
        if kind is int:
            as_float = float(value)  # YAML reads 1e4 as a string; accept whole numbers written that way
            if not as_float.is_integer() or isinstance(value, bool):
                raise ValueError
            return int(as_float)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be {kind.__name__}{' or null' if nullable else ''}, got {value!r} "
                          f"({source})") from None


def _apply(values: dict, target: dict, source):
    known = set(target)
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {key!r} in {source}{hint}")
        target[key] = _coerce(key, value, source)


def load_config(source: str, overrides=()) -> DistillConfig:
    """A preset name or a YAML file, then `key=value` overrides, validated."""
    path = Path(source)
    if not path.is_file():
        path = PRESET_DIR / f"{source}.yaml"
        if not path.is_file():
            raise ConfigError(f"no preset or file named {source!r}: expected a YAML file or one of "
                              f"{', '.join(list_presets())}")
    try:
        values = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a readable YAML file: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML ({' '.join(str(exc).split())})") from None
    if values is None:
        raise ConfigError(f"{path} is empty: expected a mapping of key: value settings")
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of key: value, got {type(values).__name__}")
    settings = asdict(DistillConfig())
    _apply(values, settings, path.name)
    parsed = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not a YAML scalar") from None
    _apply(parsed, settings, "the command line")
    return DistillConfig(**settings).validate()


def save_config(config: DistillConfig, path):
    text = yaml.safe_dump(asdict(config), sort_keys=False).encode()
    write_atomic(path, lambda f: f.write(text))
