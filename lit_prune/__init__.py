"""lit_prune: remove whole decoder layers from Hugging Face causal LMs and heal what is left."""

from lit_prune.components.gates import ConcaveGate, GumbelTopKGate, LayerGate
from lit_prune.components.gating import LayerGating
from lit_prune.components.mask_io import MaskArtifact, load_mask, save_mask
from lit_prune.components.surgery import drop_layers, endpoint_layers
from lit_prune.components.teacher_cache import TopKCache, write_topk_cache
from lit_prune.data import PruneDataModule
from lit_prune.stages import Baseline, Distill, EndpointLoRA, Evaluate, MaskSearch, PruneStage

__all__ = [
    "Baseline",
    "ConcaveGate",
    "Distill",
    "EndpointLoRA",
    "Evaluate",
    "GumbelTopKGate",
    "LayerGate",
    "LayerGating",
    "MaskArtifact",
    "MaskSearch",
    "PruneDataModule",
    "PruneStage",
    "TopKCache",
    "drop_layers",
    "endpoint_layers",
    "load_mask",
    "save_mask",
    "write_topk_cache",
]
