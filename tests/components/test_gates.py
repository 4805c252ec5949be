import itertools

import pytest
import torch

from lit_prune.components.gates import ConcaveGate, GumbelTopKGate, LayerGate, logits_from_importance


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def _check_common_api(gate: LayerGate) -> None:
    out = gate()
    assert out.shape == (gate.num_layers,) and out.dtype == torch.float32
    assert ((out >= 0) & (out <= 1)).all()
    mask = gate.hard_mask()
    assert mask.dtype == torch.bool and mask.shape == (gate.num_layers,)
    assert (~mask).sum().item() == gate.num_drop
    drop = gate.drop_indices()
    assert drop == sorted(drop) and drop == [i for i in range(gate.num_layers) if not mask[i]]
    probs = gate.keep_probabilities()
    assert not probs.requires_grad and ((probs >= 0) & (probs <= 1)).all()


# ---------------------------------------------------------------------------------------------------------------------
# validation (table-driven)


BAD_ARGS = [
    (ConcaveGate, dict(num_layers=30, num_drop=31), r"`num_drop` must be in \[1, 29\].*30 decoder layers, got 31"),
    (ConcaveGate, dict(num_layers=30, num_drop=0), r"`num_drop` must be in \[1, 29\]"),
    (GumbelTopKGate, dict(num_layers=8, num_drop=8), r"`num_drop` must be in \[1, 7\]"),
    (GumbelTopKGate, dict(num_layers=1, num_drop=1), r"`num_layers`"),
    (ConcaveGate, dict(num_layers=8, num_drop=2, temperature=0.0), r"`temperature` must be .*> 0, got 0.0"),
    (GumbelTopKGate, dict(num_layers=8, num_drop=2, temperature=-1.0), r"`temperature`"),
    (ConcaveGate, dict(num_layers=8, num_drop=7), r"`protect_first` \(1\) \+ `num_drop` \(7\) \+ `protect_last`"),
    (ConcaveGate, dict(num_layers=8, num_drop=2, protect_first=-1), r"`protect_first` must be an integer >= 0"),
    (GumbelTopKGate, dict(num_layers=8, num_drop=5, protect_first=2, protect_last=2), r"exceeds the 8 decoder layers"),
    (ConcaveGate, dict(num_layers=8, num_drop=2, num_segments=3), r"`num_segments` must be in \[1, 2\]"),
    (ConcaveGate, dict(num_layers=8, num_drop=2, num_segments=0), r"`num_segments`"),
    (ConcaveGate, dict(num_layers=10, num_drop=3, init_starts=[0.0]), r"`init_starts`.*\[1, 6\]"),
    (ConcaveGate, dict(num_layers=10, num_drop=3, init_starts=[6.5]), r"`init_starts`"),
    (ConcaveGate, dict(num_layers=10, num_drop=3, init_starts=[2.0, 4.0]), r"`init_starts` must have num_segments=1"),
    (ConcaveGate, dict(num_layers=12, num_drop=4, num_segments=2, init_starts=[3.0, 4.0]), r"`init_starts`.*fit"),
    (ConcaveGate, dict(num_layers=12, num_drop=4, num_segments=2, init_starts=[6.0, 2.0]), r"`init_starts`"),
    (GumbelTopKGate, dict(num_layers=4, num_drop=1, init_logits=[1.0, 2.0]), r"`init_logits` must be 4 finite"),
    (GumbelTopKGate, dict(num_layers=2, num_drop=1, init_logits=[1.0, float("nan")]), r"`init_logits`"),
]


@pytest.mark.parametrize(("cls", "kwargs", "match"), BAD_ARGS, ids=lambda x: x.__name__ if isinstance(x, type) else "")
def test_bad_arguments_raise_naming_the_argument(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_layer_gate_is_abstract():
    with pytest.raises(TypeError):
        LayerGate(4, 1)


@pytest.mark.parametrize("cls", [ConcaveGate, GumbelTopKGate])
def test_temperature_setter_validates(cls):
    gate = cls(num_layers=8, num_drop=2)
    gate.temperature = 0.25
    assert gate.temperature == 0.25
    for bad in (0.0, -0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="`temperature`"):
            gate.temperature = bad
    assert gate.temperature == 0.25


@pytest.mark.parametrize(
    "gate",
    [
        ConcaveGate(16, 4),
        ConcaveGate(16, 5, num_segments=2, temperature=0.3),
        GumbelTopKGate(16, 4),
        GumbelTopKGate(16, 4, protect_first=2, protect_last=1),
    ],
    ids=["concave", "concave-2seg", "gumbel", "gumbel-protected"],
)
@pytest.mark.parametrize("training", [True, False])
def test_common_api(gate, training):
    gate.train(training)
    _check_common_api(gate)


@pytest.mark.parametrize(("cls", "param"), [(ConcaveGate, "starts"), (GumbelTopKGate, "logits")])
def test_state_dict_holds_only_the_learned_parameter(cls, param):
    assert list(cls(10, 3).state_dict()) == [param]


# ---------------------------------------------------------------------------------------------------------------------
# ConcaveGate


@pytest.mark.parametrize(("num_layers", "num_drop"), [(24, 6), (32, 8), (40, 9)])
@pytest.mark.parametrize("num_segments", [1, 2])
@pytest.mark.parametrize("temperature", [1.0, 0.3, 0.05])
def test_concave_budget_holds_at_every_temperature(num_layers, num_drop, num_segments, temperature):
    gate = ConcaveGate(num_layers, num_drop, temperature, num_segments=num_segments)
    assert (1 - gate()).sum().item() == pytest.approx(num_drop, abs=0.01)


def test_concave_widths_split_evenly_and_default_starts_spread():
    gate = ConcaveGate(20, 8, num_segments=3, protect_first=2, protect_last=1)
    assert gate.widths == [3, 3, 2]
    (a0, b0), (a1, b1), (a2, b2) = gate.segments()
    assert (b0 - a0, b1 - a1, b2 - a2) == (3, 3, 2)
    # Equal free gaps before, between and after the segments (20 - 3 - 8 = 9 free layers -> 2.25 each).
    starts = gate.starts.tolist()
    gaps = [starts[0] - 2, starts[1] - (starts[0] + 3), starts[2] - (starts[1] + 3), 19 - (starts[2] + 2)]
    assert gaps == pytest.approx([2.25] * 4)
    single = ConcaveGate(12, 4)  # centred in [1, 11]
    assert single.starts.item() == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("kwargs", "starts"),
    [
        (dict(num_layers=16, num_drop=4), [3.3]),
        (dict(num_layers=16, num_drop=4), [7.7]),
        (dict(num_layers=16, num_drop=5, num_segments=2), [2.6, 9.2]),
        (dict(num_layers=16, num_drop=5, num_segments=2), [4.1, 7.1]),  # touching after rounding
    ],
)
def test_concave_zero_temperature_limit_is_the_hard_mask(kwargs, starts):
    gate = ConcaveGate(**kwargs, init_starts=starts, temperature=1e-3)
    torch.testing.assert_close(gate(), gate.hard_mask().float(), atol=1e-3, rtol=0)
    # Rounded starts: layer i is dropped iff its centre i + 0.5 lies inside a segment.
    expected = [i for i in range(gate.num_layers) if any(s < i + 0.5 < s + n for s, n in zip(starts, gate.widths))]
    assert gate.drop_indices() == expected


def test_concave_eval_is_hard_and_still_differentiable():
    gate = ConcaveGate(16, 4, temperature=0.5, init_starts=[5.4]).eval()
    out = gate()
    assert torch.equal(out.detach(), gate.hard_mask().float())
    torch.testing.assert_close(gate(), out)  # deterministic
    (out * torch.arange(16.0)).sum().backward()
    assert gate.starts.grad.abs().item() > 0


@pytest.mark.parametrize("num_segments", [1, 2])
def test_concave_gradient_reaches_the_starts(num_segments):
    gate = ConcaveGate(16, 4, temperature=0.5, num_segments=num_segments)
    cost = torch.linspace(0.0, 1.0, 16)
    ((1 - gate()) * cost).sum().backward()
    assert (gate.starts.grad.abs() > 0).all()
    # Dropping later layers costs more, so every start should want to move left (positive gradient).
    assert (gate.starts.grad > 0).all()


def test_concave_keep_probabilities_match_train_forward():
    gate = ConcaveGate(12, 3, temperature=0.7)
    torch.testing.assert_close(gate.keep_probabilities(), gate().detach())
    assert gate.scores() is None


@pytest.mark.parametrize(
    ("kwargs", "raw"),
    [
        (dict(num_layers=12, num_drop=4), [-3.0]),
        (dict(num_layers=12, num_drop=4), [30.0]),
        (dict(num_layers=12, num_drop=4, protect_first=0, protect_last=3), [7.0]),
        (dict(num_layers=14, num_drop=6, num_segments=2), [5.0, 5.0]),  # full overlap
        (dict(num_layers=14, num_drop=6, num_segments=2), [9.0, 2.0]),  # wrong order
        (dict(num_layers=14, num_drop=6, num_segments=2), [-4.0, 40.0]),
        (dict(num_layers=20, num_drop=7, num_segments=3), [8.0, 8.5, 9.0]),
    ],
)
def test_concave_clamp_projects_onto_the_feasible_set(kwargs, raw):
    gate = ConcaveGate(**kwargs)
    with torch.no_grad():
        gate.starts.copy_(torch.tensor(raw))
    unclamped_out = gate().detach()
    gate.clamp_()
    starts = gate.starts.tolist()
    lo, hi = gate.protect_first, gate.num_layers - gate.protect_last
    assert starts[0] >= lo - 1e-6 and starts[-1] + gate.widths[-1] <= hi + 1e-6
    for k in range(len(starts) - 1):
        assert starts[k] + gate.widths[k] <= starts[k + 1] + 1e-6  # ordered, no overlap
    torch.testing.assert_close(gate().detach(), unclamped_out)  # forward already projected
    mask = gate.hard_mask()
    assert mask[:lo].all() and mask[hi:].all() and (~mask).sum().item() == gate.num_drop
    before = gate.starts.detach().clone()
    gate.clamp_()
    assert torch.equal(gate.starts.detach(), before)  # idempotent


def test_concave_projection_is_the_nearest_feasible_point():
    gate = ConcaveGate(14, 6, num_segments=2)  # widths [3, 3]; s0 in [1, 7], s1 in [s0 + 3, 10]
    grid = [(a / 4, b / 4) for a in range(4, 29) for b in range(16, 41)]
    feasible = [(a, b) for a, b in grid if a >= 1 and a + 3 <= b and b <= 10]
    for raw in ([6.0, 6.5], [0.0, 12.0], [8.0, 2.0], [3.0, 5.0]):
        with torch.no_grad():
            gate.starts.copy_(torch.tensor(raw))
        gate.clamp_()
        projected = gate.starts.tolist()
        best = min(feasible, key=lambda p: (p[0] - raw[0]) ** 2 + (p[1] - raw[1]) ** 2)
        dist = (projected[0] - raw[0]) ** 2 + (projected[1] - raw[1]) ** 2
        assert dist <= (best[0] - raw[0]) ** 2 + (best[1] - raw[1]) ** 2 + 1e-5


@pytest.mark.parametrize(("protect_first", "protect_last"), [(0, 0), (1, 1), (3, 2)])
def test_concave_never_drops_protected_layers(protect_first, protect_last):
    gate = ConcaveGate(12, 3, num_segments=2, protect_first=protect_first, protect_last=protect_last)
    for s0, s1 in itertools.product(range(-2, 14, 3), range(-2, 14, 3)):
        with torch.no_grad():
            gate.starts.copy_(torch.tensor([s0 + 0.4, s1 - 0.3]))
        mask = gate.hard_mask()
        assert mask[:protect_first].all() and mask[12 - protect_last :].all()
        assert (~mask).sum().item() == 3


def _fit(gate: LayerGate, cost: torch.Tensor, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(gate.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        ((1 - gate()) * cost).sum().backward()  # dropping layer l costs cost[l]
        opt.step()
        if isinstance(gate, ConcaveGate):
            gate.clamp_()


def test_concave_toy_search_finds_the_cheapest_window():
    centres = torch.arange(16.0) + 0.5
    cost = (centres - 11.5).abs()  # cheapest 3-layer window: [10, 13)
    gate = ConcaveGate(16, 3, temperature=0.5)
    start_before = gate.starts.item()
    _fit(gate, cost, steps=150, lr=0.1)
    assert abs(gate.starts.item() - 10) < abs(start_before - 10)
    assert gate.segments() == [(10, 13)]


def test_concave_toy_search_two_segments():
    centres = torch.arange(16.0) + 0.5
    cost = torch.minimum((centres - 4).abs(), (centres - 13).abs())  # cheapest width-2 windows: [3, 5) and [12, 14)
    gate = ConcaveGate(16, 4, temperature=0.5, num_segments=2)
    _fit(gate, cost, steps=200, lr=0.1)
    assert gate.segments() == [(3, 5), (12, 14)]


# ---------------------------------------------------------------------------------------------------------------------
# GumbelTopKGate


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("training", [True, False])
def test_gumbel_forward_is_exact_k_hot_with_protection(k, training):
    gate = GumbelTopKGate(10, 3, protect_first=1, protect_last=2).train(training)
    gate.k = k
    for _ in range(5):
        out = gate()
        assert set(out.unique().tolist()) <= {0.0, 1.0}
        assert (1 - out).sum().item() == k
        assert out[:1].eq(1).all() and out[-2:].eq(1).all()


def test_gumbel_straight_through_gradient_reaches_logits():
    gate = GumbelTopKGate(8, 3, protect_first=1, temperature=0.5)
    (gate() * torch.arange(8.0)).sum().backward()
    grad = gate.logits.grad
    assert grad[1:].abs().sum() > 0
    assert grad[0].item() == 0  # protected: not part of the ranking


def test_gumbel_training_gate_is_stochastic_but_seeded():
    gate = GumbelTopKGate(12, 4)
    torch.manual_seed(0)
    first = [gate() for _ in range(4)]
    torch.manual_seed(0)
    second = [gate() for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert len({tuple(m.tolist()) for m in first}) > 1  # zero logits: noise decides
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(gate(generator=gen_a), gate(generator=gen_b))


def test_gumbel_eval_is_deterministic_and_uses_no_randomness():
    gate = GumbelTopKGate(8, 3, init_logits=[0.5, -1.0, 2.0, 0.1, -0.3, 1.0, -2.0, 0.0]).eval()
    gate.k = 2
    state = torch.random.get_rng_state()
    out = gate()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(gate(), out)
    assert out.tolist() == [1, 0, 1, 1, 1, 1, 0, 1]  # the two lowest logits (-1.0, -2.0) are dropped


def test_gumbel_hard_mask_ignores_k_and_noise():
    logits = [0.5, -1.0, 2.0, 0.1, -0.3, 1.0, -2.0, 0.0]
    gate = GumbelTopKGate(8, 3, init_logits=logits, protect_last=1)
    gate.k = 0
    lowest_unprotected = sorted(range(7), key=lambda i: logits[i])[:3]
    assert gate.drop_indices() == sorted(lowest_unprotected)
    assert gate.scores() == pytest.approx(logits)


def test_gumbel_k_property():
    gate = GumbelTopKGate(10, 4)
    assert gate.k == 4 and gate.k_target == 4
    gate.k = 2
    assert gate.k == 2
    for bad in (-1, 5, 1.5):
        with pytest.raises(ValueError, match=r"`k` must be an integer in \[0, num_drop=4\]"):
            gate.k = bad
    with pytest.raises(AttributeError):
        gate.k_target = 3


def test_gumbel_k_zero_keeps_everything_and_backward_works():
    gate = GumbelTopKGate(6, 2)
    gate.k = 0
    out = gate()
    assert torch.equal(out.detach(), torch.ones(6))
    out.sum().backward()
    assert torch.equal(gate.logits.grad, torch.zeros(6))


@pytest.mark.parametrize("k", [0, 2, 4])
def test_gumbel_keep_probabilities(k):
    gate = GumbelTopKGate(10, 4, init_logits=torch.randn(10).tolist(), protect_first=1, temperature=0.5)
    gate.k = k
    probs = gate.keep_probabilities()
    assert not probs.requires_grad
    assert probs[0].item() == 1.0
    assert probs.sum().item() == pytest.approx(10 - k, abs=1e-4)
    assert torch.equal(gate.keep_probabilities(), probs)


def test_gumbel_init_scale_multiplies_init_logits():
    gate = GumbelTopKGate(3, 1, init_logits=[1.0, -2.0, 0.5], init_scale=3.0)
    assert gate.logits.tolist() == pytest.approx([3.0, -6.0, 1.5])
    assert GumbelTopKGate(3, 1).logits.tolist() == [0.0, 0.0, 0.0]


def test_gumbel_toy_search_drops_the_cheapest_layers():
    cost = torch.tensor([0.9, 0.2, 0.7, 0.05, 0.6, 0.3, 0.8, 0.4])  # cheapest three: 3, 1, 5
    gate = GumbelTopKGate(8, 3, temperature=0.5)
    _fit(gate, cost, steps=300, lr=0.05)
    assert gate.drop_indices() == [1, 3, 5]


# ---------------------------------------------------------------------------------------------------------------------
# logits_from_importance


def test_logits_from_importance_standardizes_log_importance():
    importance = [1e-4, 0.01, 0.5, 2.0, 0.0]
    logits = logits_from_importance(importance, scale=2.0)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert logits.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert logits.std(unbiased=False).item() == pytest.approx(2.0, rel=1e-5)
    assert logits.argsort().tolist() == [4, 0, 1, 2, 3]  # rank preserved: more important -> larger logit
    torch.testing.assert_close(GumbelTopKGate.logits_from_importance(importance, scale=2.0), logits)
    # Scale invariance of the log mapping: multiplying importances by a constant does not change the logits.
    torch.testing.assert_close(
        logits_from_importance([3 * x for x in importance[:4]]), logits_from_importance(importance[:4])
    )


def test_logits_from_importance_edge_cases():
    assert torch.equal(logits_from_importance([0.3, 0.3, 0.3]), torch.zeros(3))
    with pytest.raises(ValueError, match="`importance`"):
        logits_from_importance([0.1, -0.2])
    with pytest.raises(ValueError, match="`importance`"):
        logits_from_importance([])


def test_logits_from_importance_feeds_the_gate():
    importance = [5.0, 0.01, 3.0, 0.02, 4.0, 0.03]
    gate = GumbelTopKGate(6, 3, init_logits=logits_from_importance(importance).tolist())
    assert gate.drop_indices() == [1, 3, 5]
