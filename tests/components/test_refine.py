"""Discrete mask refinement: checked against brute force on synthetic objectives, and on a tiny gated model."""

import itertools

import pytest
import torch
from tiny import tiny_model

from lit_prune.components.gating import LayerGating
from lit_prune.components.refine import (
    MemoObjective,
    best_of,
    greedy_importance,
    greedy_removal,
    mask_kl_objective,
    shift_search,
    swap_search,
)
from lit_prune.components.scorers import output_kl, window_scan


def _interacting(costs, pair_penalty):
    """Additive per-layer costs plus a penalty for each listed pair dropped together (what defeats greedy)."""

    def objective(drop):
        value = sum(costs[i] for i in drop)
        for (a, b), penalty in pair_penalty.items():
            if a in drop and b in drop:
                value += penalty
        return value

    return objective


def test_memo_counts_distinct_masks_and_ignores_order():
    calls = []
    memo = MemoObjective(lambda drop: calls.append(drop) or float(sum(drop)))
    assert memo([3, 1]) == memo((1, 3)) == 4.0
    assert memo([2]) == 2.0
    assert memo.evaluations == 2 and calls == [(1, 3), (2,)]


def test_greedy_removal_follows_the_cheapest_extra_removal():
    costs = [5.0, 1.0, 2.0, 3.0, 0.5, 9.0]
    objective = _interacting(costs, {(1, 4): 10.0})
    order, losses = greedy_removal(objective, candidates=range(6), num_drop=2)
    # 4 is cheapest alone; then 1 would cost 1 + 10, so 2 is taken instead.
    assert order == [4, 2]
    assert losses == [0.5, 2.5]


def test_greedy_importance_ranks_exactly_the_greedy_mask_lowest():
    costs = [5.0, 1.0, 2.0, 3.0, 0.5, 9.0]
    objective = _interacting(costs, {(1, 4): 10.0})
    importance = greedy_importance(objective, candidates=[1, 2, 3, 4], num_drop=2, num_layers=6)
    lowest = sorted(range(6), key=lambda i: importance[i])[:2]
    assert sorted(lowest) == [2, 4]
    assert importance[0] == importance[5] == max(importance)  # protected layers are never the cheapest


def test_swap_search_reaches_the_brute_force_optimum_where_greedy_does_not():
    # Greedy takes 0 first (cheapest alone), but 0 clashes with both 1 and 2, the best pair.
    costs = [0.1, 0.3, 0.3, 3.0]
    objective = MemoObjective(_interacting(costs, {(0, 1): 1.0, (0, 2): 1.0}))
    order, _ = greedy_removal(objective, range(4), 2)
    assert sorted(order) == [0, 1]
    brute_value, brute = min((objective(d), d) for d in itertools.combinations(range(4), 2))
    drop, value, rounds = swap_search(objective, order, range(4))
    assert drop == brute and value == pytest.approx(brute_value) and rounds >= 1


def test_swap_search_respects_the_radius_and_candidates():
    objective = _interacting([0.0, 9.0, 9.0, 9.0, 9.0, 0.0], {})
    # The best swap partner (layer 5) is 5 layers away from layer 1: out of reach with radius 1.
    drop, value, _ = swap_search(objective, [0, 1], candidates=range(6), radius=1)
    assert drop == (0, 1) or 5 not in drop
    drop, value, _ = swap_search(objective, [0, 1], candidates=range(6), radius=None)
    assert drop == (0, 5) and value == 0.0
    with pytest.raises(ValueError, match="outside the candidates"):
        swap_search(objective, [0, 5], candidates=range(1, 6))


def test_shift_search_finds_the_best_window_and_keeps_segments_feasible():
    costs = [9, 9, 5, 4, 1, 1, 1, 3, 9, 9]
    objective = _interacting([float(c) for c in costs], {})
    starts, value, _ = shift_search(objective, starts=[1], widths=[3], low=1, high=9)
    assert starts == [4] and value == 3.0
    two, _, _ = shift_search(objective, starts=[1, 6], widths=[2, 2], low=1, high=9)
    assert two[0] + 2 <= two[1] and two[1] + 2 <= 9
    with pytest.raises(ValueError, match="do not fit"):
        shift_search(objective, starts=[0], widths=[3], low=1, high=9)


def test_best_of_prefers_lowest_then_smallest():
    objective = _interacting([1.0, 1.0, 0.0], {})
    assert best_of(objective, [[1], [0], [2]]) == ((2,), 0.0)
    assert best_of(objective, [[1], [0]]) == ((0,), 1.0)


def test_mask_kl_objective_is_the_scorers_kl_and_window_search_matches_the_scan():
    model = tiny_model("llama", num_layers=6)
    gating = LayerGating(model)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 90, (2, 8), generator=generator) for _ in range(2)]
    objective = mask_kl_objective(model, gating, batches)
    assert objective(()) == 0.0
    keep = [i not in (2, 3) for i in range(6)]
    assert objective((3, 2)) == pytest.approx(output_kl(model, gating, batches, keep))
    scan = window_scan(model, gating, batches, num_drop=2, protect_first=1, protect_last=1)
    starts, value, _ = shift_search(objective, starts=[1], widths=[2], low=1, high=5)
    # A local search from one end may stop early; seeded with the scan it must stay there.
    seeded, seeded_value, rounds = shift_search(objective, starts=[scan.drop[0]], widths=[2], low=1, high=5)
    assert seeded == [scan.drop[0]] and rounds == 0
    assert seeded_value == pytest.approx(scan.details["best_kl"]) and seeded_value <= value


def test_gates_take_a_refined_mask():
    from lit_prune.components.gates import ConcaveGate, GumbelTopKGate

    clp = ConcaveGate(12, 3, protect_first=1, protect_last=1).set_starts_([6])
    assert clp.drop_indices() == [6, 7, 8]
    with pytest.raises(ValueError, match="do not fit"):
        clp.set_starts_([10])
    e3 = GumbelTopKGate(8, 2, init_logits=[0.0, 1.0, 2.0, -1.0, 3.0, 4.0, 5.0, 6.0], protect_first=1)
    before = e3.logits.detach().clone()
    e3.set_drop_([2, 3])
    assert e3.drop_indices() == [2, 3]
    # Layer 3 already ranked lowest: only layer 2's logit moved.
    changed = (e3.logits.detach() != before).nonzero().flatten().tolist()
    assert changed == [2]
    with pytest.raises(ValueError, match="unprotected"):
        e3.set_drop_([0, 3])


def test_auto_swap_radius_is_any_pair_only_while_a_round_is_affordable():
    from lit_prune.components.refine import AUTO_FALLBACK_RADIUS, AUTO_MAX_ANY_PAIR_SWAPS, auto_swap_radius

    assert auto_swap_radius(8, 28) is None  # SmolLM2, 8 of 30 (28 candidates): 160 swaps per round
    assert auto_swap_radius(5, 16) is None  # Gemma 3, 5 of 18
    assert auto_swap_radius(16, 62) == AUTO_FALLBACK_RADIUS  # 32B shape, 16 of 64: 736 swaps per round
    # The boundary itself is still any pair.
    assert auto_swap_radius(16, 32) is None and 16 * 16 == AUTO_MAX_ANY_PAIR_SWAPS
    assert auto_swap_radius(16, 33) == AUTO_FALLBACK_RADIUS
