"""compile_pointwise_blocks: the compiled norm/MLP submodules leave a gated search's logits and gate gradients as
they were; architectures without such submodules are refused before weights load."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from lit_prune.components.compile import compile_pointwise_blocks, pointwise_blocks
from lit_prune.components.gating import LayerGating


def gated_loss_and_grad(model, input_ids):
    gates = torch.full((6,), 0.7, requires_grad=True)
    gating = LayerGating(model)
    gating.set(gates)
    loss = model(input_ids=input_ids, use_cache=False).logits.float().logsumexp(-1).mean()
    loss.backward()
    gating.remove()
    return loss.detach(), gates.grad


def test_compiled_blocks_keep_gated_logits_and_gate_gradients():
    torch._dynamo.reset()
    input_ids = torch.randint(0, 100, (2, 12))
    eager = tiny_model("llama")
    compiled = tiny_model("llama")
    assert compile_pointwise_blocks(compiled, backend="aot_eager") == 6 * 3  # 2 norms + 1 MLP per layer
    loss_eager, grad_eager = gated_loss_and_grad(eager, input_ids)
    loss_compiled, grad_compiled = gated_loss_and_grad(compiled, input_ids)
    torch.testing.assert_close(loss_compiled, loss_eager)
    torch.testing.assert_close(grad_compiled, grad_eager)


def test_compile_blocks_is_refused_for_an_architecture_without_norm_or_mlp_modules(tmp_path):
    from lit_prune import ConcaveGate, MaskSearch

    tiny_model("opt").save_pretrained(tmp_path)
    assert not pointwise_blocks(tiny_model("opt"))
    with pytest.raises(ValueError, match=r"compile_blocks: true.*RMSNorm.*MLP.*opt"):
        MaskSearch(str(tmp_path), gate=ConcaveGate, num_drop=2, ratio=None, compile_blocks=True)


def test_compile_blocks_with_gradient_checkpointing_is_refused(tiny_checkpoint):
    from lit_prune import ConcaveGate, MaskSearch

    with pytest.raises(ValueError, match="compile_blocks: true.*gradient_checkpointing: true"):
        MaskSearch(str(tiny_checkpoint), gate=ConcaveGate, num_drop=2, ratio=None, compile_blocks=True,
                   gradient_checkpointing=True)
