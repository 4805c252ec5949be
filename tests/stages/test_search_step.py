"""MaskSearch's exact step shortcuts: a shared teacher prefix and no graph through dropped layers.

The same step is run with ``exact_shortcuts`` on and off on one tiny random Llama: the teacher logits must be bit for
bit the same, and so must the loss and the gate gradient; counts of MLP calls show what was skipped.
"""

import pytest
import torch

import lit_prune.stages.mask_search as mask_search
from lit_prune import ConcaveGate, GumbelTopKGate, MaskSearch
from lit_prune.components.gating import shared_prefix
from lit_prune.components.layers import decoder_layers
from tests.tiny import char_tokenizer, tiny_model

NUM_LAYERS = 12


@pytest.fixture(scope="module")
def checkpoint12(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-12")
    char_tokenizer().save_pretrained(path)
    tiny_model("llama", num_layers=NUM_LAYERS).save_pretrained(path)
    return path


def _clp(start, temperature, protect_first=1):
    def factory(n, k):
        gate = ConcaveGate(n, k, temperature=temperature, protect_first=protect_first, protect_last=1)
        return gate.set_starts_([start])

    return factory


def _e3(drop):
    def factory(n, k):
        # Logits far apart: the Gumbel noise cannot change which layers the k-hot sample drops.
        logits = [-50.0 if i in drop else 50.0 for i in range(n)]
        return GumbelTopKGate(n, k, init_logits=logits)

    return factory


def _step(path, gate, dtype, checkpointing, shortcuts, monkeypatch):
    module = MaskSearch(str(path), gate=gate, num_drop=3, ratio=None, dtype=dtype, exact_shortcuts=shortcuts,
                        gradient_checkpointing=checkpointing)
    module.configure_model()
    module.train()
    layers = decoder_layers(module.model)
    hooks_before = [len(layer._forward_pre_hooks) + len(layer._forward_hooks) for layer in layers]
    seen = {"teacher": [], "student": [], "no_graph": set(), "graph": set()}

    def count(index, mlp, args, output):
        if not torch.is_grad_enabled():
            seen["teacher"].append(index)
        elif not seen.get("backward"):
            seen["student"].append(index)
            (seen["no_graph"] if output.grad_fn is None else seen["graph"]).add(index)

    handles = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: count(i, m, a, o)) for i, layer in
               enumerate(layers)]
    kl = mask_search.kl_loss

    def spy(teacher, student, **kwargs):
        seen["teacher_logits"] = teacher.detach().clone()
        return kl(teacher, student, **kwargs)

    monkeypatch.setattr(mask_search, "kl_loss", spy)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(0))}
    batch["labels"] = batch["input_ids"]
    loss = module.training_step(batch, 0)
    seen["backward"] = True
    loss.backward()
    for handle in handles:
        handle.remove()
    # Nothing captured outlives the step, and every temporary hook is gone.
    assert not module.gating._inputs
    assert [len(layer._forward_pre_hooks) + len(layer._forward_hooks) for layer in layers] == hooks_before
    host = module.gating.values.detach().cpu()
    return loss.detach(), module.gate.logits.grad if hasattr(module.gate, "logits") else module.gate.starts.grad, \
        seen, host


CASES = {
    # (gate factory, dtype, expect a non-empty shared prefix)
    "clp-bf16-T1": (_clp(8, 1.0), "bfloat16", True),  # bf16 gates round to 1 about 6 layers before the notch
    "clp-fp32-T1": (_clp(4, 1.0), "float32", False),  # fp32 gates are not exactly 1 that close to the notch
    "clp-fp32-T0.05": (_clp(6, 0.05), "float32", True),
    "clp-bf16-T0.05": (_clp(0, 0.05, protect_first=0), "bfloat16", False),  # the notch starts at layer 0
    "e3-fp32": (_e3({5, 6, 9}), "float32", True),
    "e3-bf16": (_e3({4, 7, 8}), "bfloat16", True),
    "e3-first-dropped": (_e3({0, 3, 10}), "float32", False),
}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["eager", "ckpt"])
@pytest.mark.parametrize("case", list(CASES))
def test_shortcuts_change_no_bit_of_the_step(checkpoint12, case, checkpointing, monkeypatch):
    gate, dtype, prefix_expected = CASES[case]
    ref_loss, ref_grad, ref, host = _step(checkpoint12, gate, dtype, checkpointing, False, monkeypatch)
    loss, grad, new, host_new = _step(checkpoint12, gate, dtype, checkpointing, True, monkeypatch)
    assert torch.equal(host, host_new)
    assert torch.equal(new["teacher_logits"], ref["teacher_logits"]), "teacher logits must be bit-identical"
    assert torch.equal(loss, ref_loss)
    assert torch.equal(grad, ref_grad) and grad.abs().sum() > 0

    hidden_dtype = getattr(torch, dtype)
    prefix = min(shared_prefix(host, hidden_dtype), NUM_LAYERS - 1)
    assert (prefix > 0) == prefix_expected, (case, host.tolist())
    # The reference runs every layer in both passes; the shortcut teacher starts at the first inexact gate.
    assert ref["teacher"] == list(range(NUM_LAYERS)) and ref["student"] == list(range(NUM_LAYERS))
    assert new["teacher"] == list(range(prefix, NUM_LAYERS))
    assert new["student"] == list(range(NUM_LAYERS))
    # Layers whose gate is exactly 0 built no graph (their MLP output has no grad_fn); the others after layer 0 did.
    zero = {i for i, v in enumerate(host.tolist()) if v == 0}
    assert new["no_graph"] - {0} == zero - {0}
    assert ref["no_graph"] - {0} == set()
    if case.startswith("e3"):
        assert len(zero) == 3


def test_sharded_models_keep_the_plain_step(checkpoint12, monkeypatch):
    module = MaskSearch(str(checkpoint12), gate=_e3({5, 6, 9}), num_drop=3, ratio=None)
    module.configure_model()
    module.train()
    calls = []
    monkeypatch.setattr(mask_search, "can_replay", lambda model: calls.append(1) or False)
    batch = {"input_ids": torch.randint(3, 90, (1, 8)), "labels": torch.randint(3, 90, (1, 8))}
    for _ in range(2):
        module.training_step(batch, 0).backward()
    assert calls == [1] and module._shortcuts is False
    assert module.gating.cut == frozenset()  # a sharded model keeps today's path: no detached layer inputs


def test_gating_cut_layers_keep_the_residual_gradient():
    from lit_prune.components.gating import LayerGating

    model = tiny_model("llama", num_layers=4)
    gating = LayerGating(model)
    ids = torch.randint(3, 90, (1, 8))
    grads = []
    for host in (False, True):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        values = torch.tensor([1.0, 0.0, 0.5, 1.0], requires_grad=True)
        gating.set(values, values.detach() if host else None)
        model(inputs_embeds=embeds, use_cache=False).logits.square().sum().backward()
        grads.append((embeds.grad, values.grad))
    assert gating.cut == frozenset({1})
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    gating.set(None)
    assert gating.cut == frozenset()
