"""The nearest-ETF solver: forward agreement, optimality, implicit VJP, transformations."""

import functools

import jax
import jax.test_util  # noqa: F401  (check_grads)
import jax.numpy as jnp
import jaxopt
import numpy as np
import pytest

import nc_jax as nc
from nc_jax import reference_ddn, solver, stiefel

DELTA = 1e-3


def problem(d, k, dtype=jnp.float64, seed=0):
  """Random unit-Frobenius Ȳ, a Haar-random prox and a random cotangent."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  y = jax.random.normal(k1, (d, k), dtype)
  y = y / jnp.linalg.norm(y)
  prox = stiefel.random_point(k2, d, k, dtype)
  cot = jax.random.normal(k3, (d, k), dtype)
  return y, prox, cot


def target(y, prox, delta=DELTA):
  k = y.shape[1]
  return 2.0 / np.sqrt(k - 1) * (y - y.mean(1, keepdims=True)) + delta * prox


def cost(p, y, prox, delta=DELTA):
  """The official cost ‖Ȳ − PM̃‖² + (δ/2)‖P − prox‖², in float64 numpy."""
  p, y, prox = (np.asarray(a, np.float64) for a in (p, y, prox))
  k = y.shape[1]
  m = np.eye(k) - 1.0 / k
  return (np.linalg.norm(y - p @ m / np.sqrt(k - 1)) ** 2
          + 0.5 * delta * np.linalg.norm(p - prox) ** 2)


def exact_polar(y, prox, delta=DELTA):
  u, _, vt = np.linalg.svd(np.asarray(target(np.asarray(y, np.float64),
                                             np.asarray(prox, np.float64), delta)),
                           full_matrices=False)
  return u @ vt


SIZES = [(64, 10), (512, 10), (512, 100), pytest.param(2048, 100, marks=pytest.mark.slow)]


# --------------------------------------------------------------------------- #
# Forward
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("d,k", SIZES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_polar_and_rgd_agree(d, k, dtype):
  y, prox, _ = problem(d, k, dtype)
  p_polar = nc.nearest_etf(y, prox)
  eps = float(jnp.finfo(dtype).eps)
  # float32 at K = 10 needs the tightest tolerance (conditioning ~1/δ); see docstring.
  tol = eps if (dtype == jnp.float32 and k <= 10) else None
  p_rgd, info = nc.nearest_etf(y, prox, method="rgd", tol=tol, return_info=True)
  assert p_polar.dtype == p_rgd.dtype == dtype
  bound = 1e-5 if dtype == jnp.float32 else 1e-9
  np.testing.assert_allclose(p_rgd, p_polar, atol=bound, rtol=0)
  assert 0 < int(info.iterations) < 5000


@pytest.mark.parametrize("factorisation", solver.FACTORISATIONS)
@pytest.mark.parametrize("d,k", [(64, 10), (512, 10), (512, 100), (20, 20), (3, 2)])
def test_factorisations_match_float64_closed_form(factorisation, d, k):
  y, prox, _ = problem(d, k, jnp.float64, seed=1)
  want = exact_polar(y, prox)
  got = nc.nearest_etf(y, prox, factorisation=factorisation)
  np.testing.assert_allclose(got, want, atol=1e-11, rtol=0)
  # float32: limited by the conditioning κ(B) = σ_max/σ_min ~ 1/δ of the δ-direction
  # (perturbation bound of the polar factor: eps·κ; κ ≈ 200–2,000 here).
  sv = np.linalg.svd(target(np.asarray(y), np.asarray(prox)), compute_uv=False)
  atol = max(2e-5, 0.5 * float(jnp.finfo(jnp.float32).eps) * sv[0] / sv[-1])
  got32 = nc.nearest_etf(y.astype(jnp.float32), prox.astype(jnp.float32),
                         factorisation=factorisation)
  np.testing.assert_allclose(got32, want, atol=atol, rtol=0)


@pytest.mark.parametrize("factorisation", solver.FACTORISATIONS)
def test_factorisations_finite_when_gram_matrix_is_numerically_singular(factorisation):
  """κ(B) ≈ 4,500 in float32: κ²·eps > 1, so BᵀB's smallest computed eigenvalue is noise
  (it was negative, and `eigh` returned NaN before its eigenvalues were floored)."""
  y, prox, _ = problem(20, 20, jnp.float64, seed=0)
  sv = np.linalg.svd(target(np.asarray(y), np.asarray(prox)), compute_uv=False)
  kappa = sv[0] / sv[-1]
  assert kappa**2 * float(jnp.finfo(jnp.float32).eps) > 1
  got = nc.nearest_etf(y.astype(jnp.float32), prox.astype(jnp.float32),
                       factorisation=factorisation)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, exact_polar(y, prox), atol=kappa * 1.2e-7, rtol=0)


@pytest.mark.parametrize("method,factorisation",
                         [("polar", f) for f in solver.FACTORISATIONS] + [("rgd", "svd")])
def test_first_order_optimality(method, factorisation):
  d, k = 128, 12
  y, prox, _ = problem(d, k, seed=2)
  p, info = nc.nearest_etf(y, prox, method=method, factorisation=factorisation, return_info=True)
  b = np.asarray(target(y, prox))
  p = np.asarray(p)
  np.testing.assert_allclose(p.T @ p, np.eye(k), atol=1e-13)
  grad = p @ (0.5 * (p.T @ b + b.T @ p)) - b          # Riemannian gradient
  assert np.linalg.norm(grad) < 1e-12
  assert float(info.grad_norm) == pytest.approx(np.linalg.norm(grad), abs=1e-13)
  s = p.T @ b                                          # = (BᵀB)^{1/2}: symmetric PD
  np.testing.assert_allclose(s, s.T, atol=1e-13)
  assert np.linalg.eigvalsh(0.5 * (s + s.T)).min() > 0.5 * DELTA


def test_solution_minimises_cost_against_perturbations():
  d, k = 40, 6
  y, prox, _ = problem(d, k, seed=3)
  p = nc.nearest_etf(y, prox)
  best = cost(p, y, prox)
  keys = jax.random.split(jax.random.PRNGKey(9), 50)
  for i, key in enumerate(keys):
    z = jax.random.normal(key, (d, k), jnp.float64) * (10.0 ** -(i % 5))
    q = stiefel.qr_retraction(p, stiefel.project_tangent(p, z))
    assert cost(q, y, prox) > best - 1e-15
  for key in keys[:10]:  # and against random points of the manifold
    assert cost(stiefel.random_point(key, d, k, jnp.float64), y, prox) > best


def test_rgd_decreases_cost_monotonically():
  d, k = 64, 8
  y, prox, _ = problem(d, k, seed=4)
  costs = [cost(prox, y, prox)]
  for n in (1, 2, 4, 8, 16, 32):
    p = nc.nearest_etf(y, prox, method="rgd", max_iterations=n)
    costs.append(cost(p, y, prox))
  assert all(b <= a + 1e-15 for a, b in zip(costs, costs[1:])), costs
  assert costs[-1] < costs[0]


def test_rgd_warm_start_at_a_solution_stops_at_once():
  """Started at a fixed point P = polar(cȲM + δP) (a feasibility solution), RGD does no work."""
  y, _, _ = problem(512, 10, seed=5)
  p_feas = nc.feasibility_solution(y)
  p, info = nc.nearest_etf(y, p_feas, method="rgd", return_info=True)
  assert int(info.iterations) <= 1
  np.testing.assert_allclose(p, p_feas, atol=1e-13)


def test_rgd_respects_iteration_cap_and_reports_gradient():
  y, prox, _ = problem(64, 10, seed=6)
  p, info = nc.nearest_etf(y, prox, method="rgd", max_iterations=3, return_info=True)
  assert int(info.iterations) == 3
  b = np.asarray(target(y, prox))
  p = np.asarray(p)
  want = np.linalg.norm(p @ (0.5 * (p.T @ b + b.T @ p)) - b)
  assert float(info.grad_norm) == pytest.approx(want, rel=1e-8)
  assert want > 1e-6  # not converged after 3 iterations from a random start


# --------------------------------------------------------------------------- #
# Feasibility solve (prox=None)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("d,k", [(64, 10), (10, 10), (30, 2)])
def test_feasibility_solution(d, k):
  y, _, _ = problem(d, k, seed=7)
  p = np.asarray(nc.feasibility_solution(y))
  np.testing.assert_allclose(p.T @ p, np.eye(k), atol=1e-12)
  # P·M is the unique feasibility minimiser U_{K-1}V_{K-1}ᵀ.
  m = np.eye(k) - 1.0 / k
  u, s, vt = np.linalg.svd(np.asarray(y) @ m, full_matrices=False)
  np.testing.assert_allclose(p @ m, u[:, :k - 1] @ vt[:k - 1], atol=1e-11)
  # Among all minimisers U_{K-1}V_{K-1}ᵀ + u vᵀ it is the nearest to I_{d,K}.
  ones = np.full(k, 1 / np.sqrt(k))
  base = u[:, :k - 1] @ vt[:k - 1]
  start = np.eye(d, k)
  rng = np.random.default_rng(0)
  for _ in range(20):
    w = rng.standard_normal(d)
    w -= u[:, :k - 1] @ (u[:, :k - 1].T @ w)
    w /= np.linalg.norm(w)
    other = base + np.outer(w, ones)
    assert np.linalg.norm(p - start) <= np.linalg.norm(other - start) + 1e-12
  # Its proximal solve returns itself (docs/method.md §5).
  np.testing.assert_allclose(nc.nearest_etf(y, None), p, atol=1e-11)
  np.testing.assert_allclose(nc.nearest_etf(y, p), p, atol=1e-11)


def test_feasibility_gradient_is_that_of_the_proximal_problem():
  y, _, cot = problem(32, 6, seed=8)
  p_feas = nc.feasibility_solution(y)
  g_none = jax.grad(lambda a: jnp.vdot(cot, nc.nearest_etf(a, None)))(y)
  g_prox = jax.grad(lambda a: jnp.vdot(cot, nc.nearest_etf(a, p_feas)))(y)
  assert np.all(np.isfinite(g_none))
  np.testing.assert_allclose(g_none, g_prox, atol=1e-9)


# --------------------------------------------------------------------------- #
# Backward
# --------------------------------------------------------------------------- #


# Every gradient test runs every polar factorisation (each has its own backward: eigh-based,
# the eigh path's residuals, or matmul-only) and RGD.
SOLVERS = [("polar", f) for f in solver.FACTORISATIONS] + [("rgd", "auto")]


@pytest.mark.parametrize("d,k", [(10, 5), (64, 10), pytest.param(512, 100, marks=pytest.mark.slow)])
@pytest.mark.parametrize("method,factorisation", SOLVERS)
def test_vjp_matches_central_finite_differences(d, k, method, factorisation):
  y, prox, cot = problem(d, k, seed=10)
  f = lambda a: jnp.vdot(cot, nc.nearest_etf(a, prox, method=method,
                                            factorisation=factorisation))
  grad = jax.grad(f)(y)
  rng = np.random.default_rng(1)
  for _ in range(3):
    e = jnp.asarray(rng.standard_normal((d, k)))
    e = e / jnp.linalg.norm(e)
    h = 1e-6 if method == "polar" else 1e-5
    fd = (f(y + h * e) - f(y - h * e)) / (2 * h)
    assert float(jnp.vdot(grad, e)) == pytest.approx(float(fd), rel=1e-6, abs=1e-9 * float(
        jnp.linalg.norm(grad)))


def test_vjp_through_normalisation_helper():
  """From raw class means (any scale, uncentred) to P: the full differentiable path."""
  d, k = 24, 6
  key1, key2, key3 = jax.random.split(jax.random.PRNGKey(11), 3)
  means = 3.0 + jax.random.normal(key1, (d, k), jnp.float64)
  mu_g = jax.random.normal(key2, (d,), jnp.float64)
  prox = stiefel.random_point(key3, d, k, jnp.float64)
  cot = jax.random.normal(jax.random.PRNGKey(12), (d, k), jnp.float64)

  def f(m, g):
    return jnp.vdot(cot, nc.nearest_etf(nc.normalise_means(m, g), prox))

  jax.test_util.check_grads(f, (means, mu_g), order=1, modes=["rev"], atol=1e-7, rtol=1e-6,
                            eps=1e-6)
  jax.test_util.check_grads(lambda m: jnp.vdot(cot, nc.nearest_etf(nc.normalise_means(m), prox)),
                            (means,), order=1, modes=["rev"], atol=1e-7, rtol=1e-6, eps=1e-6)


@pytest.mark.parametrize("factorisation", solver.FACTORISATIONS)
def test_vjp_matches_jaxopt_implicit_differentiation(factorisation):
  """Independent route: jaxopt differentiates the KKT system (P, Λ) of the official cost."""
  d, k = 16, 5
  y, prox, cot = problem(d, k, seed=13)
  c = 2.0 / np.sqrt(k - 1)
  m = jnp.eye(k) - 1.0 / k

  def euclid_grad(p, a):
    return (2.0 / (k - 1)) * p @ m - c * a @ m + DELTA * (p - prox)

  def kkt(z, a):
    p, lam = z  # stationarity ∇f − PΛ = 0; feasibility PᵀP = I; Λ symmetric
    return euclid_grad(p, a) - p @ lam, p.T @ p - jnp.eye(k) + 0.5 * (lam - lam.T)

  @jaxopt.implicit_diff.custom_root(
      kkt, solve=functools.partial(jaxopt.linear_solve.solve_gmres, tol=1e-14))
  def solve(init, a):
    del init
    p = jax.lax.stop_gradient(nc.nearest_etf(a, prox))
    gp = euclid_grad(p, a)
    return p, 0.5 * (p.T @ gp + gp.T @ p)

  want = jax.grad(lambda a: jnp.vdot(cot, solve(None, a)[0]))(y)
  got = jax.grad(lambda a: jnp.vdot(cot, nc.nearest_etf(a, prox, factorisation=factorisation)))(y)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * float(jnp.linalg.norm(want)))


@pytest.mark.parametrize("factorisation", solver.FACTORISATIONS)
@pytest.mark.parametrize("d,k", [(10, 5), (64, 10), (128, 20)])
def test_vjp_matches_official_dense_ddn(d, k, factorisation):
  y, prox, cot = problem(d, k, seed=14)
  p, vjp = jax.vjp(lambda a: nc.nearest_etf(a, prox, factorisation=factorisation), y)
  ours = vjp(cot)[0]
  ddn = reference_ddn.dense_ddn_vjp(y, prox, p, cot, DELTA,
                                    reference_ddn.constraint_constant(k, jnp.float64))
  assert float(jnp.linalg.norm(ours - ddn) / jnp.linalg.norm(ddn)) < 1e-8


def collapsed_problem(d, k, dtype):
  """Ȳ an exact simplex ETF and prox its frame: K−1 equal singular values of B."""
  frame = stiefel.random_point(jax.random.PRNGKey(15), d, k, dtype)
  y = frame @ nc.simplex_etf(k, dtype)
  return y / jnp.linalg.norm(y), frame


def naive_polar(y, prox):
  """Polar factor by autodiff through the SVD: what the custom VJP avoids."""
  u, _, vt = jnp.linalg.svd(solver.procrustes_target(y, prox, DELTA), full_matrices=False)
  return u @ vt


@pytest.mark.parametrize("factorisation", solver.FACTORISATIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_gradient_finite_at_exact_etf_where_svd_autodiff_is_not(dtype, factorisation):
  d, k = 32, 8
  y, prox = collapsed_problem(d, k, dtype)
  sv = np.linalg.svd(np.asarray(solver.procrustes_target(y, prox, DELTA), np.float64),
                     compute_uv=False)
  assert np.ptp(sv[:k - 1]) < 1e-6  # the K−1 top singular values coincide
  cot = jax.random.normal(jax.random.PRNGKey(16), (d, k), dtype)
  ours = jax.grad(lambda a: jnp.vdot(cot, nc.nearest_etf(a, prox, factorisation=factorisation)))(y)
  assert np.all(np.isfinite(ours))
  # Reference: the float64 gradient of the (smooth) polar map by central differences.
  y64, prox64, cot64 = (a.astype(jnp.float64) for a in (y, prox, cot))
  f64 = lambda a: jnp.vdot(cot64, nc.nearest_etf(a, prox64))
  rng = np.random.default_rng(2)
  e = jnp.asarray(rng.standard_normal((d, k)))
  fd = (f64(y64 + 1e-6 * e) - f64(y64 - 1e-6 * e)) / 2e-6
  assert float(jnp.vdot(ours.astype(jnp.float64), e)) == pytest.approx(float(fd), rel=1e-4)
  # Autodiff through the SVD divides by σᵢ² − σⱼ² ≈ 0: non-finite or wildly wrong.
  naive = jax.grad(lambda a: jnp.vdot(cot, naive_polar(a, prox)))(y)
  np.testing.assert_allclose(naive_polar(y, prox), nc.nearest_etf(y, prox), atol=1e-5)
  assert (not np.all(np.isfinite(naive))) or (
      np.linalg.norm(naive - ours) > 1e3 * np.linalg.norm(ours))


@pytest.mark.parametrize("method", ["polar", "rgd"])
def test_prox_gets_no_gradient(method):
  y, prox, cot = problem(20, 4, seed=17)
  g = jax.grad(lambda q: jnp.vdot(cot, nc.nearest_etf(y, q, method=method)))(prox)
  assert np.all(np.asarray(g) == 0)


# --------------------------------------------------------------------------- #
# Transformations and invariances
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("method", ["polar", "rgd"])
def test_orthogonal_equivariance(method):
  d, k = 30, 7
  y, prox, cot = problem(d, k, seed=18)
  q = stiefel.random_point(jax.random.PRNGKey(19), d, d, jnp.float64)
  p = nc.nearest_etf(y, prox, method=method)
  np.testing.assert_allclose(nc.nearest_etf(q @ y, q @ prox, method=method), q @ p, atol=1e-10)
  # The gradient is equivariant too: ∂L/∂(QȲ) = Q ∂L/∂Ȳ for L(P) = ⟨QḠ, QP⟩.
  g = jax.grad(lambda a: jnp.vdot(cot, nc.nearest_etf(a, prox)))(y)
  gq = jax.grad(lambda a: jnp.vdot(q @ cot, nc.nearest_etf(a, q @ prox)))(q @ y)
  np.testing.assert_allclose(gq, q @ g, atol=1e-10)


def test_invariant_to_common_offset_of_class_means():
  """Ȳ enters only through ȲM, so adding the same vector to every column changes nothing."""
  y, prox, _ = problem(20, 5, seed=20)
  shifted = y + jnp.arange(20.0)[:, None]
  np.testing.assert_allclose(nc.nearest_etf(shifted, prox), nc.nearest_etf(y, prox), atol=1e-12)


@pytest.mark.parametrize("method", ["polar", "rgd"])
def test_vmap_equals_loop(method):
  ys, proxes, cots = zip(*(problem(24, 6, seed=s) for s in range(4)))
  ys, proxes, cots = jnp.stack(ys), jnp.stack(proxes), jnp.stack(cots)
  f = lambda y, q: nc.nearest_etf(y, q, method=method)
  batched = jax.vmap(f)(ys, proxes)
  for i in range(4):
    np.testing.assert_allclose(batched[i], f(ys[i], proxes[i]), atol=1e-12)
  loss = lambda y, q, c: jnp.vdot(c, f(y, q))
  g_batched = jax.vmap(jax.grad(loss))(ys, proxes, cots)
  for i in range(4):
    np.testing.assert_allclose(g_batched[i], jax.grad(loss)(ys[i], proxes[i], cots[i]),
                               atol=1e-10)


def test_jit_and_eager_agree_and_do_not_retrace():
  y, prox, cot = problem(40, 8, seed=21)
  traces = []

  @jax.jit
  def step(a, q):
    traces.append(1)
    p = nc.nearest_etf(a, q)
    return p, jax.grad(lambda b: jnp.vdot(cot, nc.nearest_etf(b, q)))(a)

  p_jit, g_jit = step(y, prox)
  p_eager = nc.nearest_etf(y, prox)
  g_eager = jax.grad(lambda b: jnp.vdot(cot, nc.nearest_etf(b, prox)))(y)
  np.testing.assert_allclose(p_jit, p_eager, atol=1e-13)
  np.testing.assert_allclose(g_jit, g_eager, atol=1e-12)
  y2, prox2, _ = problem(40, 8, seed=22)
  step(y2, prox2)
  step(y, p_jit)
  assert len(traces) == 1
  # Eager calls reuse the compiled solver for new values of the same shape.
  size = solver._solve_jit._cache_size()
  nc.nearest_etf(y2, prox2)
  nc.nearest_etf(y, p_eager)
  assert solver._solve_jit._cache_size() == size


def test_dtypes_are_preserved():
  y, prox, cot = problem(16, 4, jnp.float32, seed=23)
  p = nc.nearest_etf(y, prox)
  g = jax.grad(lambda a: jnp.vdot(cot, nc.nearest_etf(a, prox)))(y)
  assert p.dtype == g.dtype == jnp.float32


@pytest.mark.slow
def test_large_problem_k1000():
  """d = 2048, K = 1000 in float32: forward and backward run and stay accurate."""
  d, k = 2048, 1000
  y, prox, cot = problem(d, k, jnp.float32, seed=24)
  p, vjp = jax.vjp(lambda a: nc.nearest_etf(a, prox), y)
  g = vjp(cot)[0]
  assert np.all(np.isfinite(g))
  assert float(stiefel.orthonormality_error(p)) < 1e-5
  b = solver.procrustes_target(y, prox, DELTA)
  s = np.asarray(p.T @ b, np.float64)
  assert np.abs(s - s.T).max() < 1e-5 * np.abs(s).max()


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #


def _good():
  y, prox, _ = problem(8, 3, seed=25)
  return y, prox


@pytest.mark.parametrize("call,match", [
    (lambda y, q: nc.nearest_etf(y[0], q), r"^means: expected a rank-2"),
    (lambda y, q: nc.nearest_etf(y[None], q), r"^means: expected a rank-2"),
    (lambda y, q: nc.nearest_etf(y[:, :1], q[:, :1]), r"^means.shape\[1\]: expected .*K >= 2, got 1"),
    (lambda y, q: nc.nearest_etf(y.T, q.T), r"^means: expected feature dimension d >= .*d=3, K=8"),
    (lambda y, q: nc.nearest_etf(y.at[0, 0].set(jnp.nan), q), r"^means: expected finite values"),
    (lambda y, q: nc.nearest_etf(y.at[0, 0].set(jnp.inf), q), r"^means: expected finite values"),
    (lambda y, q: nc.nearest_etf(y, q[:, :2]), r"^prox: expected shape \(8, 3\)"),
    (lambda y, q: nc.nearest_etf(y, 2 * q), r"^prox: expected orthonormal columns"),
    (lambda y, q: nc.nearest_etf(y, q.at[1, 1].set(jnp.nan)), r"^prox: expected finite"),
    (lambda y, q: nc.nearest_etf(y, q, method="newton"), r"^method: expected one of"),
    (lambda y, q: nc.nearest_etf(y, q, factorisation="lu"), r"^factorisation: expected one of"),
    (lambda y, q: nc.nearest_etf(y, q, delta=0.0), r"^delta: expected a positive"),
    (lambda y, q: nc.nearest_etf(y, q, delta=-1e-3), r"^delta: expected a positive"),
    (lambda y, q: nc.nearest_etf(y, q, method="rgd", tol=0.0), r"^tol: expected a positive"),
    (lambda y, q: nc.nearest_etf(y, q, max_iterations=0), r"^max_iterations: expected"),
    (lambda y, q: nc.nearest_etf(jnp.zeros((0, 3)), None), r"^means: expected feature dimension"),
    (lambda y, q: nc.nearest_etf("abc", None), r"^means: expected"),
    (lambda y, q: nc.normalise_means(jnp.ones((8, 3))), r"^class_means: expected class means that are not all equal"),
    (lambda y, q: nc.normalise_means(y, jnp.zeros(7)), r"^global_mean: expected shape \(8,\)"),
    (lambda y, q: nc.normalise_means(y.at[2, 2].set(jnp.nan)), r"^class_means: expected finite"),
    (lambda y, q: nc.feasibility_solution(y.T), r"^means: expected feature dimension"),
])
def test_bad_input_raises(call, match):
  y, prox = _good()
  with pytest.raises(ValueError, match=match):
    call(y, prox)


def test_shape_checks_still_apply_under_jit():
  y, prox = _good()
  with pytest.raises(ValueError, match=r"^prox: expected shape"):
    jax.jit(lambda a, q: nc.nearest_etf(a, q[:, :2]))(y, prox)


def test_dense_ddn_reference_keeps_float32():
  y, prox, cot = problem(12, 4, jnp.float32, seed=26)
  p = nc.nearest_etf(y, prox)
  g = reference_ddn.dense_ddn_vjp(y, prox, p, cot, DELTA, reference_ddn.constraint_constant(4))
  assert g.dtype == jnp.float32
