"""Simplex ETF geometry, Stiefel helpers and the closed-form ETF distance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nc_jax as nc
from nc_jax import stiefel


@pytest.mark.parametrize("k", [2, 3, 10, 100])
def test_centring_matrix(k):
  m = np.asarray(nc.centring_matrix(k, jnp.float64))
  np.testing.assert_allclose(m, m.T)
  np.testing.assert_allclose(m @ m, m, atol=1e-14)
  np.testing.assert_allclose(m @ np.ones(k), 0, atol=1e-14)
  assert np.trace(m) == pytest.approx(k - 1)


@pytest.mark.parametrize("k", [2, 3, 10, 100])
def test_simplex_etf(k):
  e = np.asarray(nc.simplex_etf(k, jnp.float64))
  gram = e.T @ e
  np.testing.assert_allclose(np.diag(gram), 1.0, atol=1e-14)
  off = gram[~np.eye(k, dtype=bool)]
  np.testing.assert_allclose(off, -1.0 / (k - 1), atol=1e-14)
  np.testing.assert_allclose(e.sum(axis=1), 0, atol=1e-13)


def test_random_etf_is_a_rotated_simplex_etf():
  d, k = 50, 7
  e = np.asarray(nc.random_etf(jax.random.PRNGKey(0), d, k, jnp.float64))
  assert e.shape == (d, k)
  etf = np.asarray(nc.simplex_etf(k, jnp.float64))
  np.testing.assert_allclose(e.T @ e, etf.T @ etf, atol=1e-13)  # same Gram: a rotation
  e2 = np.asarray(nc.random_etf(jax.random.PRNGKey(1), d, k, jnp.float64))
  assert np.abs(e - e2).max() > 0.1  # different keys, different embeddings
  assert nc.random_etf(jax.random.PRNGKey(0), d, k).dtype == jnp.float32


def test_projection_is_tangent_and_idempotent():
  d, k = 30, 5
  x = stiefel.random_point(jax.random.PRNGKey(0), d, k, jnp.float64)
  z = jax.random.normal(jax.random.PRNGKey(1), (d, k), jnp.float64)
  v = stiefel.project_tangent(x, z)
  s = np.asarray(x.T @ v)
  np.testing.assert_allclose(s + s.T, 0, atol=1e-13)  # XᵀV skew: tangent
  np.testing.assert_allclose(stiefel.project_tangent(x, v), v, atol=1e-13)
  # Orthogonal projection: the residual is normal to every tangent vector.
  w = stiefel.project_tangent(x, jax.random.normal(jax.random.PRNGKey(2), (d, k), jnp.float64))
  assert abs(float(jnp.vdot(z - v, w))) < 1e-12


@pytest.mark.parametrize("retraction", [stiefel.qr_retraction, stiefel.polar_retraction])
def test_retractions(retraction):
  d, k = 30, 5
  x = stiefel.random_point(jax.random.PRNGKey(3), d, k, jnp.float64)
  v = stiefel.project_tangent(x, jax.random.normal(jax.random.PRNGKey(4), (d, k), jnp.float64))
  np.testing.assert_allclose(retraction(x, jnp.zeros_like(v)), x, atol=1e-13)
  y = retraction(x, v)
  assert float(stiefel.orthonormality_error(y)) < 1e-13
  # First order: R_X(tV) = X + tV + O(t²).
  errors = [float(jnp.linalg.norm(retraction(x, t * v) - x - t * v)) for t in (1e-2, 1e-3)]
  assert errors[1] < errors[0] / 50


def test_qr_retraction_is_sign_fixed_and_increment_matches():
  d, k = 40, 6
  x = stiefel.random_point(jax.random.PRNGKey(5), d, k, jnp.float64)
  for scale in (1.0, 1e-3, 1e-9):
    v = scale * stiefel.project_tangent(
        x, jax.random.normal(jax.random.PRNGKey(6), (d, k), jnp.float64))
    y = stiefel.qr_retraction(x, v)
    r = np.asarray(y.T @ (x + v))  # upper triangular with positive diagonal
    np.testing.assert_allclose(np.tril(r, -1), 0, atol=1e-12)
    assert np.all(np.diag(r) > 0)
    inc = stiefel.qr_retraction_increment(x, v)
    np.testing.assert_allclose(x + inc, y, atol=1e-14)
    # The increment keeps relative accuracy for tiny steps (qf(X+V) − X cannot).
    exact = np.asarray(v)  # to first order; the O(|V|²) rest is far below 1e-9·|V|
    if scale == 1e-9:
      assert np.linalg.norm(np.asarray(inc) - exact) < 1e-6 * np.linalg.norm(exact)


def test_newton_schulz_step_restores_orthonormality():
  x = stiefel.random_point(jax.random.PRNGKey(7), 20, 4, jnp.float64)
  noisy = x + 1e-4 * jax.random.normal(jax.random.PRNGKey(8), x.shape, jnp.float64)
  before = float(stiefel.orthonormality_error(noisy))
  after = float(stiefel.orthonormality_error(stiefel.newton_schulz_step(noisy)))
  assert after < before ** 2 * 10


def test_random_point_is_orthonormal_and_haar_invariant_in_mean():
  keys = jax.random.split(jax.random.PRNGKey(9), 2000)
  pts = jax.vmap(lambda k: stiefel.random_point(k, 4, 2, jnp.float64))(keys)
  assert float(jnp.max(jax.vmap(stiefel.orthonormality_error)(pts))) < 1e-13
  # Haar: E[X] = 0 and E[X_ij²] = 1/d.
  np.testing.assert_allclose(np.mean(pts, axis=0), 0, atol=0.05)
  np.testing.assert_allclose(np.mean(np.asarray(pts) ** 2, axis=0), 0.25, atol=0.03)


def test_canonical_point():
  np.testing.assert_array_equal(stiefel.canonical_point(4, 2), np.eye(4, 2))


def test_etf_distance_zero_at_etf_and_matches_feasibility_solve():
  d, k = 40, 8
  e = nc.random_etf(jax.random.PRNGKey(10), d, k, jnp.float64)
  assert float(nc.etf_distance(3.0 * e)) == pytest.approx(0.0, abs=1e-13)
  # Offsets are not removed: the distance is taken as defined, on Ŷ = Y/‖Y‖.
  y = jax.random.normal(jax.random.PRNGKey(11), (d, k), jnp.float64)
  out = nc.nearest_etf_closed_form(y)
  y_hat = y / jnp.linalg.norm(y)
  m_tilde = nc.centring_matrix(k, jnp.float64) / np.sqrt(k - 1)
  # Any feasibility minimiser P gives the same PM̃: compare with the solver's.
  p = nc.feasibility_solution(y_hat)
  np.testing.assert_allclose(out.etf, p @ m_tilde, atol=1e-12)
  direct = float(jnp.sum((y_hat - p @ m_tilde) ** 2))
  assert float(out.distance) == pytest.approx(direct, rel=1e-10)
  # It is a minimum: random Stiefel points do worse.
  for i in range(20):
    q = stiefel.random_point(jax.random.PRNGKey(100 + i), d, k, jnp.float64)
    assert float(jnp.sum((y_hat - q @ m_tilde) ** 2)) > direct
  assert 0.0 <= float(out.distance) <= 2.0


@pytest.mark.parametrize("call,match", [
    (lambda: nc.simplex_etf(1), r"^num_classes: expected .*K >= 2, got 1"),
    (lambda: nc.centring_matrix(0), r"^num_classes"),
    (lambda: nc.random_etf(jax.random.PRNGKey(0), 3, 5), r"^dim: expected feature dimension d >= .*d=3, K=5"),
    (lambda: nc.etf_distance(jnp.ones(5)), r"^means: expected a rank-2"),
    (lambda: nc.etf_distance(jnp.ones((3, 5))), r"^means: expected feature dimension"),
    (lambda: nc.etf_distance(jnp.full((5, 3), jnp.nan)), r"^means: expected finite"),
])
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()
