"""Baseline layer selectors: each against a brute-force or direct reference, and on models with known identity layers.

A Llama decoder layer with zeroed ``o_proj`` and ``down_proj`` weights adds exactly zero to the residual stream, so it
is an exact identity: every sensible selector must find it first.
"""

import math

import pytest
import torch
from tiny import TINY_NUM_LAYERS, VOCAB, tiny_model

from lit_prune.components.gating import LayerGating
from lit_prune.components.layers import decoder_layers
from lit_prune.components.scorers import (
    SCORERS,
    LayerSelection,
    angular_distance_window,
    block_influence,
    candidate_layers,
    drop_tail,
    kl_importance,
    kl_importance_selection,
    output_kl,
    random_layers,
    score,
    sleb,
    teacher_logits_for,
    window_scan,
)

L = TINY_NUM_LAYERS


def _batches(num: int = 2, batch: int = 2, seq: int = 10, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 90, (batch, seq), generator=generator) for _ in range(num)]


def _identity_llama(identity_layers=(), seed: int = 0):
    model = tiny_model("llama", seed=seed)
    with torch.no_grad():
        for index in identity_layers:
            layer = decoder_layers(model)[index]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


def _boundary_states(model, input_ids) -> list[torch.Tensor]:
    """``[h_0, ..., h_L]``: output_hidden_states for the first L, a hook for the raw output of the last layer."""
    captured = {}

    def hook(module, args, output):
        captured["last"] = output[0] if isinstance(output, tuple) else output

    handle = decoder_layers(model)[-1].register_forward_hook(hook)
    with torch.no_grad():
        hidden = model(input_ids=input_ids, output_hidden_states=True, use_cache=False).hidden_states
    handle.remove()
    return [*hidden[:-1], captured["last"]]


def _reference_kl(model, keep, batches, direction: str = "forward") -> float:
    """Mean token KL(dense || masked) (or reverse), written out as sum_v p (log p - log q)."""
    gating = LayerGating(model)
    per_token = []
    with torch.no_grad():
        for ids in batches:
            dense = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
            gating.set_mask(keep)
            masked = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
            gating.set(None)
            p, q = (dense, masked) if direction == "forward" else (masked, dense)
            per_token.append((p.exp() * (p - q)).sum(-1).flatten())
    gating.remove()
    return torch.cat(per_token).mean().item()


def _self_generated_batches(model, num: int = 2, batch: int = 2, seq: int = 10) -> list[torch.Tensor]:
    """Greedy continuations of random first tokens: text the dense model predicts well, so real layers matter."""
    batches = []
    with torch.no_grad():
        for ids in _batches(num, batch, 1):
            for _ in range(seq - 1):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
            batches.append(ids)
    return batches


def _reference_ppl(model, batches) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1)
            nll -= logp.gather(-1, ids[:, 1:, None]).sum().item()
            count += ids[:, 1:].numel()
    return math.exp(nll / count)


def test_identity_layer_is_exact():
    # Everything below relies on it.
    model = _identity_llama([2])
    states = _boundary_states(model, _batches(1)[0])
    assert torch.equal(states[2], states[3])
    assert not torch.allclose(states[1], states[2])


# ---------------------------------------------------------------------------------------------------------------------
# Output KL and window scan
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_output_kl_zero_dense_positive_dropped_and_matches_reference(model_type):
    model = tiny_model(model_type)
    gating = LayerGating(model)
    batches = _batches()
    teacher = teacher_logits_for(model, gating, batches)
    assert [t.device.type for t in teacher] == ["cpu"] * len(batches)
    assert all(t.dtype == torch.float32 for t in teacher)

    assert output_kl(model, gating, batches, None, teacher) == 0.0
    assert output_kl(model, gating, batches, [True] * L, teacher) == 0.0
    keep = [i != 2 for i in range(L)]
    forward = output_kl(model, gating, batches, keep, teacher)
    assert forward > 1e-6
    assert forward == pytest.approx(_reference_kl(model, keep, batches), rel=1e-4)
    # Teacher computed on the fly gives the same number.
    assert output_kl(model, gating, batches, keep) == pytest.approx(forward, rel=1e-6)
    reverse = output_kl(model, gating, batches, keep, teacher, direction="reverse")
    assert reverse == pytest.approx(_reference_kl(model, keep, batches, "reverse"), rel=1e-4)
    assert reverse != forward
    with pytest.raises(ValueError, match="direction"):
        output_kl(model, gating, batches, keep, teacher, direction="sideways")


def test_window_scan_is_the_brute_force_optimum():
    model = tiny_model("llama", seed=1)
    gating = LayerGating(model)
    batches = _batches()
    num_drop, protect_first, protect_last = 2, 1, 1
    selection = window_scan(model, gating, batches, num_drop, protect_first, protect_last)

    brute = {}
    for start in range(protect_first, L - protect_last - num_drop + 1):
        keep = [not start <= i < start + num_drop for i in range(L)]
        brute[start] = _reference_kl(model, keep, batches)
    window_kl = selection.details["window_kl"]
    assert sorted(window_kl) == sorted(brute)
    for start, kl in brute.items():
        assert window_kl[start] == pytest.approx(kl, rel=1e-4)
    best = min(brute, key=brute.get)
    assert selection.drop == [best, best + 1]
    assert selection.details["best_kl"] == min(window_kl.values())
    assert selection.method == "window_scan"


# ---------------------------------------------------------------------------------------------------------------------
# Hidden-state selectors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_block_influence_matches_direct_computation(model_type):
    model = tiny_model(model_type)
    batches = _batches()
    selection = block_influence(model, batches, num_drop=2)

    cos_sums, tokens = torch.zeros(L, dtype=torch.float64), 0
    for ids in batches:
        states = [h.double().flatten(0, 1) for h in _boundary_states(model, ids)]
        for layer in range(L):
            cos_sums[layer] += torch.cosine_similarity(states[layer], states[layer + 1], dim=-1).sum()
        tokens += ids.numel()
    expected = (1 - cos_sums / tokens).tolist()
    assert selection.scores == pytest.approx(expected, abs=1e-5)
    assert selection.drop == sorted(sorted(range(L), key=expected.__getitem__)[:2])
    assert selection.method == "block_influence"


def test_block_influence_last_layer_is_not_measured_after_the_final_norm():
    # GPT-2's final LayerNorm changes the direction of h_L, so using hidden_states[-1] would give another BI.
    model = tiny_model("gpt2")
    ids = _batches(1)[0]
    selection = block_influence(model, [ids], num_drop=1)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    normed_bi = 1 - torch.cosine_similarity(hidden[-2], hidden[-1], dim=-1).mean().item()
    assert abs(selection.scores[-1] - normed_bi) > 1e-3


def test_block_influence_drops_identity_layer_first():
    model = _identity_llama([3])
    selection = block_influence(model, _batches(), num_drop=1)
    assert selection.drop == [3]
    assert selection.scores[3] < 1e-6
    assert min(s for i, s in enumerate(selection.scores) if i != 3) > 1e-3


def test_angular_picks_identity_window_and_matches_direct_computation():
    model = _identity_llama([2, 3])
    batches = _batches()
    selection = angular_distance_window(model, batches, num_drop=2)
    assert selection.drop == [2, 3]
    assert selection.method == "angular"

    distances = selection.details["window_distance"]
    assert sorted(distances) == list(range(L - 1))
    assert distances[2] < 1e-6
    sums, tokens = torch.zeros(L - 1, dtype=torch.float64), 0
    for ids in batches:
        states = [h.double().flatten(0, 1) for h in _boundary_states(model, ids)]
        for start in range(L - 1):
            cos = torch.cosine_similarity(states[start], states[start + 2], dim=-1).clamp(-1, 1)
            sums[start] += (torch.arccos(cos) / math.pi).sum()
        tokens += ids.numel()
    expected = (sums / tokens).tolist()
    for start in range(L - 1):
        if start != 2:  # arccos is ill-conditioned at cos ~ 1; checked against 0 above
            assert distances[start] == pytest.approx(expected[start], abs=1e-5)
            assert distances[start] > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# SLEB and KL importance
# ---------------------------------------------------------------------------------------------------------------------


def test_sleb_removes_identity_layers_first_with_unchanged_ppl():
    model = _identity_llama([1, 4])
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # a peaked, confident model: losing a real layer costs ppl on its own text
    batches = _self_generated_batches(model)
    gating = LayerGating(model)
    selection = sleb(model, gating, batches, num_drop=3)
    order, ppl = selection.details["order"], selection.details["ppl"]
    dense_ppl = selection.details["dense_ppl"]
    assert sorted(order[:2]) == [1, 4]
    assert ppl[:2] == pytest.approx([dense_ppl, dense_ppl], rel=1e-6)
    assert selection.drop == sorted(order)
    assert dense_ppl == pytest.approx(_reference_ppl(model, batches), rel=1e-5)
    # The greedy step really is the argmin of the candidates' ppl, each matching a manual evaluation.
    for step, candidates in enumerate(selection.details["candidate_ppl"]):
        assert order[step] == min(candidates, key=candidates.get)
        assert set(candidates) == set(range(L)) - set(order[:step])
    first_step = selection.details["candidate_ppl"][0]
    gating.set_mask([i != 0 for i in range(L)])
    assert first_step[0] == pytest.approx(_reference_ppl(model, batches), rel=1e-5)
    gating.set(None)
    # Scores rank the removal order: first removed lowest, kept layers highest.
    kept = [i for i in range(L) if i not in order]
    assert sorted(range(L), key=selection.scores.__getitem__)[:3] == order
    assert all(selection.scores[i] > max(selection.scores[j] for j in order) for i in kept)


def test_kl_importance_identity_layers_are_zero_and_dropped():
    model = _identity_llama([1, 4])
    gating = LayerGating(model)
    batches = _batches()
    importance = kl_importance(model, gating, batches)
    assert len(importance) == L
    assert importance[1] == 0.0 and importance[4] == 0.0
    assert min(importance[i] for i in (0, 2, 3, 5)) > 1e-6
    assert importance[2] == pytest.approx(_reference_kl(model, [i != 2 for i in range(L)], batches), rel=1e-4)
    selection = kl_importance_selection(model, gating, batches, num_drop=2)
    assert selection.drop == [1, 4]
    assert selection.scores == importance


# ---------------------------------------------------------------------------------------------------------------------
# Data-free selectors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_drop", "protect_first", "protect_last", "expected"),
    [(2, 0, 1, [3, 4]), (2, 0, 0, [4, 5]), (3, 1, 2, [1, 2, 3]), (1, 0, 3, [2])],
)
def test_drop_tail(num_drop, protect_first, protect_last, expected):
    selection = drop_tail(L, num_drop, protect_last=protect_last, protect_first=protect_first)
    assert selection.drop == expected
    assert selection.keep_mask(L) == [i not in expected for i in range(L)]


def test_tail_through_score_keeps_the_final_layer_by_default():
    model = tiny_model("llama")
    assert score("tail", model, None, [], 2).drop == [3, 4]
    assert score("tail", model, None, [], 2, protect_last=0).drop == [4, 5]


def test_random_is_seed_deterministic_and_respects_protection():
    draws = {seed: random_layers(12, 4, seed=seed, protect_first=2, protect_last=3).drop for seed in range(8)}
    assert random_layers(12, 4, seed=3, protect_first=2, protect_last=3).drop == draws[3]
    assert len({tuple(d) for d in draws.values()}) > 1
    for drop in draws.values():
        assert drop == sorted(set(drop)) and len(drop) == 4
        assert all(2 <= i < 9 for i in drop)
    state = torch.random.get_rng_state()
    random_layers(12, 4, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------------------------------
# Uniform interface: protection, validation, state restoration
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_protected_layers_are_never_dropped(name):
    # The identity layers sit in the protected ends, where any selector that ignored protection would look first.
    model = _identity_llama([0, 5])
    selection = score(name, model, None, _batches(), num_drop=2, protect_first=1, protect_last=1, seed=0)
    assert isinstance(selection, LayerSelection)
    assert selection.method == name
    assert len(selection.drop) == 2 and selection.drop == sorted(set(selection.drop))
    assert all(1 <= i <= 4 for i in selection.drop)
    if selection.scores is not None:
        assert len(selection.scores) == L


@pytest.mark.parametrize("name", sorted(SCORERS))
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_drop=0), r"`num_drop` must be an integer in \[1, 5\].*got 0"),
        (dict(num_drop=6), r"`num_drop` must be an integer in \[1, 5\].*got 6"),
        (dict(num_drop=4, protect_first=1, protect_last=2), r"`num_drop` .*\[1, 3\].*protect_first=1.*got 4"),
        (dict(num_drop=1, protect_first=-1), r"`protect_first` must be an integer >= 0, got -1"),
        (dict(num_drop=1, protect_first=3, protect_last=3), r"leave no droppable layer"),
    ],
)
def test_bad_budget_raises(name, kwargs, match):
    kwargs = {"protect_last": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        score(name, tiny_model("llama"), None, _batches(), **kwargs)


def test_candidate_layers_rejects_bool_and_returns_range():
    assert candidate_layers(6, 2, 1, 2) == [1, 2, 3]
    with pytest.raises(ValueError, match="`num_drop`"):
        candidate_layers(6, True)


def test_unknown_scorer_lists_the_allowed_names():
    with pytest.raises(ValueError, match=r"Unknown scorer 'shortgpt'.*block_influence.*angular.*sleb.*window_scan"):
        score("shortgpt", tiny_model("llama"), None, _batches(), 1)


def test_bad_batches_raise():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="`batches` is empty"):
        block_influence(model, [], 1)
    with pytest.raises(ValueError, match=r"`batches\[0\]` must be a 2-D integer tensor"):
        block_influence(model, [torch.zeros(2, 4, 8)], 1)


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_mode_and_gating_state_are_restored(name):
    # GPT-2 has dropout: a selector that scored in train mode would not be repeatable.
    model = tiny_model("gpt2")
    batches = _batches()
    reference = score(name, model, None, batches, num_drop=2)

    model.train()
    decoder_layers(model)[1].eval()  # a mixed state must come back exactly
    modes = {n: m.training for n, m in model.named_modules()}
    gating = LayerGating(model)
    preset = torch.tensor([1.0, 0.0, 1.0, 0.5, 1.0, 1.0])
    gating.set(preset)
    selection = score(name, model, gating, batches, num_drop=2)

    assert {n: m.training for n, m in model.named_modules()} == modes
    assert gating.values is preset
    assert selection.drop == reference.drop
    if reference.scores is not None:
        assert selection.scores == pytest.approx(reference.scores, rel=1e-5)
    for key in ("window_kl", "window_distance"):
        if key in reference.details:
            assert selection.details[key] == pytest.approx(reference.details[key], rel=1e-5)


def test_temporary_gating_is_removed():
    model = tiny_model("llama")
    score("sleb", model, None, _batches(), num_drop=1)
    assert all(not layer._forward_hooks for layer in decoder_layers(model))


# ---------------------------------------------------------------------------------------------------------------------
# The replaying fast path against the old gated implementation (tests/reference_scorers.py)
# ---------------------------------------------------------------------------------------------------------------------


def _assert_same_selection(new, old, rel: float = 1e-4):
    assert new.drop == old.drop
    assert new.method == old.method
    if old.scores is None:
        assert new.scores is None
    else:
        assert new.scores == pytest.approx(old.scores, rel=rel, abs=1e-9)
    assert sorted(new.details) == sorted(old.details)
    for key, value in old.details.items():
        if key == "candidate_ppl":  # SLEB: one dict per step
            assert [sorted(step) for step in new.details[key]] == [sorted(step) for step in value]
            for got, want in zip(new.details[key], value):
                assert got == pytest.approx(want, rel=rel)
        elif isinstance(value, (dict, list, float)):
            assert new.details[key] == pytest.approx(value, rel=rel, abs=1e-9), key
        else:
            assert new.details[key] == value, key


def _confident(model_type: str, seed: int = 0):
    # A peaked model on its own greedy text: removing a real layer clearly costs, so rankings are far from ties.
    model = tiny_model(model_type, seed=seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8)
    return model


@pytest.mark.parametrize(
    ("name", "model_type"),
    [*((name, "llama") for name in sorted(SCORERS)),
     *((name, arch) for name in ("window_scan", "kl_importance", "sleb") for arch in ("gpt2", "gemma3_text", "opt"))],
)
def test_every_scorer_matches_the_reference(name, model_type):
    # Gemma3 mixes sliding and full attention: each replayed layer must get its own mask and position embeddings.
    import reference_scorers

    model = _confident(model_type)
    batches = _self_generated_batches(model, num=2, seq=10)
    kwargs = dict(num_drop=3, protect_first=1, protect_last=0, seed=3)
    new = score(name, model, None, batches, **kwargs)
    old = reference_scorers.score(name, model, None, batches, **kwargs)
    _assert_same_selection(new, old)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_output_kl_of_multi_segment_masks_matches_the_reference(direction, monkeypatch):
    import reference_scorers

    from lit_prune.components import scorers

    model = tiny_model("qwen2", num_layers=8, seed=2)  # sliding-window layers mixed with full ones
    gating = LayerGating(model)
    batches = _batches(num=2, seq=11)
    masks = [
        [1, 2, 5],  # two segments
        [0, 3, 7],  # first and last layer, three segments
        [0, 1, 2, 3, 4, 5, 6],  # all but the last
        [1, 2, 3, 4, 5, 6, 7],  # all but the first
    ]
    teacher = teacher_logits_for(model, gating, batches)
    # Tiny chunks: every batch row is cut into several pieces, and chunks span rows.
    monkeypatch.setattr(scorers, "_CHUNK_ELEMENTS", 3 * VOCAB)
    for removed in masks:
        keep = [i not in removed for i in range(8)]
        want = reference_scorers.output_kl(model, gating, batches, keep, teacher, direction)
        assert want > 1e-6
        assert output_kl(model, gating, batches, keep, None, direction) == pytest.approx(want, rel=1e-4)
        assert output_kl(model, gating, batches, keep, teacher, direction) == pytest.approx(want, rel=1e-4)
    assert output_kl(model, gating, batches, [True] * 8, teacher, direction) == 0.0
    assert output_kl(model, gating, batches, None, None, direction) == 0.0


def test_window_scan_and_kl_importance_with_given_teacher_and_small_chunks(monkeypatch):
    import reference_scorers

    from lit_prune.components import scorers

    model = _confident("llama", seed=4)
    gating = LayerGating(model)
    batches = _self_generated_batches(model, num=2, seq=9)
    teacher = teacher_logits_for(model, gating, batches)
    monkeypatch.setattr(scorers, "_CHUNK_ELEMENTS", 5 * VOCAB)
    for direction in ("forward", "reverse"):
        new = window_scan(model, gating, batches, 2, 0, 0, direction, teacher)
        old = reference_scorers.window_scan(model, gating, batches, 2, 0, 0, direction, teacher)
        _assert_same_selection(new, old)
        assert kl_importance(model, gating, batches, direction, teacher) == pytest.approx(
            reference_scorers.kl_importance(model, gating, batches, direction, teacher), rel=1e-4)
    with pytest.raises(ValueError, match="does not match the model output"):
        window_scan(model, gating, batches, 2, teacher_logits=[t[:, :-1] for t in teacher])
    with pytest.raises(ValueError, match="`teacher_logits` has 1 entries for 2 batches"):
        kl_importance(model, gating, batches, teacher_logits=teacher[:1])


@pytest.mark.parametrize("name", ["window_scan", "kl_importance", "sleb"])
def test_gated_fallback_for_sharded_models_matches_the_reference(name, monkeypatch):
    # Sharded (FSDP) layers cannot be called on their own: the same scorers then gate every mask in a full forward.
    import reference_scorers

    from lit_prune.components import scorers

    monkeypatch.setattr(scorers, "_can_replay", lambda model: False)
    model = _confident("llama", seed=5)
    batches = _self_generated_batches(model, num=2, seq=10)
    kwargs = dict(num_drop=2, protect_first=1, protect_last=1)
    _assert_same_selection(score(name, model, None, batches, **kwargs),
                           reference_scorers.score(name, model, None, batches, **kwargs))


def _count_layer_runs(model) -> list[int]:
    """How often each decoder layer really computes (its MLP runs); a bypassed layer never reaches it."""
    counts = [0] * len(decoder_layers(model))
    for index, layer in enumerate(decoder_layers(model)):
        layer.mlp.register_forward_hook(lambda *args, index=index: counts.__setitem__(index, counts[index] + 1))
    return counts


def test_removed_layers_are_not_computed_and_prefixes_are_reused():
    model = tiny_model("llama", num_layers=8)
    gating = LayerGating(model)
    batches = _batches(num=2)
    counts = _count_layer_runs(model)
    output_kl(model, gating, batches, [i not in (2, 5) for i in range(8)])
    # Per batch: the dense teacher (every layer) + the masked model (every layer but 2 and 5).
    assert counts == [4, 4, 2, 4, 4, 2, 4, 4]

    counts[:] = [0] * 8
    window_scan(model, gating, batches, num_drop=3, protect_first=1, protect_last=1)
    # Per batch: the dense pass, the prefix advanced once through layers 0..3 (up to the last start, 4), and for
    # window [s, s+3) only the layers after it: starts 1..4 -> layers 4..7, 5..7, 6..7, 7.
    dense, prefix, suffixes = [1] * 8, [1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 2, 3, 4]
    assert counts == [2 * (a + b + c) for a, b, c in zip(dense, prefix, suffixes)]

    counts[:] = [0] * 8
    kl_importance(model, gating, batches)
    # Per batch: dense pass + prefix advance through layers 0..6 + for layer l the layers after it.
    assert counts == [2 * (1 + 1 + 0), *[2 * (1 + 1 + i) for i in range(1, 7)], 2 * (1 + 0 + 7)]


def test_sleb_candidates_share_their_prefix():
    model = tiny_model("llama", num_layers=6)
    gating = LayerGating(model)
    batches = _batches(num=1, seq=8)
    counts = _count_layer_runs(model)
    selection = sleb(model, gating, batches, num_drop=2, protect_first=1, protect_last=1)
    first = selection.details["order"][0]
    # dense ppl: every layer once. Step 1 (candidates 1..4): prefix advanced through 0..3, candidate c runs c+1..5.
    step1 = [sum(c < i for c in range(1, 5)) + (i < 4) for i in range(6)]
    # Step 2: the first choice is bypassed everywhere.
    rest = [c for c in range(1, 5) if c != first]
    step2 = [sum(c < i for c in rest) * (i != first) + (i < max(rest) and i != first) for i in range(6)]
    assert counts == [1 + a + b for a, b in zip(step1, step2)]


def test_layers_are_restored_even_after_an_error():
    from lit_prune.components import scorers

    model = tiny_model("llama")
    gating = LayerGating(model)
    batches = _batches()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    layers = decoder_layers(model)
    own_hooks = [dict(layer._forward_pre_hooks) for layer in layers]  # the gating's own (cut-layer) pre-hooks
    with pytest.raises(RuntimeError, match="boom"):
        with scorers._forwards_replaced(layers, {1: scorers._pass_through, 3: broken}):
            model(input_ids=batches[0])
    assert all("forward" not in layer.__dict__ for layer in layers)
    window_scan(model, gating, batches, 2)
    assert all("forward" not in layer.__dict__ for layer in layers)
    assert [dict(layer._forward_pre_hooks) for layer in layers] == own_hooks  # the recording hooks are gone
    # An instance-level forward (e.g. a device-map hook) comes back as it was.
    custom = layers[2].forward
    layers[2].forward = custom
    sleb(model, gating, batches, 1)
    assert layers[2].__dict__["forward"] is custom


def test_bad_keep_mask_raises():
    model = tiny_model("llama")
    gating = LayerGating(model)
    with pytest.raises(ValueError, match=r"`keep_mask` must hold 6 booleans"):
        output_kl(model, gating, _batches(), [True] * 5)
    with pytest.raises(ValueError, match=r"`keep_mask` must hold 6 booleans"):
        output_kl(model, gating, _batches(), torch.tensor([1.0, 0.5, 1.0, 1.0, 1.0, 1.0]))


def test_kl_never_holds_a_float32_copy_of_a_whole_batch_of_logits(monkeypatch):
    # bf16 model: its logits are bf16, so any float32 tensor of a whole batch's logits would be a copy made by the KL.
    import reference_scorers
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from lit_prune.components import scorers

    class LargestFloat32(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for value in tree_flatten(out)[0]:
                if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                    self.largest = max(self.largest, value.numel())
            return out

    model = tiny_model("llama").to(torch.bfloat16)
    gating = LayerGating(model)
    batches = _batches(num=2, batch=4, seq=6)
    chunk = 8 * VOCAB  # 8 tokens; a batch has 24
    monkeypatch.setattr(scorers, "_CHUNK_ELEMENTS", chunk)
    with LargestFloat32() as new:
        window_scan(model, gating, batches, num_drop=2)
    with LargestFloat32() as old:
        reference_scorers.window_scan(model, gating, batches, num_drop=2)
    assert old.largest >= 4 * 6 * VOCAB  # the old code did make such copies
    assert new.largest <= chunk
