r"""Simplex equiangular tight frames (ETFs) and the closed-form distance to them.

Notation (docs/method.md §1). ``K`` classes, feature dimension ``d >= K``.

* Centring matrix :math:`M = I_K - \tfrac1K 1 1^T` (symmetric, idempotent,
  :math:`M1 = 0`, :math:`\operatorname{tr} M = K-1`).
* Canonical simplex ETF :math:`M_{etf} = \sqrt{K/(K-1)}\,M`: unit-norm columns with
  pairwise inner products :math:`-1/(K-1)`.
* Unit-Frobenius ETF :math:`\tilde M = M/\sqrt{K-1}`, the target inside the
  nearest-ETF cost.
* A d-dimensional simplex ETF is :math:`P \tilde M` (or :math:`P M_{etf}`) for a
  point :math:`P` of the Stiefel manifold :math:`St(d,K)`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nc_jax import _validation as v
from nc_jax import stiefel
from nc_jax._linalg import centre_columns, mm


def centring_matrix(num_classes: int, dtype=jnp.float32) -> jax.Array:
  r"""The K×K centring matrix :math:`M = I_K - \tfrac1K 1 1^T`."""
  v.check_num_classes("num_classes", num_classes)
  k = int(num_classes)
  return jnp.eye(k, dtype=dtype) - jnp.full((k, k), 1.0 / k, dtype=dtype)


def simplex_etf(num_classes: int, dtype=jnp.float32) -> jax.Array:
  r"""Canonical K×K simplex ETF :math:`\sqrt{K/(K-1)}\,M`.

  Columns have unit norm and pairwise inner products exactly :math:`-1/(K-1)`;
  the Gram matrix is :math:`\tfrac{K}{K-1} M`.
  """
  v.check_num_classes("num_classes", num_classes)
  k = int(num_classes)
  return jnp.asarray(np.sqrt(k / (k - 1.0)), dtype) * centring_matrix(k, dtype)


def random_etf(key: jax.Array, dim: int, num_classes: int, dtype=jnp.float32) -> jax.Array:
  r"""A Haar-random simplex ETF embedded in :math:`\mathbb R^d`: ``(d, K)`` array.

  Returns :math:`P M_{etf}` with :math:`P` Haar-distributed on :math:`St(d,K)`:
  unit-norm columns, pairwise inner products :math:`-1/(K-1)`, summing to 0.
  """
  v.check_num_classes("num_classes", num_classes)
  v.check_dim_at_least_classes("dim", dim, num_classes)
  p = stiefel.random_point(key, dim, num_classes, dtype)
  return mm(p, simplex_etf(num_classes, dtype))


def frobenius_normalise(x: jax.Array, eps: float = 1e-30) -> jax.Array:
  r""":math:`X/\|X\|_F` (differentiable; ``eps`` guards the all-zero matrix)."""
  return x / jnp.maximum(jnp.linalg.norm(x), eps)


class NearestETF(NamedTuple):
  """Closed-form nearest unit-Frobenius ETF to a matrix of class means.

  Attributes:
    distance: scalar, :math:`\\min_P \\|\\hat Y - P\\tilde M\\|_F^2`, in ``[0, 2]``.
    etf: ``(d, K)``, the minimiser :math:`P^\\star \\tilde M` (unique whenever
      :math:`\\operatorname{rank}(YM) = K-1`).
  """
  distance: jax.Array
  etf: jax.Array


def nearest_etf_closed_form(means: jax.Array) -> NearestETF:
  r"""Distance from class means to their nearest simplex ETF, in closed form.

  With :math:`\hat Y = Y/\|Y\|_F` (docs/method.md §9, "ETF distances"):

  .. math::
     \min_{P \in St(d,K)} \|\hat Y - P\tilde M\|_F^2
       = 2 - \frac{2\,\|\hat Y M\|_*}{\sqrt{K-1}},
     \qquad P^\star\tilde M = U_{K-1}V_{K-1}^T/\sqrt{K-1},

  where :math:`U_{K-1}\Sigma V_{K-1}^T` is the rank-(K−1) SVD of :math:`\hat Y M`
  and :math:`\|\cdot\|_*` the nuclear norm. This replaces the official code's
  trust-region solve with an exact answer.

  Args:
    means: ``(d, K)`` class means (columns), any scale, ``d >= K >= 2``.

  Returns:
    :class:`NearestETF` with the squared distance and the nearest ETF.
  """
  means = v.check_means_matrix("means", means)
  return _nearest_etf_closed_form(means)


@jax.jit
def _nearest_etf_closed_form(means):
  k = means.shape[1]
  ym = centre_columns(frobenius_normalise(means))
  u, s, vt = jnp.linalg.svd(ym, full_matrices=False)
  # M 1 = 0, so the K-th singular value is 0 (up to rounding): drop it.
  nuclear = jnp.sum(s[: k - 1])
  distance = 2.0 - 2.0 * nuclear / jnp.sqrt(k - 1.0)
  etf = mm(u[:, : k - 1], vt[: k - 1]) / jnp.sqrt(k - 1.0)
  return NearestETF(jnp.maximum(distance, 0.0), etf)


def etf_distance(means: jax.Array) -> jax.Array:
  r"""Squared distance :math:`2 - 2\|\hat Y M\|_*/\sqrt{K-1}` (see :func:`nearest_etf_closed_form`)."""
  return nearest_etf_closed_form(means).distance
