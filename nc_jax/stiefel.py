r"""The Stiefel manifold :math:`St(d,K) = \{X \in \mathbb R^{d\times K} : X^TX = I_K\}`.

Embedded-submanifold geometry with the Euclidean metric:

* tangent space :math:`T_X = \{Z : X^TZ + Z^TX = 0\}`,
* orthogonal projection :math:`\Pi_X(Z) = Z - X\,\mathrm{sym}(X^TZ)`,
* Riemannian gradient :math:`\operatorname{grad} f(X) = \Pi_X(\nabla f(X))`,
* retractions: sign-fixed QR (pymanopt's default, used by the official code)
  and polar.

All functions accept leading batch axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nc_jax._linalg import mm, mtm, sym


def project_tangent(x: jax.Array, z: jax.Array) -> jax.Array:
  r"""Orthogonal projection of ``z`` onto :math:`T_X St`: :math:`Z - X\,\mathrm{sym}(X^TZ)`.

  Shapes: ``x``, ``z``: ``(..., d, K)``.
  """
  return z - mm(x, sym(mtm(x, z)))


def riemannian_gradient(x: jax.Array, euclidean_grad: jax.Array) -> jax.Array:
  """Riemannian gradient for the embedded metric: the projected Euclidean gradient."""
  return project_tangent(x, euclidean_grad)


def qr_retraction(x: jax.Array, v: jax.Array) -> jax.Array:
  r"""Sign-fixed QR retraction :math:`R_X(V) = \mathrm{qf}(X + V)`.

  ``qf`` is the Q factor with the signs chosen so that ``diag(R) > 0``, which
  makes it unique and smooth (pymanopt's default retraction).
  """
  q, r = jnp.linalg.qr(x + v)
  signs = jnp.where(jnp.diagonal(r, axis1=-2, axis2=-1) < 0, -1.0, 1.0).astype(q.dtype)
  return q * signs[..., None, :]


def qr_retraction_increment(x: jax.Array, v: jax.Array, refinements: int = 2) -> jax.Array:
  r"""The increment :math:`R_X(V) - X` of the sign-fixed QR retraction, computed accurately.

  For :math:`X \in St(d,K)` and tangent :math:`V`,
  :math:`(X+V)^T(X+V) = I + \Delta` with :math:`\Delta = 2\,\mathrm{sym}(X^TV) + V^TV`
  (:math:`\mathrm{sym}(X^TV) = 0` up to rounding). With the Cholesky factor
  :math:`R = I + E` (``diag(R) > 0``) the sign-fixed QR retraction is
  :math:`(X+V)R^{-1}`, so

  .. math::
     R_X(V) - X = (V - XE)\,R^{-1},\qquad E + E^T + E^TE = \Delta .

  ``E`` taken from ``cholesky(I + Δ)`` has absolute error ~eps; the
  fixed-point refinements :math:`E \leftarrow \mathrm{triu}(A,1) +
  \tfrac12\mathrm{diag}(A)`, :math:`A = \Delta - E^TE`, make it accurate
  relative to :math:`\|V\|`. So the increment, and a cost change
  :math:`\langle R_X(V) - X, B\rangle` computed from it, keep their relative
  accuracy for tiny steps, where ``qf(X+V) - X`` is rounding noise.
  :math:`I + \Delta \succeq I`, so the Cholesky factorisation is well conditioned.

  Shapes: ``x``, ``v``: ``(d, K)``. Returns ``(d, K)``.
  """
  k = x.shape[-1]
  eye = jnp.eye(k, dtype=x.dtype)
  delta = 2.0 * sym(mtm(x, v)) + mtm(v, v)
  e = jnp.swapaxes(jnp.linalg.cholesky(eye + delta), -1, -2) - eye
  for _ in range(refinements):
    a = delta - mtm(e, e)
    e = jnp.triu(a, 1) + 0.5 * jnp.diag(jnp.diagonal(a))
  rhs = v - mm(x, e)
  # D R = rhs  <=>  Rᵀ Dᵀ = rhsᵀ (triangular solve).
  return jax.scipy.linalg.solve_triangular(eye + e, rhs.T, trans="T", lower=False).T


def newton_schulz_step(x: jax.Array) -> jax.Array:
  r"""One Newton–Schulz step :math:`X(3I - X^TX)/2`: squares the distance to orthonormality.

  For :math:`X^TX = I + F`, the result has :math:`X^TX = I - \tfrac34F^2 + O(F^3)`,
  and it moves X by :math:`O(\|F\|)` only; used to undo rounding drift.
  """
  k = x.shape[-1]
  return mm(x, 1.5 * jnp.eye(k, dtype=x.dtype) - 0.5 * mtm(x, x))


def polar_retraction(x: jax.Array, v: jax.Array) -> jax.Array:
  r"""Polar retraction :math:`R_X(V) = (X+V)\,((X+V)^T(X+V))^{-1/2}`, via a thin SVD."""
  u, _, vt = jnp.linalg.svd(x + v, full_matrices=False)
  return mm(u, vt)


def random_point(key: jax.Array, dim: int, num_classes: int, dtype=jnp.float32) -> jax.Array:
  r"""A Haar-distributed point of :math:`St(d,K)`: ``(d, K)``.

  Sign-fixed QR of a standard Gaussian matrix (Mezzadri 2007), which is exactly
  Haar because the sign fix makes the factorisation unique.
  """
  g = jax.random.normal(key, (dim, num_classes), dtype=dtype)
  return qr_retraction(jnp.zeros_like(g), g)


def canonical_point(dim: int, num_classes: int, dtype=jnp.float32) -> jax.Array:
  r"""The first K columns of the identity, :math:`I_{d,K}` (the official solver's start)."""
  return jnp.eye(dim, num_classes, dtype=dtype)


def orthonormality_error(x: jax.Array) -> jax.Array:
  r""":math:`\max |X^TX - I|`, a feasibility measure."""
  k = x.shape[-1]
  return jnp.max(jnp.abs(mtm(x, x) - jnp.eye(k, dtype=x.dtype)))
