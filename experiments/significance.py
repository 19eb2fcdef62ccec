"""Two-sample tests for a handful of seeds: exact permutation tests of location and spread.

The multi-seed report (:mod:`experiments.report`) compares methods across seeds
(the paper reports 5 per method; we often have 3–5). With so few values per
group, asymptotic tests (normal-approximated Mann–Whitney, t, F) are not to be
trusted, while an exact permutation test is: under the null hypothesis that the
method labels are exchangeable, every one of the C(n1 + n2, n1) relabellings of
the pooled seeds is equally likely, so the p-value is the fraction of
relabellings whose statistic is at least as extreme as the observed one — no
distributional assumption, and the observed labelling counts, so p ≥ 1/C.

The price, stated in every report legend: the smallest attainable two-sided p
is 2 / C(n1 + n2, n1) without ties (:func:`smallest_p`): 2/252 = 0.0079 for
5 vs 5, 2/70 = 0.029 for 4 vs 4, 2/20 = 0.1 for 3 vs 3 — with 3 seeds per
method *nothing* can be significant at 0.05, and "not significant" then says
nothing about the effect. Ties change the floor (mostly raising it; with
unequal groups a tie pattern can make one extreme unique, e.g. 1/C), so each
test reports its own (``p_min``: the fraction of relabellings as extreme as the
most extreme one, given the observed ties).

Location — :func:`location_test`. The statistic is the sum, over the first
group, of **Gehan scores**: for each value, the number of pooled values it is
certainly larger than minus the number it is certainly smaller than. Without
censoring the score is 2·(mid-rank) − (N + 1), so the test is the exact
two-sided Mann–Whitney (Wilcoxon rank-sum) test with ties at mid-ranks:
invariant to monotone transformations (epochs, NC1 on a log scale alike) and
robust to one odd seed, which a difference of means is not.

Censoring. A run that never meets a convergence criterion within its epochs
is right-censored: its time is only known to exceed ``c``, the last epoch at
which the criterion was checked. Gehan's comparison of such a value with an
observed time ``t`` is "larger" when ``c ≥ t`` and undecided (0) otherwise; two
censored values are undecided (tied). When every run has the same budget of
epochs (the usual case: a common censoring time after every observed value)
this is exactly treating "not reached" as +∞, tied among themselves beyond
every observed epoch, i.e. Mann–Whitney on the censored ranks. The permutation
test is exact under the assumption that censoring does not depend on the
method (the same epoch budget for both; an unfinished run with a shorter
budget in one group only makes it approximate).

Spread — :func:`spread_test`. The Brown–Forsythe test (Levene's test with
deviations from the group **medians**, robust to skewed and outlying seeds):
the statistic ``W`` is the one-way ANOVA F of ``z = |x − median(group)|``, as
``scipy.stats.levene(..., center="median")`` computes it. Its usual p-value
refers ``W`` to F(1, N − 2), which assumes normal deviations — not credible for
3–5 half-normal-ish deviations — so the primary p-value is again a permutation
one: all relabellings of the pooled deviations (Good's permutation version of
Levene's test; exchangeability of centred deviations under equal spread is
approximate, the centring by each group's own median being the usual price). The
F-approximation is returned too (``p_approx``, equal to scipy's p-value).

Multiplicity: :func:`holm` gives Holm's step-down adjusted p-values for a
family of tests (the report applies it to the comparisons made on one quantity).

Relabellings are enumerated exactly up to :data:`MAX_EXACT` (10 vs 10 is
184,756); beyond that a seeded Monte-Carlo sample of :data:`MONTE_CARLO`
relabellings is used, with p = (1 + hits) / (1 + R) and a floor 1 / (1 + R).
Only numpy and the standard library are needed.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Sequence

import numpy as np

#: Relabellings enumerated exactly up to this many (C(20, 10) = 184,756 fits).
MAX_EXACT = 200_000
#: Monte-Carlo relabellings beyond :data:`MAX_EXACT` (seeded: reports are reproducible).
MONTE_CARLO = 100_000
# Relative tolerance for "at least as extreme" with float statistics (the spread test).
_RTOL = 1e-9


@dataclasses.dataclass(frozen=True)
class TestResult:
  """One two-sample test (first group ``x`` against second group ``y``).

  Attributes:
    statistic: the observed statistic (location: sum of the Gehan scores of
      ``x``, 0 when the groups do not differ; spread: Brown–Forsythe ``W``).
    p: two-sided permutation p-value.
    p_min: smallest p-value attainable with these group sizes and ties
      (the fraction of relabellings that reach the most extreme statistic).
    direction: ``"<"`` if ``x`` tends lower than ``y`` (location: smaller ranks;
      spread: smaller mean absolute deviation from the median), ``">"`` if
      higher, ``"="`` if neither.
    n_x, n_y: values in each group (censored ones included).
    censored_x, censored_y: how many of them are censored.
    relabellings: relabellings the p-value is taken over.
    exact: whether they are all C(n_x + n_y, n_x) of them (else Monte Carlo).
    p_approx: the spread test's F(1, N − 2) approximation (scipy's
      ``levene(center="median")`` p-value); ``None`` for the location test.
  """
  statistic: float
  p: float
  p_min: float
  direction: str
  n_x: int
  n_y: int
  censored_x: int = 0
  censored_y: int = 0
  relabellings: int = 0
  exact: bool = True
  p_approx: float | None = None


def smallest_p(n_x: int, n_y: int) -> float:
  """Smallest two-sided p-value of an exact permutation test without ties: 2 / C(n_x + n_y, n_x).

  At most 1 (one value per group gives 1). E.g. 0.0079 for 5 vs 5, 0.1 for 3 vs 3.
  """
  if n_x < 1 or n_y < 1:
    raise ValueError(f"need at least one value per group, got {n_x} and {n_y}")
  return min(1.0, 2.0 / math.comb(n_x + n_y, n_x))


def relabellings(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, bool]:
  """Index sets of the first group among ``n`` pooled values, ``k`` in it: ``(idx, exact)``.

  ``idx`` has shape ``(R, k)``. All ``C(n, k)`` combinations in lexicographic order
  (the first row is ``0..k-1``, the observed labelling when the first group is
  pooled first) when there are at most :data:`MAX_EXACT`, else :data:`MONTE_CARLO`
  random ones (``rng(seed)``; the observed labelling is not among them). Cached
  (a report runs hundreds of tests on the same group sizes); ``idx`` is read-only.
  """
  return _relabellings(n, k, seed, MAX_EXACT, MONTE_CARLO)


@functools.lru_cache(maxsize=32)
def _relabellings(n: int, k: int, seed: int, max_exact: int,
                  monte_carlo: int) -> tuple[np.ndarray, bool]:
  if math.comb(n, k) <= max_exact:
    idx = np.fromiter(itertools.chain.from_iterable(itertools.combinations(range(n), k)),
                      dtype=np.intp, count=math.comb(n, k) * k).reshape(-1, k)
    exact = True
  else:
    rng = np.random.default_rng(seed)
    idx, exact = np.argsort(rng.random((monte_carlo, n)), axis=1)[:, :k], False
  idx.flags.writeable = False
  return idx, exact


def gehan_scores(values: Sequence[float], censored: Sequence[bool] | None = None) -> np.ndarray:
  """Gehan scores of pooled, possibly right-censored values (integers summing to 0).

  Score of ``i`` = #{j: i certainly > j} − #{j: i certainly < j}. An observed
  value is certainly larger than a smaller observed one; a value censored at
  ``c`` (true value > ``c``) is certainly larger than an observed ``t ≤ c``; every
  other comparison (equal observed values, two censored values, a censored ``c``
  against an observed ``t > c``) is undecided. Without censoring this is
  ``2·midrank − (N + 1)``.
  """
  v = np.asarray(values, dtype=np.float64)
  cens = np.zeros(v.shape, bool) if censored is None else np.asarray(censored, dtype=bool)
  if v.shape != cens.shape or v.ndim != 1:
    raise ValueError("values and censored must be 1-d and of the same length")
  if np.isnan(v).any():
    raise ValueError("values must not be NaN (leave missing values out)")
  vi, vj = v[:, None], v[None, :]
  ci, cj = cens[:, None], cens[None, :]
  greater = (~ci & ~cj & (vi > vj)) | (ci & ~cj & (vi >= vj))
  return greater.sum(1).astype(np.int64) - greater.sum(0).astype(np.int64)


def _split(x: Sequence[float], y: Sequence[float], x_censored, y_censored):
  x = [float(v) for v in x]
  y = [float(v) for v in y]
  cx = [False] * len(x) if x_censored is None else [bool(c) for c in x_censored]
  cy = [False] * len(y) if y_censored is None else [bool(c) for c in y_censored]
  if len(cx) != len(x) or len(cy) != len(y):
    raise ValueError("censoring flags must match the values")
  if not x or not y:
    raise ValueError(f"need at least one value per group, got {len(x)} and {len(y)}")
  return x, y, cx, cy


def location_test(x: Sequence[float], y: Sequence[float],
                  x_censored: Sequence[bool] | None = None,
                  y_censored: Sequence[bool] | None = None, seed: int = 0) -> TestResult:
  """Exact two-sided permutation test of location on Gehan scores (censored Mann–Whitney).

  Args:
    x, y: the two groups' values (e.g. epochs to a criterion, one per seed); a
      censored entry holds its censoring time (the last epoch checked).
    x_censored, y_censored: which entries are right-censored (default: none).
    seed: Monte-Carlo seed, used only beyond :data:`MAX_EXACT` relabellings.

  Returns:
    :class:`TestResult`; ``statistic`` = sum of the Gehan scores of ``x``
    (negative: ``x`` tends lower, e.g. converges earlier), ``p`` = fraction of
    relabellings with ``|S| ≥ |S_obs|``. Identical groups give p = 1; complete
    separation gives ``p = smallest_p(n_x, n_y)``.
  """
  x, y, cx, cy = _split(x, y, x_censored, y_censored)
  scores = gehan_scores(x + y, cx + cy)
  n, k = len(scores), len(x)
  observed = int(scores[:k].sum())
  idx, exact = relabellings(n, k, seed)
  sums = np.abs(scores[idx].sum(1))          # integers: "as extreme" is exact
  return TestResult(
      statistic=float(observed), p=_p_value(int(np.sum(sums >= abs(observed))), len(sums), exact),
      p_min=_p_value(int(np.sum(sums >= sums.max())) if exact else 0, len(sums), exact),
      direction="<" if observed < 0 else ">" if observed > 0 else "=",
      n_x=k, n_y=n - k, censored_x=sum(cx), censored_y=sum(cy), relabellings=len(sums),
      exact=exact)


def _p_value(hits: int, total: int, exact: bool) -> float:
  # Exact: the observed labelling is one of the rows. Monte Carlo: it is added (+1).
  return hits / total if exact else (hits + 1) / (total + 1)


def _bf_statistic(z: np.ndarray, idx: np.ndarray) -> np.ndarray:
  """Brown–Forsythe ``W`` (two groups) of deviations ``z`` for each index set of group 1.

  ``W = (N − 2) · Σ n_g (m_g − m)² / Σ_g Σ (z − m_g)²``; ``inf`` when the
  within-group sum is 0 and the between-group one is not, 0 when both are 0.
  """
  n, k = len(z), idx.shape[1]
  s1 = z[idx].sum(1)
  q1 = (z[idx] ** 2).sum(1)
  s2, q2 = z.sum() - s1, (z ** 2).sum() - q1
  m1, m2, m = s1 / k, s2 / (n - k), z.mean()
  between = k * (m1 - m) ** 2 + (n - k) * (m2 - m) ** 2
  within = np.maximum((q1 - k * m1 ** 2) + (q2 - (n - k) * m2 ** 2), 0.0)
  # Cancellation leaves ~1e-16 relative noise in place of an exact zero.
  tiny = 1e-12 * max(float((z ** 2).sum()), np.finfo(np.float64).tiny)
  zero_within = within <= tiny
  with np.errstate(divide="ignore", invalid="ignore"):
    w = (n - 2) * between / np.where(zero_within, 1.0, within)
  return np.where(zero_within, np.where(between > tiny, np.inf, 0.0), w)


def student_t_two_sided(t: float, df: int) -> float:
  """``P(|T| ≥ |t|)`` for Student's t with integer ``df ≥ 1`` (closed form, A&S 26.7.3–4)."""
  if df < 1 or int(df) != df:
    raise ValueError(f"df must be a positive integer, got {df}")
  if math.isinf(t):
    return 0.0
  theta = math.atan(abs(t) / math.sqrt(df))
  s, c = math.sin(theta), math.cos(theta)
  if df % 2:          # A = (2/π)[θ + sin θ (cos θ + (2/3) cos³θ + ...)], df − 2 in the last power
    term, total = c, (c if df > 1 else 0.0)
    for j in range(3, df - 1, 2):
      term *= (j - 1) / j * c * c
      total += term
    a = 2.0 / math.pi * (theta + s * total)
  else:               # A = sin θ [1 + (1/2) cos²θ + (1·3)/(2·4) cos⁴θ + ...]
    term = total = 1.0
    for j in range(2, df - 1, 2):
      term *= (j - 1) / j * c * c
      total += term
    a = s * total
  return min(1.0, max(0.0, 1.0 - a))


def spread_test(x: Sequence[float], y: Sequence[float], seed: int = 0) -> TestResult:
  """Brown–Forsythe test of equal spread, p-value by permutation of the deviations.

  ``z = |value − median of its group|``; ``W`` as ``scipy.stats.levene(x, y,
  center="median").statistic``; ``p`` = fraction of relabellings of the pooled
  ``z`` with ``W ≥ W_obs`` (relative tolerance 1e-9); ``p_approx`` = the
  F(1, N − 2) tail of ``W`` (scipy's p-value). Needs two values per group.
  ``direction`` compares the mean absolute deviations (``"<"``: ``x`` less spread).
  """
  x, y, _, _ = _split(x, y, None, None)
  if len(x) < 2 or len(y) < 2:
    raise ValueError(f"need at least two values per group, got {len(x)} and {len(y)}")
  if any(math.isnan(v) or math.isinf(v) for v in x + y):
    raise ValueError("values must be finite")
  zx = np.abs(np.asarray(x) - np.median(x))
  zy = np.abs(np.asarray(y) - np.median(y))
  z = np.concatenate([zx, zy])
  n, k = len(z), len(x)
  idx, exact = relabellings(n, k, seed)
  ws = _bf_statistic(z, idx)
  observed = float(_bf_statistic(z, np.arange(k)[None, :])[0])
  hits = int(np.sum(ws >= observed * (1 - _RTOL)))
  top = ws.max()
  diff = zx.mean() - zy.mean()
  scale = max(zx.mean(), zy.mean(), np.finfo(np.float64).tiny)
  return TestResult(
      statistic=observed, p=_p_value(hits, len(ws), exact),
      p_min=_p_value(int(np.sum(ws >= top * (1 - _RTOL))) if exact else 0, len(ws), exact),
      direction="=" if abs(diff) <= 1e-12 * scale else "<" if diff < 0 else ">",
      n_x=k, n_y=n - k, relabellings=len(ws), exact=exact,
      p_approx=student_t_two_sided(math.sqrt(observed), n - 2))


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
  """Holm's step-down adjusted p-values (``None`` entries are skipped and stay ``None``).

  For the m tests present, sorted ascending: ``p_(i) · (m − i + 1)``, made
  non-decreasing, capped at 1. Rejecting where the adjusted p < α controls
  the family-wise error rate at α.
  """
  present = [(p, i) for i, p in enumerate(pvalues) if p is not None]
  out: list[float | None] = [None] * len(pvalues)
  running = 0.0
  for rank, (p, i) in enumerate(sorted(present)):
    running = max(running, min(1.0, p * (len(present) - rank)))
    out[i] = running
  return out
