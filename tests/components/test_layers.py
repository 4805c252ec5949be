import pytest
import torch
from tiny import TINY_CONFIGS, TINY_NUM_LAYERS, tiny_model
from torch import nn

from lit_prune.components.layers import (
    UnsupportedArchitectureError,
    attention_layer_indices,
    decoder_layers,
    layer_stack,
    num_decoder_layers,
    supported_model_types,
)

ARCHS = sorted(TINY_CONFIGS)


def test_every_supported_architecture_has_a_tiny_test_config():
    assert set(supported_model_types()) == set(ARCHS)


@pytest.mark.parametrize("model_type", ARCHS)
def test_layer_access(model_type):
    model = tiny_model(model_type)
    layers = decoder_layers(model)
    assert isinstance(layers, nn.ModuleList)
    assert num_decoder_layers(model) == TINY_NUM_LAYERS == model.config.num_hidden_layers
    # Each layer's attention knows its own position in the KV cache.
    assert [attention_layer_indices(layer) for layer in layers] == [[i] for i in range(TINY_NUM_LAYERS)]
    stack = layer_stack(model)
    assert stack.layers is layers


def test_unsupported_architecture_lists_supported():
    class Bert(nn.Module):
        config = type("C", (), {"model_type": "bert"})()

    with pytest.raises(UnsupportedArchitectureError, match=r"model_type='bert'.*Supported model types: .*llama"):
        decoder_layers(Bert())


def test_peft_wrapper_is_looked_through():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert num_decoder_layers(model) == TINY_NUM_LAYERS
    assert torch.is_tensor(next(decoder_layers(model).parameters()))
