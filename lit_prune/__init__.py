"""lit_prune: remove whole decoder layers from Hugging Face causal LMs and heal what is left.

Public names are imported on first use (PEP 562), so light tools such as ``python -m lit_prune.reports`` do not pay
for importing Lightning. ``from lit_prune import MaskSearch`` and ``class_path: lit_prune.MaskSearch`` work as usual.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Baseline": "lit_prune.stages",
    "ConcaveGate": "lit_prune.components.gates",
    "Distill": "lit_prune.stages",
    "EndpointLoRA": "lit_prune.stages",
    "GumbelTopKGate": "lit_prune.components.gates",
    "LayerGate": "lit_prune.components.gates",
    "LayerGating": "lit_prune.components.gating",
    "MaskArtifact": "lit_prune.components.mask_io",
    "MaskSearch": "lit_prune.stages",
    "Perplexity": "lit_prune.stages",
    "PruneDataModule": "lit_prune.data",
    "PruneStage": "lit_prune.stages",
    "TopKCache": "lit_prune.components.teacher_cache",
    "drop_layers": "lit_prune.components.surgery",
    "endpoint_layers": "lit_prune.components.surgery",
    "load_mask": "lit_prune.components.mask_io",
    "save_mask": "lit_prune.components.mask_io",
    "write_topk_cache": "lit_prune.components.teacher_cache",
}

# Renamed public names: old name -> new name; they resolve, with a DeprecationWarning, for one release.
_RENAMED = {"Evaluate": "Perplexity"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        from lit_prune.deprecation import warn_deprecated

        new = _RENAMED[name]
        warn_deprecated(f"`lit_prune.{name}` was renamed `lit_prune.{new}` (`class_path: lit_prune.{new}`); the old "
                        "name will be removed in the next release.")
        return __getattr__(new)
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lit_prune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
