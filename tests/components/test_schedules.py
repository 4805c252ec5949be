import math

import pytest

from lit_prune.components.schedules import ANNEAL_MODES, anneal, anneal_int, staircase

# (start, end, progress, mode) -> value, worked out by hand.
ANNEAL_CASES = [
    (1.0, 0.0, 0.0, "linear", 1.0),
    (1.0, 0.0, 0.25, "linear", 0.75),
    (1.0, 0.0, 1.0, "linear", 0.0),
    (2.0, 4.0, 0.5, "linear", 3.0),
    (1.0, 0.0, 0.5, "cosine", 0.5),
    (1.0, 0.0, 1 / 3, "cosine", 0.75),  # 0.5 * (1 + cos(pi / 3))
    (0.0, 8.0, 2 / 3, "cosine", 6.0),  # 8 * 0.5 * (1 - cos(2 pi / 3))
    (1.0, 0.01, 0.5, "exp", 0.1),  # geometric mean
    (1.0, 0.01, 0.25, "exp", 0.01**0.25),
    (0.5, 8.0, 0.75, "exp", 4.0),
    (3.0, 7.0, 0.6, "constant", 3.0),
    # progress is clamped to [0, 1]
    (1.0, 0.0, -0.5, "linear", 1.0),
    (1.0, 0.0, 1.5, "linear", 0.0),
    (1.0, 0.05, 7.0, "exp", 0.05),
]


@pytest.mark.parametrize(("start", "end", "progress", "mode", "expected"), ANNEAL_CASES)
def test_anneal_table(start, end, progress, mode, expected):
    assert anneal(start, end, progress, mode) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("mode", ["linear", "cosine", "exp"])
@pytest.mark.parametrize(("start", "end"), [(1.0, 0.05), (0.1, 0.3), (4.0, 1.0), (0.7, 0.7)])
def test_anneal_exact_endpoints_and_monotone(start, end, mode):
    values = [anneal(start, end, i / 200, mode) for i in range(201)]
    # Exactly, not approximately: callbacks and tests compare the last step with `end` using ==.
    assert values[0] == start
    assert values[-1] == end
    diffs = [b - a for a, b in zip(values, values[1:])]
    assert all(d <= 0 for d in diffs) if end < start else all(d >= 0 for d in diffs)


# (start, end, progress, mode) -> value
ANNEAL_INT_CASES = [
    (0, 4, 0.0, "linear", 0),
    (0, 4, 0.1, "linear", 0),  # 0.4 rounds down
    (0, 4, 0.125, "linear", 1),  # 0.5 rounds half up
    (0, 4, 0.5, "linear", 2),
    (0, 4, 1.0, "linear", 4),
    (12, 8, 0.5, "linear", 10),
    (12, 8, 1.0, "cosine", 8),
    (0, 10, 0.5, "cosine", 5),
    (1, 16, 0.5, "exp", 4),
    (5, 9, 0.9, "constant", 5),
]


@pytest.mark.parametrize(("start", "end", "progress", "mode", "expected"), ANNEAL_INT_CASES)
def test_anneal_int_table(start, end, progress, mode, expected):
    value = anneal_int(start, end, progress, mode)
    assert value == expected
    assert isinstance(value, int)


@pytest.mark.parametrize("mode", ["linear", "cosine", "exp"])
@pytest.mark.parametrize(("start", "end"), [(1, 7), (16, 12), (3, 3), (2, 31)])
def test_anneal_int_monotone_and_hits_end(start, end, mode):
    values = [anneal_int(start, end, i / 97, mode) for i in range(98)]
    assert values[0] == start
    assert values[-1] == end
    diffs = [b - a for a, b in zip(values, values[1:])]
    assert all(d <= 0 for d in diffs) if end < start else all(d >= 0 for d in diffs)
    # Every integer between the two ends is visited when the grid is fine enough.
    assert set(values) == set(range(min(start, end), max(start, end) + 1))


@pytest.mark.parametrize(
    ("start", "end", "mode", "match"),
    [
        (0.0, 1.0, "exp", "start > 0"),
        (1.0, -0.1, "exp", "end > 0"),
        (1.0, 0.1, "exponential", "must be one of"),
        (1.0, 0.1, "step", "must be one of"),
    ],
)
def test_anneal_rejects_bad_input(start, end, mode, match):
    with pytest.raises(ValueError, match=match):
        anneal(start, end, 0.5, mode)


def test_anneal_rejects_nan_progress():
    with pytest.raises(ValueError, match="nan"):
        anneal(1.0, 0.0, math.nan, "linear")


def test_modes_are_the_literal():
    assert set(ANNEAL_MODES) == {"linear", "cosine", "exp", "constant"}


# (progress, steps) -> quantised progress
STAIRCASE_CASES = [
    (0.0, 4, 0.0),
    (0.24, 4, 0.0),
    (0.25, 4, 0.25),
    (0.99, 4, 0.75),
    (1.0, 4, 1.0),
    (0.5, 1, 0.0),
    (1.0, 1, 1.0),
    (2.0, 3, 1.0),
]


@pytest.mark.parametrize(("progress", "steps", "expected"), STAIRCASE_CASES)
def test_staircase_table(progress, steps, expected):
    assert staircase(progress, steps) == pytest.approx(expected)


def test_staircase_rejects_zero_steps():
    with pytest.raises(ValueError, match="steps"):
        staircase(0.5, 0)
