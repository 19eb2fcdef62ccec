"""Full-precision linear-algebra primitives shared by the solver and metrics.

On NVIDIA GPUs JAX runs float32 matmuls in TF32 by default (10-bit mantissa).
The nearest-ETF problem has conditioning ~1/delta = 1e3, so every product in
its forward and backward pass asks for ``Precision.HIGHEST`` (true float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST


def mm(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ b`` in full precision (no TF32/bf16 passes)."""
  return jnp.matmul(a, b, precision=HIGHEST)


def mtm(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a^T @ b`` in full precision (transposes the last two axes of ``a``)."""
  return jnp.matmul(jnp.swapaxes(a, -1, -2), b, precision=HIGHEST)


def sym(a: jax.Array) -> jax.Array:
  r"""Symmetric part :math:`\tfrac12(A + A^T)` of the trailing square matrix."""
  return 0.5 * (a + jnp.swapaxes(a, -1, -2))


def skew(a: jax.Array) -> jax.Array:
  r"""Skew-symmetric part :math:`\tfrac12(A - A^T)` of the trailing square matrix."""
  return 0.5 * (a - jnp.swapaxes(a, -1, -2))


def centre_columns(x: jax.Array) -> jax.Array:
  r"""Right-multiplication by the centring matrix, :math:`X M = X - \bar x 1^T`.

  :math:`M = I_K - \tfrac1K 1 1^T`; applying it costs O(dK) instead of O(dK^2).
  """
  return x - jnp.mean(x, axis=-1, keepdims=True)
