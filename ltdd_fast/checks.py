"""Checks of settings shared by the configs and the command line: each failure is one ConfigError line.

This module imports nothing from ltdd_fast but errors.
"""
import math
import re

import torch

from .errors import ConfigError

DEVICE_TYPES = ("cpu", "cuda")


def check_device(device, option="device"):
    """A device this machine has: cpu, cuda or cuda:N (with a GPU)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{option} {device!r} is not a device: expected cpu, cuda or cuda:N") from None
    if d.type not in DEVICE_TYPES:
        raise ConfigError(f"{option} {device!r} is not supported: expected cpu, cuda or cuda:N")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{option} {device!r}: this machine has no usable CUDA GPU; use cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ConfigError(f"{option} {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return str(device)


def check_number(name, value, low=None, high=None, low_open=False, integer=False, allow_none=False):
    """value is a finite number (an integer if asked) within [low, high] (low excluded if low_open)."""
    if value is None and allow_none:
        return value
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ConfigError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        bound = ("positive" if low == 0 else f"greater than {low}") if low_open else \
            ("non-negative" if low == 0 else f"at least {low}")
        raise ConfigError(f"{name} must be {bound}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{name} must be at most {high}, got {value!r}")
    return value


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text) -> int:
    """'24GB', '24 GiB', '512MB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"memory budget {text!r} is not a size: expected a positive number with a unit such as "
                          f"24GB, 512MB or 16GiB")
    return int(float(m.group(1)) * _UNITS[unit])
