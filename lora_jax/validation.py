"""Checks on user input that more than one layer of the library makes."""

from __future__ import annotations

from typing import Any

__all__ = ["is_int"]


def is_int(value: Any) -> bool:
    """A Python ``int`` that is not a ``bool`` (``True`` is an int to Python, never a rank)."""
    return isinstance(value, int) and not isinstance(value, bool)
