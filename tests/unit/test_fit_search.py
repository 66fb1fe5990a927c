"""The micro-batch search of ``benchmarks/train_throughput.py --fit`` (doubling, then bisection)."""

from __future__ import annotations

import math

import pytest

from benchmarks.train_throughput import largest_fitting


@pytest.mark.parametrize("limit", [1, 7, 64, 100])
def test_finds_the_largest_fitting_value_in_few_trials(limit):
    for capacity in range(0, limit + 3):
        trials = []

        def fits(n: int) -> bool:
            assert 1 <= n <= limit, n  # never tries outside [1, limit]
            trials.append(n)
            return n <= capacity

        assert largest_fitting(fits, limit) == min(capacity, limit)
        assert len(trials) <= 2 * math.ceil(math.log2(limit + 1)) + 1
        assert len(trials) == len(set(trials))  # no trial repeated
