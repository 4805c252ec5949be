"""Renamed settings keep working for one release: a ``DeprecationWarning`` plus a logged line that says the new name.

``DeprecationWarning`` is hidden by default outside ``__main__``, so the message is also logged (``lit_prune``
logger, rank 0 only) where a user running ``python -m lit_prune fit -c old.yaml`` sees it.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

log = logging.getLogger("lit_prune")
_logged: set[str] = set()  # a config parser may resolve the same old name many times: say it once


def warn_deprecated(message: str, stacklevel: int = 3) -> None:
    """Emit ``message`` as a ``DeprecationWarning`` and log it once (on rank 0 of a multi-process run)."""
    warnings.warn(message, DeprecationWarning, stacklevel=stacklevel)
    if message not in _logged and os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0":
        _logged.add(message)
        log.warning(message)


def renamed_key(old: str, old_value: Any, new: str, new_value: Any, new_default: Any, converted: Any,
                prefix: str = "model.init_args.") -> Any:
    """The value of setting ``new``, taking a still-accepted old key ``old`` into account.

    Args:
        old: The deprecated key; ``old_value`` None means it was not given.
        new: The key that replaces it; ``new_value`` is what was given for it (``new_default`` if not given).
        converted: ``old_value`` expressed in the meaning of ``new``.
    """
    if old_value is None:
        return new_value
    if new_value != new_default:
        raise ValueError(
            f"`{prefix}{old}`={old_value!r} (deprecated) and `{prefix}{new}`={new_value!r} are both set. Keep only "
            f"`{prefix}{new}` (`{old}: {old_value!r}` is `{new}: {converted!r}`)."
        )
    warn_deprecated(
        f"`{prefix}{old}` is deprecated and will be removed in the next release: `{old}: {old_value!r}` now reads "
        f"as `{new}: {converted!r}`. Write `{new}` in your config.",
        stacklevel=4,
    )
    return converted
