r"""Matmul-only polar factor and Lyapunov solve: scaled Newton–Schulz with a fixed schedule.

Why. On a GPU every SVD, eigendecomposition or QR is a cuSOLVER call: it cannot sit
inside a CUDA graph, launches many small kernels and synchronises with the host; for
the nearest-ETF problem (K×K and d×K matrices) that latency, not arithmetic, set the
solver's time (BUILD_NOTES §5.4). A ``while_loop`` whose trip count depends on data
costs a device→host copy of its predicate per iteration on a GPU. The iterations here
use only matrix products (``Precision.HIGHEST``) and elementwise scalings, unrolled
for a number of steps fixed at trace time, with no loop and no conditional: the whole
solve compiles into one straight sequence of kernels (one CUDA graph). Convergence is
not looped for but *certified*: each function returns the residual of its last
iterate, which the caller checks where it already reads results (the training step
counts unconverged solves into its metrics).

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
constants; one classical step (α = 1) follows and takes the residual from
:math:`\sqrt\varepsilon` to :math:`\sim\varepsilon`.

Matrix iterations. Because :math:`f` is odd,

* polar factor: :math:`X_{k+1} = X_kM_k`, :math:`M_k = \tfrac12\alpha_k(3I -
  \alpha_k^2X_k^TX_k)`, applies :math:`f` to the singular values of :math:`X_0 = B/s`
  and keeps its singular vectors, so :math:`X_n \to UV^T = \mathrm{polar}(B)`. Every
  :math:`M_k` is a polynomial in :math:`B^TB`, so :math:`Q_n = s^{-1}\prod_k M_k`
  satisfies :math:`X_n = BQ_n` and converges to :math:`(B^TB)^{-1/2} = S^{-1}`
  (:math:`S = P^TB`): the inverse the implicit backward needs, at one K×K product per
  step (:math:`X` and :math:`Q` are stacked into one :math:`(d+K)\times K` operand).
* Lyapunov equation :math:`SY + YS = C` (S symmetric positive definite): the same
  step applied to the block matrix :math:`Z = \begin{pmatrix}S & C\\ 0 & -S\end{pmatrix}/s`
  converges to :math:`\mathrm{sign}(Z) = \begin{pmatrix}I & 2Y\\ 0 & -I\end{pmatrix}`
  (Roberts 1980). With :math:`Z_k = \begin{pmatrix}S_k & X_k\\ 0 & -S_k\end{pmatrix}`
  and :math:`W_k = 3I - \alpha_k^2S_k^2`, the step is
  :math:`S_{k+1} = \tfrac12\alpha_kS_kW_k`,
  :math:`X_{k+1} = \tfrac12\alpha_k\,(X_kW_k - \alpha_k^2S_k(S_kX_k - X_kS_k))`,
  computed as two products per step: :math:`S_k[S_k\,|\,X_k\,|\,X_k^T]` (which holds
  :math:`S_k^2`, :math:`S_kX_k` and :math:`X_kS_k = (S_kX_k^T)^T`), then
  :math:`[S_k; X_k][W_k\,|\,C_k]`.

Scale. :math:`s` is an upper bound of the spectral norm (:math:`\|B\|_2^2 =
\|B^TB\|_2 \le \min(\|B\|_F^2, \|B^TB\|_1)`; for symmetric S, :math:`\|S\|_2 \le
\min(\|S\|_F, \|S\|_1)`), so the spectrum of the scaled matrix lies in
:math:`(0, 1]`, and the ``lower`` bound is meant relative to it. The solver's backward
passes the forward's :math:`s`: :math:`S = P^TB` has B's singular values as
eigenvalues, so the Lyapunov iteration then runs the very scalar recurrence the forward
ran, and the forward's residual certifies both.

Certificate. With :math:`r = \max|X^TX - I|` of the iterate the final classical step
is applied to, the final iterate's singular values are within :math:`\approx\tfrac34r^2`
of 1: :math:`r \le \sqrt\varepsilon` (:data:`converged`) means converged to rounding.
A ``lower`` bound that does not hold (a singular value below it) leaves such a value
behind, and :math:`r` shows it. Accuracy (BUILD_NOTES §2b): the polar factor agrees
with float64 to :math:`O(\kappa\varepsilon)` like a float32 SVD; the solver's
Lyapunov-based backward (with one Newton refinement of :math:`S^{-1}`) is level with
the eigendecomposition-based one for the cotangents training produces.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nc_jax import _validation as v
from nc_jax._linalg import mm, mtm, sym


class Polar(NamedTuple):
  """Result of :func:`polar`.

  Attributes:
    factor: ``(d, K)`` the polar factor :math:`UV^T` (orthonormal columns).
    inverse_root: ``(K, K)`` :math:`(B^TB)^{-1/2} = S^{-1}`, accumulated alongside.
    scale: ``()`` the scale :math:`s \\ge \\|B\\|_2` the iteration started from (B/s).
    residual: ``()`` :math:`\\max|X^TX - I|` before the final classical step.
    steps: ``()`` int32, Newton–Schulz steps taken (a trace-time constant).
  """
  factor: jax.Array
  inverse_root: jax.Array
  scale: jax.Array
  residual: jax.Array
  steps: jax.Array


class Lyapunov(NamedTuple):
  """Result of :func:`lyapunov`.

  Attributes:
    solution: ``(..., K, K)`` Y with :math:`SY + YS = C`.
    residual: ``()`` :math:`\\max|S_k - I|` of the scaled S iterate before the final step.
    steps: ``()`` int32, steps taken (a trace-time constant).
  """
  solution: jax.Array
  residual: jax.Array
  steps: jax.Array


def tolerance(dtype) -> float:
  r"""Convergence threshold of the residuals: :math:`\sqrt\varepsilon` of ``dtype``."""
  return math.sqrt(float(jnp.finfo(dtype).eps))


def converged(residual: jax.Array) -> jax.Array:
  """True where a :class:`Polar`/:class:`Lyapunov` residual certifies convergence
  (at most :func:`tolerance`; NaN is not converged)."""
  return residual <= tolerance(residual.dtype)


ALPHA_CAP = 1.5
"""Largest scaling factor used (module docstring, "Accuracy"): values near 1 are never
mapped below :math:`f_{1.5}(1) = 0.5625`, at a growth of 2.25 (not 2.6) per step for small
values."""


def schedule(lower: float, dtype, cap: float = ALPHA_CAP) -> tuple[float, ...]:
  r"""The scaling factors :math:`\alpha_k` that take :math:`[\ell, 1]` to within
  :math:`\sqrt{\varepsilon}/4` of 1 (see module docstring).

  :math:`\alpha_k = \min(\sqrt{3/(1+\ell_k+\ell_k^2)},\ \mathrm{cap})` and
  :math:`\ell_{k+1} = \min(f_{\alpha_k}(\ell_k), f_{\alpha_k}(1))`, the smallest value
  of :math:`f_{\alpha_k}` on :math:`[\ell_k, 1]` (its maximum there is 1, at
  :math:`1/\alpha_k`).

  Args:
    lower: :math:`\ell \in (0, 1]`, a lower bound of the scaled spectrum.
    dtype: floating dtype whose machine epsilon sets the stopping point.
    cap: largest α, in :math:`[1, \sqrt3]` (:data:`ALPHA_CAP`; √3 is Chen & Chow's
      uncapped schedule).

  Returns:
    Tuple of Python floats :math:`\alpha_0 \ge \alpha_1 \ge \dots \ge 1`, empty when
    :math:`\ell` is already within the tolerance.
  """
  if not 0 < lower <= 1:
    raise ValueError(f"lower: expected a bound in (0, 1], got {lower!r}")
  if not 1.0 <= cap <= math.sqrt(3.0):
    raise ValueError(f"cap: expected a scaling factor in [1, sqrt(3)], got {cap!r}")
  f = lambda alpha, x: 0.5 * alpha * x * (3.0 - alpha * alpha * x * x)
  tol = tolerance(dtype) / 4
  alphas = []
  ell = float(lower)
  while 1.0 - ell > tol:
    alpha = min(math.sqrt(3.0 / (1.0 + ell + ell * ell)), cap)
    alphas.append(alpha)
    ell = min(f(alpha, ell), f(alpha, 1.0))
  return tuple(alphas)


def _residual(a):
  """max |A − I| of the trailing square matrix (over any leading axes)."""
  k = a.shape[-1]
  return jnp.max(jnp.abs(a - jnp.eye(k, dtype=a.dtype)))


def polar(b: jax.Array, lower: float, *, scale: jax.Array | None = None) -> Polar:
  r"""Polar factor :math:`UV^T` of :math:`B = U\Sigma V^T` by matrix products only.

  Args:
    b: ``(d, K)`` with ``d >= K``, full column rank.
    lower: static lower bound of :math:`\sigma_{min}(B)/s`; it sizes the unrolled
      schedule. A bound that does not hold shows in the residual, never silently.
    scale: optional ``()`` :math:`s \ge \|B\|_2`; default
      :math:`\sqrt{\min(\|B^TB\|_{tr}, \|B^TB\|_1)}`.

  Returns:
    :class:`Polar`. ``converged(result.residual)`` certifies the result.
  """
  if b.ndim != 2 or b.shape[0] < b.shape[1]:
    raise ValueError(f"b: expected a (d, K) matrix with d >= K, got shape {tuple(b.shape)}")
  v.check_finite("b", b)
  if v.is_concrete(b) and not bool(jnp.any(b != 0)):
    raise ValueError("b: expected a full-column-rank matrix, got all zeros")
  d, k = b.shape
  dtype = b.dtype
  eye = jnp.eye(k, dtype=dtype)
  gram = mtm(b, b)
  if scale is None:
    scale = jnp.sqrt(jnp.minimum(jnp.trace(gram), jnp.max(jnp.sum(jnp.abs(gram), axis=0))))
  # One operand for the iterate X (rows :d) and the accumulated inverse root Q (rows d:),
  # so each step is one Gram product and one product with M_k.
  y = jnp.concatenate([b, eye], axis=0) / scale
  alphas = schedule(lower, dtype) + (1.0,)
  residual = jnp.zeros((), dtype)
  for i, alpha in enumerate(alphas):
    g = gram / (scale * scale) if i == 0 else mtm(y[:d], y[:d])
    if i == len(alphas) - 1:
      residual = _residual(g)
    # Y·M_k as Y + Y·(M_k − I): near convergence the product is a small correction, so
    # its rounding no longer touches the O(1) entries of Y.
    y = y + mm(y, ((1.5 * alpha) - 1.0) * eye - (0.5 * alpha ** 3) * g)
  return Polar(y[:d], y[d:], scale, residual, jnp.asarray(len(alphas), jnp.int32))


def _sign_step(s, x, alpha):
  r"""One scaled Newton–Schulz step of the block sign iteration (module docstring).

  ``s``: ``(K, K)`` symmetric; ``x``: ``(n, K, K)``, n right-hand sides. Two products:
  :math:`S[S\,|\,X_i\,|\,X_i^T]`, then :math:`[S; X_i][M - I\,|\,C_i]` with
  :math:`M = \tfrac12\alpha W` and the commutators :math:`C_i = SX_i - X_iS`; updates are
  added as corrections (:math:`S + S(M - I)`), as in :func:`polar`.
  """
  n, k = x.shape[0], s.shape[-1]
  eye = jnp.eye(k, dtype=s.dtype)
  flat = lambda a: jnp.moveaxis(a, 0, 1).reshape(k, n * k)        # (n, K, K) → [A_1 | … | A_n]
  unflat = lambda a: jnp.moveaxis(a.reshape(k, n, k), 1, 0)
  r1 = mm(s, jnp.concatenate([s, flat(x), flat(jnp.swapaxes(x, -1, -2))], axis=1))
  s2, sx, xs = r1[:, :k], unflat(r1[:, k:k + n * k]), unflat(r1[:, k + n * k:])
  xs = jnp.swapaxes(xs, -1, -2)                                    # X_iS = (SX_iᵀ)ᵀ
  m_minus_eye = (1.5 * alpha - 1.0) * eye - (0.5 * alpha ** 3) * sym(s2)
  lhs = jnp.concatenate([s, x.reshape(n * k, k)], axis=0)          # [S; X_1; …; X_n]
  r2 = mm(lhs, jnp.concatenate([m_minus_eye, flat(sx - xs)], axis=1))
  s_next = sym(s + r2[:k, :k])
  sc = unflat(r2[:k, k:])
  x_next = x + r2[k:, :k].reshape(n, k, k) - (0.5 * alpha ** 3) * sc
  return s_next, x_next


def lyapunov(s: jax.Array, c: jax.Array, lower: float, *,
             scale: jax.Array | None = None) -> Lyapunov:
  r"""Solves :math:`SY + YS = C` for symmetric positive definite S, products only.

  Args:
    s: ``(K, K)`` symmetric positive definite.
    c: ``(..., K, K)`` right-hand sides (leading axes batch them; they share the
      S iterates).
    lower: static lower bound of :math:`\lambda_{min}(S)/s` (as in :func:`polar`).
    scale: optional ``()`` :math:`s \ge \|S\|_2`; default :math:`\min(\|S\|_F, \|S\|_1)`.

  Returns:
    :class:`Lyapunov`. With :math:`C = 2I`, :math:`Y = S^{-1}`.
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
  if scale is None:
    scale = jnp.minimum(jnp.linalg.norm(s), jnp.max(jnp.sum(jnp.abs(s), axis=0)))
  batch = c.shape[:-2]
  state = (sym(s) / scale, c.reshape(-1, k, k) / scale)
  alphas = schedule(lower, dtype) + (1.0,)
  residual = jnp.zeros((), dtype)
  for i, alpha in enumerate(alphas):
    if i == len(alphas) - 1:
      residual = _residual(state[0])
    state = _sign_step(*state, alpha)
  return Lyapunov(0.5 * state[1].reshape(*batch, k, k), residual,
                  jnp.asarray(len(alphas), jnp.int32))
