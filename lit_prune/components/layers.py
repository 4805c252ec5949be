"""Find the decoder layer stack of a Hugging Face causal LM, whatever the architecture calls it.

Every architecture keeps its decoder blocks in one ``nn.ModuleList``; only its path differs::

    LlamaForCausalLM            .model.layers          (also Mistral, Qwen2/3, Gemma 1/2/3, Phi3, and the
                                                        mixture-of-experts DeepSeek-V3, Qwen2/3-MoE, Mixtral, gpt-oss)
    GPT2LMHeadModel             .transformer.h
    GPTNeoXForCausalLM          .gpt_neox.layers
    OPTForCausalLM              .model.decoder.layers
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# model_type -> dotted path from the *ForCausalLM module to the decoder ModuleList.
# Only architectures with a test on a tiny random config are listed here.
LAYER_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
    # Mixture of experts: some or all layers hold routed experts. Which ones is decided by index from the config
    # (first_k_dense_replace, decoder_sparse_step + mlp_only_layers); surgery.drop_layers rewrites those keys.
    "deepseek_v3": "model.layers",
    "qwen2_moe": "model.layers",
    "qwen3_moe": "model.layers",
    "mixtral": "model.layers",
    "gpt_oss": "model.layers",
}


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no known decoder layer path."""


def supported_model_types() -> list[str]:
    """Return the ``config.model_type`` values lit_prune can prune."""
    return sorted(LAYER_PATHS)


def check_supported(model_type: str | None, source: str = "model") -> str:
    """Raise a clear error if ``model_type`` cannot be pruned; return the layer path otherwise."""
    if model_type not in LAYER_PATHS:
        raise UnsupportedArchitectureError(
            f"{source} has config.model_type={model_type!r}, which lit_prune cannot prune yet. "
            f"Supported model types: {', '.join(supported_model_types())}. "
            "Pick a model of a supported architecture, or add its decoder-layer path to "
            "`lit_prune.components.layers.LAYER_PATHS` (and a test on a tiny config)."
        )
    return LAYER_PATHS[model_type]


def unwrap(model: nn.Module) -> nn.Module:
    """Return the underlying transformers model of a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@dataclass(frozen=True)
class LayerStack:
    """Where the decoder layers live: ``getattr(owner, attr)`` is the ``nn.ModuleList``."""

    owner: nn.Module
    attr: str

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.owner, self.attr)

    def replace(self, layers: nn.ModuleList) -> None:
        setattr(self.owner, self.attr, layers)


def layer_stack(model: nn.Module) -> LayerStack:
    """Locate the decoder ``ModuleList`` of a causal LM (peft wrappers are looked through)."""
    model = unwrap(model)
    config = getattr(model, "config", None)
    path = check_supported(getattr(config, "model_type", None), source=type(model).__name__)
    *owner_path, attr = path.split(".")
    owner = model
    for name in owner_path:
        if not hasattr(owner, name):
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} has no `{name}` on the way to `{path}`. lit_prune expects the *ForCausalLM "
                f"class of a supported architecture ({', '.join(supported_model_types())})."
            )
        owner = getattr(owner, name)
    if not isinstance(getattr(owner, attr, None), nn.ModuleList):
        raise UnsupportedArchitectureError(f"`{path}` of {type(model).__name__} is not an nn.ModuleList.")
    return LayerStack(owner, attr)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the decoder layer list of a causal LM."""
    return layer_stack(model).layers


def num_decoder_layers(model: nn.Module) -> int:
    """Return the number of decoder layers currently in the model."""
    return len(decoder_layers(model))


def attention_layer_indices(layer: nn.Module) -> list[int]:
    """Return every ``layer_idx`` found inside one decoder layer (attention modules index the KV cache with it)."""
    return sorted({m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)})


def is_sparse_layer(layer: nn.Module) -> bool:
    """True when a decoder layer holds routed experts (a mixture-of-experts block) rather than one dense MLP."""
    return any(name.rsplit(".", 1)[-1] == "experts" for name, _ in layer.named_modules())


def sparse_layer_flags(model: nn.Module) -> list[bool]:
    """Per decoder layer, whether it is a mixture-of-experts layer (read from the modules, not the config)."""
    return [is_sparse_layer(layer) for layer in decoder_layers(model)]


def router_outputs_off(config) -> None:
    """Turn off router-logit outputs, and with them the auxiliary load-balancing loss, where a config has them.

    Search and recovery freeze the routers and train against a KL or CE objective: the aux loss would add a term
    the routers cannot act on, and recording every layer's router logits costs memory on every forward.
    """
    if getattr(config, "output_router_logits", None):
        config.output_router_logits = False
