"""The sign-flip test and interval of experiments/stats.py (paired comparisons over seeds)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments import stats

finite = st.floats(-5, 5, allow_nan=False, allow_infinity=False)


def _brute_pvalue(d, delta=0.0):
    x = np.asarray(d) - delta
    obs = abs(x.mean())
    hits = [abs(np.mean(np.array(s) * x)) >= obs - 1e-12
            for s in itertools.product((1, -1), repeat=len(x))]
    return float(np.mean(hits))


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=9), finite)
def test_pvalue_is_the_share_of_sign_patterns_as_extreme(d, delta):
    assert stats.sign_flip_pvalue(d, delta) == pytest.approx(_brute_pvalue(d, delta))


@settings(max_examples=40, deadline=None)
@given(st.lists(finite, min_size=6, max_size=10), st.floats(-3, 3))
def test_interval_is_the_inverted_test_and_shifts_with_the_data(d, shift):
    interval = stats.sign_flip_interval(d)
    assert interval is not None
    lo, hi = interval
    assert lo <= np.mean(d) <= hi
    width = max(np.ptp(d), 1e-6)
    # just inside the edges the test accepts, just outside it rejects
    assert stats.sign_flip_pvalue(d, lo + 1e-6 * width) > 0.05
    assert stats.sign_flip_pvalue(d, hi - 1e-6 * width) > 0.05
    assert stats.sign_flip_pvalue(d, lo - 1e-3 * width - 1e-9) <= 0.05
    assert stats.sign_flip_pvalue(d, hi + 1e-3 * width + 1e-9) <= 0.05
    lo2, hi2 = stats.sign_flip_interval(np.asarray(d) + shift)
    assert lo2 == pytest.approx(lo + shift, abs=1e-6 * (width + 1))
    assert hi2 == pytest.approx(hi + shift, abs=1e-6 * (width + 1))


def test_too_few_seeds_give_no_interval_and_bad_input_raises():
    assert stats.sign_flip_interval([1.0] * 5) is None  # 2/32 > 0.05
    assert stats.sign_flip_interval([1.0] * 6) is not None  # 2/64 < 0.05
    assert stats.sign_flip_interval([1.0] * 5, confidence=0.9) is not None  # 2/32 < 0.1
    for bad in ([], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="finite"):
            stats.sign_flip_pvalue(bad)
    with pytest.raises(ValueError, match="confidence"):
        stats.sign_flip_interval([1.0] * 8, confidence=1.0)


def test_coverage_under_a_symmetric_null_is_at_least_the_level():
    """Differences symmetric about 0.3: the 95% interval covers 0.3 in >= ~95% of draws."""
    rng = np.random.default_rng(0)
    covered = []
    for _ in range(300):
        d = 0.3 + rng.standard_t(3, size=8)
        lo, hi = stats.sign_flip_interval(d)
        covered.append(lo <= 0.3 <= hi)
    assert np.mean(covered) >= 0.92  # 300 draws: 0.95 - 2 binomial standard errors


def test_many_seeds_use_a_fixed_sample_of_patterns():
    d = np.linspace(-1, 2, 20)
    assert stats.sign_flip_pvalue(d) == stats.sign_flip_pvalue(d)  # deterministic
    lo, hi = stats.sign_flip_interval(d)
    assert lo < d.mean() < hi
