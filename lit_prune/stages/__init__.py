"""LightningModules that orchestrate components: one per stage."""

from lit_prune.stages.base import PruneStage, Tempered, TopKBudget
from lit_prune.stages.evaluate import Evaluate

__all__ = ["Evaluate", "PruneStage", "Tempered", "TopKBudget"]
