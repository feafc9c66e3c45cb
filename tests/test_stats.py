"""Seed statistics: Student's t tail and the one-sided Welch test against independent numbers
(closed forms for 1 and 2 degrees of freedom; SciPy 1.17's ``ttest_ind(equal_var=False,
alternative='less')`` values, computed once and written here)."""

from __future__ import annotations

import math

import pytest

from proteus.stats import betainc, mean, stdev, t_sf, welch_one_sided


def test_mean_and_sample_stdev():
    assert mean([1.0, 2.0, 4.0]) == pytest.approx(7 / 3)
    assert stdev([1.0, 2.0, 4.0]) == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2
                                                              + (4 - 7 / 3) ** 2) / 2))
    assert stdev([3.0]) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        mean([])


@pytest.mark.parametrize("t", [-3.0, -0.5, 0.0, 0.3, 1.0, 2.0, 7.5])
def test_t_tail_matches_closed_forms(t):
    # df = 1 is the Cauchy distribution; df = 2 has P(T > t) = 1/2 - t / (2 sqrt(t^2 + 2))
    assert t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)
    assert t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(t * t + 2)), abs=1e-12)


def test_t_tail_critical_value_and_incomplete_beta():
    assert t_sf(2.764, 10) == pytest.approx(0.01, abs=1e-4)  # the t table's 1% point, df 10
    assert betainc(1.0, 1.0, 0.3) == pytest.approx(0.3)  # I_x(1, 1) = x
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)  # 1 - (1-x)^4 - 4x(1-x)^3


@pytest.mark.parametrize("new, base, margin, t, df, p", [
    ([1.10, 1.11, 1.12], [1.20, 1.21, 1.19], 0.0, 11.022703842524274, 4.0,
     0.0001925338556832724),
    ([1.10, 1.11, 1.12], [1.20, 1.21, 1.19], 0.085, 0.6123724356957809, 4.0,
     0.28669612691268187),
    ([1.10, 1.13, 1.12, 1.09], [1.20, 1.21], 0.0, 9.127304766889987, 3.9921259842519703,
     0.00040343379160529176),
])
def test_welch_matches_scipy(new, base, margin, t, df, p):
    w = welch_one_sided(new, base, margin)
    assert w.t == pytest.approx(t, rel=1e-10)
    assert w.df == pytest.approx(df, rel=1e-10)
    assert w.p == pytest.approx(p, rel=1e-8)


def test_welch_direction_and_bad_input():
    better = welch_one_sided([1.0, 1.01, 0.99], [1.2, 1.21, 1.19])
    worse = welch_one_sided([1.2, 1.21, 1.19], [1.0, 1.01, 0.99])
    assert better.p < 0.01 < 0.99 < worse.p
    with pytest.raises(ValueError, match="at least 2 values"):
        welch_one_sided([1.0], [1.0, 2.0])
