"""Argument checks shared by every module, so that a user's bad value is named before torch fails inside it.

Kept free of torch and torchtune imports: the data, generation, eval and training modules all use it.
"""

import numbers
from typing import Any, Optional


def is_whole(value: Any, minimum: Optional[int] = None) -> bool:
    """Whether ``value`` is an integer (Python's, numpy's or any ``numbers.Integral``), not a bool, and at least
    ``minimum`` when one is given."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def check_whole(name: str, value: Any, minimum: int = 1, *, optional: bool = False) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a whole number >= ``minimum`` (or ``None`` when
    ``optional``); 0, -1, 2.5, "3" and True are refused."""
    if optional and value is None:
        return
    if not is_whole(value, minimum):
        raise ValueError(f"{name} must be a whole number >= {minimum}{' or None' if optional else ''}, got {value!r}")


def as_positive_int(value: Any) -> Optional[int]:
    """``value`` as an int >= 1 (a string of digits too, as command-line overrides give), or ``None`` if it is not one
    (0, -1, 2.5, "abc", True)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return int(value) if is_whole(value, 1) else None
