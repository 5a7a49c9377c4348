"""Sizes and counts for people: parsing ``20G``-style values, printing byte counts."""

from __future__ import annotations

from .errors import SettingError, UsageError


def human_size(size: int) -> str:
    """``1536`` -> ``1.5 KiB``; whole bytes below 1 KiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def counted(count: int, noun: str) -> str:
    """``1 object``, ``2 objects`` (nouns that take an ``s``)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str, option: str) -> int:
    """``20G``, ``500M``, ``1.5G``, ``4096`` -> bytes (binary units; ``KiB``/``KB`` too)."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = value, ""
    if value and value[-1] in _UNITS:
        number, unit = value[:-1], value[-1]
    try:
        size = float(number)
    except ValueError:
        size = -1.0
    if not number or size < 0 or size != size or size == float("inf"):
        raise SettingError(option, text, "is not a size such as 512M, 20G or 0")
    if not unit and not size.is_integer():  # "0.5" would be 0: readahead off, no cache
        raise SettingError(option, text, "is not a whole number of bytes: give a unit (0.5M) "
                           "or whole bytes")
    return int(size * _UNITS[unit])


def parse_percent(text: str, option: str) -> float:
    """``10%`` (or ``10``) -> 0.10, between 0 and 100 %."""
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        value = -1.0
    if not 0 <= value <= 100:
        raise UsageError(f"{option} {text!r} is not a percentage such as 10%")
    return value / 100
