"""Byte counts as people read them, the same in every message: the CLI's tables and the library's notes."""

from __future__ import annotations


UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def unit_of(n: float) -> tuple[str, int]:
    """The unit `human` writes n in, and its size in bytes (for an axis scaled like the table)."""
    for power, unit in enumerate(UNITS):
        if abs(n) < 1024 ** (power + 1) or unit == UNITS[-1]:
            return unit, 1024 ** power
    raise AssertionError("unreachable")


def human(n: float) -> str:
    unit, size = unit_of(n)
    return f"{n / size:.1f} {unit}" if unit != "B" else f"{int(n)} B"
