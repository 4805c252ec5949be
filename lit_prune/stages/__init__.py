"""LightningModules that orchestrate components: one per stage. No stage module imports another stage module."""

from __future__ import annotations

from typing import Any

from lit_prune.stages.base import PruneStage
from lit_prune.stages.baseline import Baseline
from lit_prune.stages.distill import Distill
from lit_prune.stages.endpoint_lora import EndpointLoRA
from lit_prune.stages.mask_search import MaskSearch
from lit_prune.stages.perplexity import Perplexity
from lit_prune.stages.recovery import RecoveryStage

__all__ = [
    "Baseline",
    "Distill",
    "EndpointLoRA",
    "MaskSearch",
    "Perplexity",
    "PruneStage",
    "RecoveryStage",
]


def __getattr__(name: str) -> Any:
    if name == "Evaluate":  # renamed; the old name resolves for one release
        from lit_prune.deprecation import warn_deprecated

        warn_deprecated("`lit_prune.stages.Evaluate` was renamed `lit_prune.stages.Perplexity` (the `evaluate` command "
                        "is another tool); the old name will be removed in the next release.")
        return Perplexity
    raise AttributeError(f"module 'lit_prune.stages' has no attribute {name!r}")
