"""Input checks shared by every layer: one wording for "this value is not one of the allowed choices"."""

from __future__ import annotations

from typing import Any, get_args


def check_choice(value: Any, allowed: Any, key: str) -> None:
    """Raise ``ValueError`` naming ``key`` when ``value`` is not one of the ``Literal`` (or sequence) ``allowed``."""
    choices = get_args(allowed) or tuple(allowed)
    if value not in choices:
        raise ValueError(f"`{key}` must be one of {list(choices)}, got {value!r}.")
