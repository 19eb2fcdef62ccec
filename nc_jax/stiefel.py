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
