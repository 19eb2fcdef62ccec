r"""Matmul-only polar factor and Lyapunov solve: scaled Newton–Schulz iterations.

Why. On a GPU every SVD, eigendecomposition or QR is a cuSOLVER call that launches
many small kernels and synchronises with the host; for the nearest-ETF problem
(K×K and d×K matrices with K ≤ 1000) their latency, not their arithmetic, set the
solver's time (BUILD_NOTES §5.4). The iterations here use only matrix products
(``Precision.HIGHEST``) and elementwise scalings, unrolled for a fixed number of
steps chosen at trace time, plus one convergence check.

Scalar map. For singular values (or eigenvalues) in :math:`[\ell, 1]`, the scaled
Newton–Schulz step of Chen & Chow (2014, "A stable scaling of Newton–Schulz for
improving the sign function computation of a Hermitian matrix")

.. math::
   f_\alpha(x) = \tfrac12\,\alpha x\,(3 - \alpha^2x^2), \qquad
   \alpha = \sqrt{3/(1 + \ell + \ell^2)}

maps :math:`[\ell, 1]` onto :math:`[f_\alpha(\ell), 1]` (maximum 1 at
:math:`x = 1/\alpha`, and :math:`f_\alpha(\ell) = f_\alpha(1)`), so
:math:`\ell_{k+1} = f_{\alpha_k}(\ell_k)`. Small values grow by
:math:`\approx 1.5\sqrt3 \approx 2.6` per step instead of the classical 1.5, and
:math:`\alpha_k \to 1` recovers the quadratically convergent classical step near 1.
From :math:`\ell_0 = 10^{-3}` it reaches :math:`1 - \ell \le \sqrt{\varepsilon}/4`
in 10 steps (float32), from :math:`10^{-4}` in 13 (the classical step: 20 and 26).
:func:`schedule` precomputes the :math:`\alpha_k` in Python, so they are compile-time
constants.

Matrix iterations. Because :math:`f` is odd,

* polar factor: :math:`X_{k+1} = \tfrac12\alpha_kX_k(3I - \alpha_k^2X_k^TX_k)`
  applies :math:`f` to the singular values of :math:`X_0 = B/s` and keeps its
  singular vectors, so :math:`X_k \to UV^T = \mathrm{polar}(B)`;
* Lyapunov equation :math:`SY + YS = C` (S symmetric positive definite): the same
  step applied to the block matrix :math:`Z = \begin{pmatrix}S & C\\ 0 & -S\end{pmatrix}/s`
  converges to :math:`\mathrm{sign}(Z) = \begin{pmatrix}I & 2Y\\ 0 & -I\end{pmatrix}`
  (Roberts 1980). With :math:`Z_k = \begin{pmatrix}S_k & X_k\\ 0 & -S_k\end{pmatrix}`
  and :math:`W_k = 3I - \alpha_k^2S_k^2`, the step is
  :math:`S_{k+1} = \tfrac12\alpha_kS_kW_k`,
  :math:`X_{k+1} = \tfrac12\alpha_k\,(X_kW_k - \alpha_k^2S_k(S_kX_k - X_kS_k))`.
  Only K×K products; several right-hand sides share the S iterates.

Scale. :math:`s` is an upper bound of the spectral norm (:math:`\|B\|_2^2 =
\|B^TB\|_2 \le \min(\|B\|_F^2, \|B^TB\|_1)`; for symmetric S, :math:`\|S\|_2 \le
\min(\|S\|_F, \|S\|_1)`), so the spectrum of the scaled matrix lies in
:math:`(0, 1]`, and the ``lower`` bound is meant relative to it.

Exactness. ``lower`` only sizes the unrolled schedule; it is not trusted. After the
schedule a ``while_loop`` of classical steps runs until the residual is below
:math:`\sqrt\varepsilon` (zero iterations when the bound held; each step multiplies
values below the bound by ≥ 1.5), then one classical step takes the residual from
:math:`\sqrt\varepsilon` to :math:`\sim\varepsilon`. Accuracy (BUILD_NOTES §2b): the
polar factor agrees with float64 to :math:`O(\kappa\varepsilon)` like a float32 SVD;
the solver's Lyapunov-based backward (with one Newton refinement of :math:`S^{-1}`) is
level with the eigendecomposition-based one for the cotangents training produces.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from nc_jax import _validation as v
from nc_jax import stiefel
from nc_jax._linalg import mm, mtm

MAX_TAIL_ITERATIONS = 100
"""Cap of the classical tail: 1.5^100 ≈ 4e17 > 1/eps(float64), so any singular value above
rounding converges within it."""


def schedule(lower: float, dtype) -> tuple[float, ...]:
  r"""The scaling factors :math:`\alpha_k` that take :math:`[\ell, 1]` to within
  :math:`\sqrt{\varepsilon}/4` of 1 (see module docstring).

  Args:
    lower: :math:`\ell \in (0, 1]`, a lower bound of the scaled spectrum.
    dtype: floating dtype whose machine epsilon sets the stopping point.

  Returns:
    Tuple of Python floats :math:`\alpha_0 \ge \alpha_1 \ge \dots \ge 1`, empty when
    :math:`\ell` is already within the tolerance.
  """
  if not 0 < lower <= 1:
    raise ValueError(f"lower: expected a bound in (0, 1], got {lower!r}")
  tol = math.sqrt(float(jnp.finfo(dtype).eps)) / 4
  alphas = []
  ell = float(lower)
  while 1.0 - ell > tol:
    alpha = math.sqrt(3.0 / (1.0 + ell + ell * ell))
    alphas.append(alpha)
    ell = 0.5 * alpha * ell * (3.0 - alpha * alpha * ell * ell)
  return tuple(alphas)


def _polar_step(x, alpha, gram=None):
  k = x.shape[-1]
  if gram is None:
    gram = mtm(x, x)
  return mm(x, (0.5 * alpha) * (3.0 * jnp.eye(k, dtype=x.dtype) - (alpha * alpha) * gram))


def _residual(a):
  """max |A − I| of the trailing square matrix (over any leading axes)."""
  k = a.shape[-1]
  return jnp.max(jnp.abs(a - jnp.eye(k, dtype=a.dtype)))


def polar(b: jax.Array, lower: float) -> tuple[jax.Array, jax.Array]:
  r"""Polar factor :math:`UV^T` of :math:`B = U\Sigma V^T` by matrix products only.

  Args:
    b: ``(d, K)`` with ``d >= K``, full column rank.
    lower: static lower bound of :math:`\sigma_{min}(B)/\|B\|_F` used to size the
      unrolled schedule; an over-estimate costs tail iterations, never accuracy.

  Returns:
    ``(P (d, K), iterations)``: P with orthonormal columns and the int32 number
    of Newton–Schulz steps taken (schedule + tail + final).
  """
  if b.ndim != 2 or b.shape[0] < b.shape[1]:
    raise ValueError(f"b: expected a (d, K) matrix with d >= K, got shape {tuple(b.shape)}")
  v.check_finite("b", b)
  if v.is_concrete(b) and not bool(jnp.any(b != 0)):
    raise ValueError("b: expected a full-column-rank matrix, got all zeros")
  dtype = b.dtype
  alphas = schedule(lower, dtype)
  gram = mtm(b, b)
  scale_sq = jnp.minimum(jnp.trace(gram), jnp.max(jnp.sum(jnp.abs(gram), axis=0)))
  x = b / jnp.sqrt(scale_sq)
  for i, alpha in enumerate(alphas):
    # First step: XᵀX = BᵀB/s², already computed.
    x = _polar_step(x, alpha, gram / scale_sq if i == 0 else None)
  x, steps = orthonormalise(x)
  return x, jnp.asarray(len(alphas), jnp.int32) + steps


def orthonormalise(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  r"""Classical Newton–Schulz steps :math:`X(3I - X^TX)/2` to orthonormal columns.

  Steps while :math:`\max|X^TX - I| > \sqrt\varepsilon`, then one more. Converges
  to :math:`\mathrm{polar}(X)` for singular values in :math:`(0, \sqrt3)`, quickly
  when X is close to orthonormal (the end of :func:`polar`, or a factor computed
  from an inaccurate factorisation).

  Args:
    x: ``(d, K)``, ``d >= K``, full column rank, :math:`\|X\|_2 < \sqrt3`.

  Returns:
    ``(X, steps)``: orthonormal columns and the int32 number of steps.
  """
  step = stiefel.newton_schulz_step  # the classical step, α = 1
  x, tail = _tail(lambda x: _residual(mtm(x, x)), step, x, x.dtype)
  return step(x), tail + 1


def _sign_step(s, x, alpha):
  k = s.shape[-1]
  w = 3.0 * jnp.eye(k, dtype=s.dtype) - (alpha * alpha) * mm(s, s)
  commutator = mm(s, x) - mm(x, s)
  x = (0.5 * alpha) * (mm(x, w) - (alpha * alpha) * mm(s, commutator))
  return (0.5 * alpha) * mm(s, w), x


def lyapunov(s: jax.Array, c: jax.Array, lower: float) -> tuple[jax.Array, jax.Array]:
  r"""Solves :math:`SY + YS = C` for symmetric positive definite S, products only.

  Args:
    s: ``(K, K)`` symmetric positive definite.
    c: ``(..., K, K)`` right-hand sides (leading axes batch them; they share the
      S iterates).
    lower: static lower bound of :math:`\lambda_{min}(S)/\|S\|_F` (as in :func:`polar`).

  Returns:
    ``(Y (..., K, K), iterations)``. With :math:`C = 2I`, :math:`Y = S^{-1}`.
  """
  k = s.shape[-1]
  if s.ndim != 2 or s.shape[0] != k:
    raise ValueError(f"s: expected a square (K, K) matrix, got shape {tuple(s.shape)}")
  if c.ndim < 2 or c.shape[-2:] != (k, k):
    raise ValueError(f"c: expected shape (..., {k}, {k}), got {tuple(c.shape)}")
  v.check_finite("s", s)
  v.check_finite("c", c)
  if v.is_concrete(s) and not bool(jnp.any(s != 0)):
    raise ValueError("s: expected a positive definite matrix, got all zeros")
  dtype = s.dtype
  alphas = schedule(lower, dtype)
  scale = jnp.minimum(jnp.linalg.norm(s), jnp.max(jnp.sum(jnp.abs(s), axis=0)))
  state = (s / scale, c / scale)
  for alpha in alphas:
    state = _sign_step(*state, alpha)
  state, tail = _tail(lambda st: _residual(st[0]), lambda st: _sign_step(*st, 1.0), state, dtype)
  _, x = _sign_step(*state, 1.0)
  return 0.5 * x, jnp.asarray(len(alphas) + 1, jnp.int32) + tail


def _tail(residual, step, state, dtype):
  """Classical steps while ``residual(state) > sqrt(eps)``: zero when the schedule sufficed."""
  threshold = math.sqrt(float(jnp.finfo(dtype).eps))

  def cond(carry):
    state, n = carry
    return (residual(state) > threshold) & (n < MAX_TAIL_ITERATIONS)

  def body(carry):
    state, n = carry
    return step(state), n + 1

  return lax.while_loop(cond, body, (state, jnp.zeros((), jnp.int32)))
