"""Pure torch + transformers building blocks (no Lightning import): layer access, gating, surgery, masks."""

from lit_prune.components.gating import LayerGating
from lit_prune.components.layers import decoder_layers, num_decoder_layers, supported_model_types
from lit_prune.components.mask_io import MaskArtifact, MaskError, load_mask, save_mask
from lit_prune.components.surgery import contiguous_segments, drop_layers, endpoint_layers

__all__ = [
    "LayerGating",
    "MaskArtifact",
    "MaskError",
    "contiguous_segments",
    "decoder_layers",
    "drop_layers",
    "endpoint_layers",
    "load_mask",
    "num_decoder_layers",
    "save_mask",
    "supported_model_types",
]
