"""The two-sample tests of the multi-seed report: known answers, scipy, and brute force.

Known answers are exact fractions of the C(n1 + n2, n1) relabellings (2/252
for 5 vs 5, 2/20 for 3 vs 3); scipy (test extra) checks the Mann–Whitney
p-values without ties, the Brown–Forsythe statistic and its F-approximated
p-value, and the Student-t tail; a brute-force enumeration with
``scipy.stats.rankdata`` / ``f_oneway`` checks the permutation p-values with ties.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from experiments import significance as sig

P_5V5 = 2 / math.comb(10, 5)        # 0.0079


def test_smallest_p():
  assert sig.smallest_p(5, 5) == pytest.approx(P_5V5) and round(P_5V5, 4) == 0.0079
  assert sig.smallest_p(3, 3) == pytest.approx(0.1)
  assert sig.smallest_p(4, 4) == pytest.approx(2 / 70)
  assert sig.smallest_p(1, 1) == 1.0 and sig.smallest_p(2, 1) == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="at least one value per group"):
    sig.smallest_p(0, 3)


def test_location_complete_separation_5v5():
  res = sig.location_test([3, 3, 4, 4, 5], [8, 9, 9, 10, 11])
  assert res.p == pytest.approx(P_5V5) and res.p_min == pytest.approx(P_5V5)
  assert (res.statistic, res.direction, res.n_x, res.n_y) == (-25.0, "<", 5, 5)
  assert res.exact and res.relabellings == 252 and res.p_approx is None
  swapped = sig.location_test([8, 9, 9, 10, 11], [3, 3, 4, 4, 5])
  assert swapped.p == res.p and (swapped.statistic, swapped.direction) == (25.0, ">")
  # Same as scipy's exact Mann–Whitney (no ties across the groups decide it here).
  assert res.p == pytest.approx(sps.mannwhitneyu([3, 3, 4, 4, 5], [8, 9, 9, 10, 11],
                                                 method="exact").pvalue)


def test_location_identical_groups_give_p_1():
  res = sig.location_test([3, 4, 5, 6, 7], [3, 4, 5, 6, 7])
  assert (res.p, res.statistic, res.direction) == (1.0, 0.0, "=")
  assert sig.location_test([4, 4, 4], [4, 4, 4]).p == 1.0


def test_location_3v3_cannot_be_significant():
  res = sig.location_test([1, 2, 3], [4, 5, 6])
  assert res.p == pytest.approx(0.1) and res.p_min == pytest.approx(0.1) and res.p >= 0.05
  assert res.relabellings == 20


def test_censored_group_against_one_that_always_reaches_gives_the_minimal_p():
  # Never reached within 12 epochs (censored at 12) against reached at 2..5.
  res = sig.location_test([12] * 5, [2, 3, 3, 4, 5], x_censored=[True] * 5)
  assert res.p == pytest.approx(P_5V5) and res.p == res.p_min
  assert (res.statistic, res.direction, res.censored_x, res.censored_y) == (25.0, ">", 5, 0)
  # With a common censoring time after every observed value, censored = +inf, tied.
  mixed = sig.location_test([3, 12, 12, 6], [5, 7, 9, 12], [False, True, True, False],
                            [False, False, False, True])
  as_inf = sig.location_test([3, 1e9, 1e9, 6], [5, 7, 9, 1e9])
  assert (mixed.p, mixed.statistic, mixed.p_min) == (as_inf.p, as_inf.statistic, as_inf.p_min)
  # One reach at the last epoch against censoring there: nothing to tell the groups apart.
  assert sig.location_test([12] * 5, [12] * 5, [False] + [True] * 4, [True] * 5).p == 1.0


def test_gehan_scores():
  values = [3, 1, 4, 1, 5, 9, 2, 6]
  ranks = sps.rankdata(values)
  np.testing.assert_array_equal(sig.gehan_scores(values), 2 * ranks - (len(values) + 1))
  # x = [2, 4 censored], y = [3, 6]: 4+ > 2, 3; 4+ vs 6 undecided.
  np.testing.assert_array_equal(sig.gehan_scores([2, 4, 3, 6], [False, True, False, False]),
                                [-3, 2, -1, 2])
  # Censored at c against an observed c: the censored one is later.
  np.testing.assert_array_equal(sig.gehan_scores([5, 5], [True, False]), [1, -1])
  assert sig.gehan_scores([7, 7], [True, True]).tolist() == [0, 0]
  with pytest.raises(ValueError, match="NaN"):
    sig.gehan_scores([1.0, float("nan")])


def _brute_force_rank_p(x, y):
  pooled = np.r_[x, y]
  ranks, n, k = sps.rankdata(pooled), len(pooled), len(x)
  centre = k * (n + 1) / 2
  observed = abs(ranks[:k].sum() - centre)
  hits = [abs(ranks[list(c)].sum() - centre) >= observed - 1e-9
          for c in itertools.combinations(range(n), k)]
  return float(np.mean(hits))


def test_location_matches_scipy_and_brute_force():
  rng = np.random.default_rng(0)
  for _ in range(20):
    n1, n2 = rng.integers(2, 7, 2)
    x, y = rng.normal(size=n1), rng.normal(0.8, size=n2)       # no ties
    assert sig.location_test(x, y).p == pytest.approx(
        sps.mannwhitneyu(x, y, method="exact").pvalue, rel=1e-12)
    xi, yi = rng.integers(0, 5, n1), rng.integers(1, 7, n2)     # ties
    assert sig.location_test(xi, yi).p == pytest.approx(_brute_force_rank_p(xi, yi), rel=1e-12)


def _brute_force_bf_p(x, y):
  z = np.r_[np.abs(x - np.median(x)), np.abs(y - np.median(y))]
  k = len(x)
  observed = sps.f_oneway(z[:k], z[k:]).statistic
  ws = []
  for c in itertools.combinations(range(len(z)), k):
    mask = np.zeros(len(z), bool)
    mask[list(c)] = True
    ws.append(sps.f_oneway(z[mask], z[~mask]).statistic)
  return float(np.mean(np.asarray(ws) >= observed * (1 - 1e-9)))


def test_spread_matches_scipy_levene_and_brute_force():
  rng = np.random.default_rng(1)
  for n1, n2, scale in ((5, 5, 4.0), (3, 3, 1.0), (4, 6, 3.0), (5, 4, 0.3), (2, 3, 2.0)):
    x, y = rng.normal(size=n1), rng.normal(scale=scale, size=n2)
    res = sig.spread_test(x, y)
    ref = sps.levene(x, y, center="median")
    assert res.statistic == pytest.approx(ref.statistic, rel=1e-9)
    assert res.p_approx == pytest.approx(ref.pvalue, rel=1e-9)
    assert res.p == pytest.approx(_brute_force_bf_p(x, y), rel=1e-12)
    assert res.p_min <= res.p and res.relabellings == math.comb(n1 + n2, n1)
    z = (np.abs(x - np.median(x)).mean(), np.abs(y - np.median(y)).mean())
    assert res.direction == ("<" if z[0] < z[1] else ">")


def test_spread_known_answers():
  # A shift only: the deviations are identical, W = 0, p = 1 (scipy agrees).
  res = sig.spread_test([1, 2, 3, 4, 5], [11, 12, 13, 14, 15])
  assert (res.statistic, res.p, res.direction) == (0.0, 1.0, "=")
  assert sps.levene([1, 2, 3, 4, 5], [11, 12, 13, 14, 15], center="median").pvalue == \
      pytest.approx(1.0)
  # Five times the spread: deviations {0, 1, 1, 2, 2} against {0, 5, 5, 10, 10}. The two
  # structural zeros (odd n) tie, so the floor is 4/252, and W_obs is the 12th largest of 252.
  res = sig.spread_test([1, 2, 3, 4, 5], [0, 5, 10, 15, 20])
  assert res.direction == "<" and res.p_min == pytest.approx(4 / 252)
  assert res.p == pytest.approx(12 / 252)
  assert res.statistic == pytest.approx(
      sps.levene([1, 2, 3, 4, 5], [0, 5, 10, 15, 20], center="median").statistic)
  # No spread at all in either group: W = 0 (scipy: NaN), p = 1.
  assert sig.spread_test([2, 2, 2], [7, 7, 7]).p == 1.0
  # Deviations all zero in one group and constant in the other: W = inf, the extreme split.
  res = sig.spread_test([1, 1, 2, 2], [0, 0, 10, 10])
  assert res.statistic == math.inf and res.p == pytest.approx(2 / 70) and res.p_approx == 0.0
  with pytest.raises(ValueError, match="at least two values per group"):
    sig.spread_test([1.0], [1.0, 2.0])
  with pytest.raises(ValueError, match="finite"):
    sig.spread_test([1.0, math.inf], [1.0, 2.0])


@pytest.mark.parametrize("df", list(range(1, 31)) + [57])
def test_student_t_two_sided(df):
  for t in (0.0, 0.3, 1.0, 1.7, 2.5, 4.0, 10.0, -2.0):
    assert sig.student_t_two_sided(t, df) == pytest.approx(2 * sps.t.sf(abs(t), df),
                                                           rel=1e-9, abs=1e-14)
  assert sig.student_t_two_sided(math.inf, df) == 0.0


def test_student_t_rejects_non_integer_df():
  with pytest.raises(ValueError, match="positive integer"):
    sig.student_t_two_sided(1.0, 0)
  with pytest.raises(ValueError, match="positive integer"):
    sig.student_t_two_sided(1.0, 2.5)


def test_holm():
  assert sig.holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])
  assert sig.holm([P_5V5] * 5) == pytest.approx([5 * P_5V5] * 5)
  assert sig.holm([0.5, 0.9]) == [1.0, 1.0]
  assert sig.holm([]) == [] and sig.holm([None]) == [None]


def test_relabellings_exact_and_monte_carlo(monkeypatch):
  idx, exact = sig.relabellings(5, 2)
  assert exact and idx.tolist()[0] == [0, 1] and len(idx) == 10
  assert len({tuple(r) for r in idx.tolist()}) == 10
  x, y = [3, 3, 4, 4, 5, 6], [5, 8, 9, 9, 10, 11]
  exact_p = sig.location_test(x, y).p
  monkeypatch.setattr(sig, "MAX_EXACT", 100)
  monkeypatch.setattr(sig, "MONTE_CARLO", 20_000)
  res = sig.location_test(x, y)
  assert not res.exact and res.relabellings == 20_000
  assert res.p == pytest.approx(exact_p, abs=0.005)
  assert res.p_min == pytest.approx(1 / 20_001)
  assert sig.location_test(x, y).p == res.p          # seeded: reproducible


def test_bad_inputs():
  with pytest.raises(ValueError, match="at least one value per group"):
    sig.location_test([], [1.0])
  with pytest.raises(ValueError, match="censoring flags"):
    sig.location_test([1.0, 2.0], [3.0], x_censored=[True])
