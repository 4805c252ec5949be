"""LightningModules that orchestrate components: one per stage."""

from lit_prune.stages.base import PruneStage, Tempered, TopKBudget
from lit_prune.stages.baseline import Baseline
from lit_prune.stages.distill import Distill
from lit_prune.stages.endpoint_lora import EndpointLoRA, RecoveryStage
from lit_prune.stages.evaluate import Evaluate
from lit_prune.stages.mask_search import MaskSearch

__all__ = [
    "Baseline",
    "Distill",
    "EndpointLoRA",
    "Evaluate",
    "MaskSearch",
    "PruneStage",
    "RecoveryStage",
    "Tempered",
    "TopKBudget",
]
