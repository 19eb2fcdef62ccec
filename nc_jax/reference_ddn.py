r"""A JAX transcription of the official dense DDN backward (for comparison only).

The official PyTorch layer differentiates the nearest-ETF problem with the
equality-constrained proposition of Deep Declarative Networks (Gould, Hartley &
Campbell, arXiv 1909.04866), materialising every operator densely
(docs/method.md §6.2). This module reproduces that computation step by step, with
the same objects and the same memory footprint, so that tests can check
:func:`nc_jax.polar_vjp` against it and benchmarks can time it. It is not used
by any training path: its cost is :math:`O(dK^5)` time and
:math:`O(dK^3 + K^4)` memory (4 TB at K = 1000).

Row-major vectorisation ``vec(X)[i*K + j] = X[i, j]``; with :math:`v =
\mathrm{vec}(\partial L/\partial P)`:

.. math::
   w = -H^{-1}v,\quad t = H^{-1}A^T,\quad s = -(At)^{-1}Aw,\quad
   \frac{\partial L}{\partial \bar Y} = -c\,\mathrm{mat}(w + ts)\,M,

where H is block-diagonal with d copies of
:math:`H_{blk} = \tfrac{2}{K-1}M + \delta I - \Sigma`,
:math:`\Sigma = \mathrm{sym}(\nabla f(P)^TP)` the multipliers, and
:math:`A = L_K(K_{KK} + I_{K^2})\,(P^T \otimes I_K)` the Jacobian of
:math:`\mathrm{vech}(X^TX - I)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nc_jax._linalg import centre_columns, mm, mtm, sym


def constraint_constant(num_classes: int, dtype=jnp.float32) -> jax.Array:
  r""":math:`L_K(K_{KK} + I_{K^2})`, shape ``(K(K+1)/2, K^2)``, built once per layer.

  :math:`K_{KK}` is the commutation permutation (rows of :math:`I_{K^2}` in the
  order ``arange(K²).reshape(K, K).T.ravel()``) and :math:`L_K` selects the
  row-major lower triangle. Like the official layer, it materialises
  :math:`I_{K^2}` (4 TB at K = 1000).
  """
  k = int(num_classes)
  eye = jnp.eye(k * k, dtype=dtype)
  commutation = eye[np.arange(k * k).reshape(k, k).T.ravel()]
  rows, cols = np.tril_indices(k)
  elimination = eye[rows * k + cols]
  return elimination @ (commutation + eye)


def dense_ddn_vjp(y: jax.Array, prox: jax.Array, p: jax.Array, grad_p: jax.Array,
                  delta: float, constant: jax.Array) -> jax.Array:
  """Gradient w.r.t. ``y`` by the official dense DDN formula.

  Args:
    y: ``(d, K)`` solver input :math:`\\bar Y`.
    prox: ``(d, K)`` previous solution.
    p: ``(d, K)`` the solution :math:`P^\\star`.
    grad_p: ``(d, K)`` upstream gradient :math:`\\partial L/\\partial P`.
    delta: proximal weight.
    constant: :func:`constraint_constant` for K.

  Returns:
    ``(d, K)`` gradient :math:`\\partial L/\\partial \\bar Y`.
  """
  d, k = p.shape
  dtype = p.dtype
  c = jnp.asarray(2.0 / np.sqrt(k - 1.0), dtype)
  eye_k = jnp.eye(k, dtype=dtype)
  # Euclidean gradient of the official cost, its multipliers and Hessian block.
  f_grad = (2.0 / (k - 1.0)) * centre_columns(p) - c * centre_columns(y) + delta * (p - prox)
  sigma = sym(mtm(f_grad, p))
  m = eye_k - 1.0 / k
  h_block = (2.0 / (k - 1.0)) * m + delta * eye_k - sigma
  chol = jax.scipy.linalg.cho_factor(h_block, lower=True)

  def h_inv(v_rows):  # H⁻¹ on row-major vectors: each length-K row solved with H_blk
    return jax.scipy.linalg.cho_solve(chol, v_rows.T).T

  # The dense d·K³ tensor mapping vec(V) to vec(PᵀV), then A = constant @ tensor.
  tensor = jnp.einsum("ia,bc->abic", p, eye_k).reshape(k * k, d * k)
  a = mm(constant, tensor)                                   # (T, dK)
  # t = H⁻¹ Aᵀ: each column of Aᵀ is a row-major d×K matrix; solve all d·T blocks.
  n_con = a.shape[0]
  blocks = a.T.reshape(d, k, n_con).transpose(1, 0, 2).reshape(k, d * n_con)
  t_mat = jax.scipy.linalg.cho_solve(chol, blocks).reshape(k, d, n_con)
  t_mat = t_mat.transpose(1, 0, 2).reshape(d * k, n_con)
  w = -h_inv(grad_p).reshape(-1)
  at = mm(a, t_mat)                                          # (T, T)
  s = -jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(at, lower=True), mm(a, w[:, None]))
  g = (w[:, None] + mm(t_mat, s)).reshape(d, k)
  return -c * centre_columns(g)
