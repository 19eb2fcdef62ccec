"""Input validation at the public boundary.

Every public function of :mod:`nc_jax` calls these helpers *before* any
``jit``-compiled work. Static properties (rank, shape, dtype) are checked
always, also while tracing under a user's ``jax.jit``. Value properties
(finiteness, label range, orthonormality) need concrete numbers and are
checked whenever the input is concrete (not a tracer); under a user's
``jit`` they cannot raise, which the public docstrings state.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
  """True if ``x`` holds concrete values (not a tracer inside a transformation)."""
  return not isinstance(x, jax.core.Tracer)


def as_float_array(name: str, x: Any) -> jax.Array:
  """Converts ``x`` to a floating JAX array, refusing non-numeric input."""
  try:
    arr = jnp.asarray(x)
  except (TypeError, ValueError) as err:
    raise ValueError(f"{name}: expected a numeric array, got {type(x).__name__}") from err
  if not jnp.issubdtype(arr.dtype, jnp.floating):
    if jnp.issubdtype(arr.dtype, jnp.integer) or arr.dtype == jnp.bool_:
      arr = arr.astype(jnp.result_type(float))
    else:
      raise ValueError(f"{name}: expected a real floating array, got dtype {arr.dtype}")
  return arr


def check_ndim(name: str, x: jax.Array, ndim: int, what: str) -> None:
  if x.ndim != ndim:
    raise ValueError(f"{name}: expected a rank-{ndim} array {what}, got shape {tuple(x.shape)}")


def check_nonempty(name: str, x: jax.Array) -> None:
  if x.size == 0:
    raise ValueError(f"{name}: expected a non-empty array, got shape {tuple(x.shape)}")


def float_dtype(name: str, dtype: Any) -> jnp.dtype:
  """``dtype`` as a numpy dtype; ``ValueError`` naming ``name`` unless it is floating."""
  try:
    dt = jnp.dtype(dtype)
  except TypeError as err:
    raise ValueError(f"{name}: expected a floating dtype, got {dtype!r}") from err
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"{name}: expected a floating dtype, got {dt}")
  return dt


def check_num_classes(name: str, k: int) -> None:
  if int(k) != k or k < 2:
    raise ValueError(f"{name}: expected an integer number of classes K >= 2, got {k}")


def check_dim_at_least_classes(name: str, d: int, k: int) -> None:
  if d < k:
    raise ValueError(
        f"{name}: expected feature dimension d >= number of classes K "
        f"(the Stiefel manifold St(d, K) is empty otherwise), got d={d}, K={k}")


def check_finite(name: str, x: jax.Array) -> None:
  if is_concrete(x):
    arr = np.asarray(x)
    if not np.all(np.isfinite(arr)):
      bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
      raise ValueError(f"{name}: expected finite values, got {bad} non-finite entries (NaN or inf)")


def check_labels(name: str, labels: Any, num_classes: int, n: int | None = None) -> jax.Array:
  """Checks an integer label vector with values in ``[0, num_classes)``."""
  lab = jnp.asarray(labels)
  if lab.ndim != 1:
    raise ValueError(f"{name}: expected a rank-1 integer array of labels, got shape {tuple(lab.shape)}")
  if not (jnp.issubdtype(lab.dtype, jnp.integer)):
    raise ValueError(f"{name}: expected integer labels, got dtype {lab.dtype}")
  if n is not None and lab.shape[0] != n:
    raise ValueError(f"{name}: expected {n} labels (one per feature row), got {lab.shape[0]}")
  if is_concrete(lab) and lab.size:
    lo, hi = int(np.min(np.asarray(lab))), int(np.max(np.asarray(lab)))
    if lo < 0 or hi >= num_classes:
      raise ValueError(
          f"{name}: expected labels in [0, {num_classes}), got values in [{lo}, {hi}]")
  return lab


def check_orthonormal_columns(name: str, x: jax.Array, tol: float | None = None) -> None:
  """Checks ``x^T x = I`` within ``tol`` (default scales with the dtype's epsilon)."""
  if not is_concrete(x):
    return
  arr = np.asarray(x, dtype=np.float64)
  k = arr.shape[-1]
  if tol is None:
    eps = float(jnp.finfo(x.dtype).eps)
    tol = max(1e-6, 1e3 * eps * np.sqrt(k))
  err = float(np.max(np.abs(np.swapaxes(arr, -1, -2) @ arr - np.eye(k))))
  if not err <= tol:
    raise ValueError(
        f"{name}: expected orthonormal columns (a point of the Stiefel manifold), "
        f"got max|X^T X - I| = {err:.3g} > tolerance {tol:.3g}")


def check_means_matrix(name: str, x: Any, what: str = "(d, K) of class means") -> jax.Array:
  """A finite ``(d, K)`` floating matrix with ``d >= K >= 2`` (a point's worth of class means)."""
  x = as_float_array(name, x)
  check_ndim(name, x, 2, what)
  d, k = x.shape
  check_num_classes(f"{name}.shape[1]", k)
  check_dim_at_least_classes(name, d, k)
  check_finite(name, x)
  return x
