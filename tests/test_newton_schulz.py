"""Matmul-only polar factor and Lyapunov solve (nc_jax.newton_schulz), and the solver's use of them."""

import math

import jax
import jax.test_util  # noqa: F401  (check_grads)
import jax.numpy as jnp
import numpy as np
import pytest

import nc_jax as nc
from nc_jax import newton_schulz, solver, stiefel

EPS32 = float(jnp.finfo(jnp.float32).eps)


def matrix_with_spectrum(d, k, kappa, seed=0, dtype=jnp.float64):
  """U diag(σ) Vᵀ with σ geometric from 1 down to 1/κ, Haar U (d×K) and V (K×K)."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  u = stiefel.random_point(k1, d, k, jnp.float64)
  v = stiefel.random_point(k2, k, k, jnp.float64)
  sig = jnp.geomspace(1.0, 1.0 / kappa, k)
  return (u * sig) @ v.T, u @ v.T


def spd_with_spectrum(k, kappa, seed=0):
  v = stiefel.random_point(jax.random.PRNGKey(seed), k, k, jnp.float64)
  lam = jnp.geomspace(1.0, 1.0 / kappa, k)
  return (v * lam) @ v.T, lam, v


# --------------------------------------------------------------------------- #
# Schedule
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("lower", [0.5, 1e-2, 1e-3, 1e-6])
def test_schedule_maps_the_whole_interval_near_one(dtype, lower):
  alphas = newton_schulz.schedule(lower, dtype)
  assert all(a >= b >= 1.0 for a, b in zip(alphas, alphas[1:]))
  x = np.concatenate([np.geomspace(lower, 1.0, 2001), [1.0 / alphas[0]]])
  for a in alphas:
    x = 0.5 * a * x * (3.0 - a * a * x * x)
  tol = math.sqrt(float(jnp.finfo(dtype).eps)) / 4
  assert x.min() >= 1 - tol - 1e-12 and x.max() <= 1 + 1e-12


def test_schedule_lengths_and_bad_bounds():
  n = [len(newton_schulz.schedule(lo, jnp.float32)) for lo in (1e-1, 1e-3, 1e-5, 1e-7)]
  assert n == sorted(n) and n[1] <= 12 and n[-1] <= 23  # 2.25x growth per step for small values
  uncapped = [len(newton_schulz.schedule(lo, jnp.float32, cap=math.sqrt(3)))
              for lo in (1e-1, 1e-3, 1e-5, 1e-7)]
  assert uncapped[1] <= 11 and uncapped[-1] <= 21  # Chen & Chow: ~2.6x
  assert newton_schulz.schedule(1.0, jnp.float32) == ()
  for bad in (0.0, -1e-3, 1.5):
    with pytest.raises(ValueError, match=r"^lower: expected a bound in \(0, 1\]"):
      newton_schulz.schedule(bad, jnp.float32)
  with pytest.raises(ValueError, match=r"^cap: expected a scaling factor in \[1, sqrt\(3\)\]"):
    newton_schulz.schedule(1e-3, jnp.float32, cap=2.0)


def test_capped_schedule_never_maps_large_values_low():
  """The cap is what keeps float32 accuracy (BUILD_NOTES §2b): a singular value near 1 is
  never sent below f_1.5(1) = 0.5625, where the uncapped first step sends it to ~1e-3."""
  alphas = newton_schulz.schedule(1e-4, jnp.float32)
  assert max(alphas) == newton_schulz.ALPHA_CAP == 1.5
  x = np.geomspace(0.3, 1.0, 500)
  for a in alphas:
    x = 0.5 * a * x * (3.0 - a * a * x * x)
    assert x.min() >= 0.5625 - 1e-12
  a = newton_schulz.schedule(1e-4, jnp.float32, cap=math.sqrt(3))[0]
  assert 0.5 * a * (3.0 - a * a) < 1e-3


# --------------------------------------------------------------------------- #
# Polar factor
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kappa", [1.0, 10.0, 1e3, 1e6])
def test_polar_float64_matches_closed_form(kappa):
  b, want = matrix_with_spectrum(40, 7, kappa)
  out = jax.jit(newton_schulz.polar, static_argnums=1)(b, 1.0 / (2 * kappa))
  np.testing.assert_allclose(out.factor, want, atol=1e-14 * max(kappa, 10.0), rtol=0)
  assert float(stiefel.orthonormality_error(out.factor)) < 1e-14
  assert int(out.steps) == len(newton_schulz.schedule(1.0 / (2 * kappa), jnp.float64)) + 1
  assert bool(newton_schulz.converged(out.residual))
  # The accumulated inverse root: P = B·Q and Q = (BᵀB)^(-1/2).
  _, sig, vt = jnp.linalg.svd(b, full_matrices=False)
  inv_root = (vt.T / sig) @ vt
  np.testing.assert_allclose(out.inverse_root, inv_root,
                             atol=1e-13 * kappa * float(jnp.abs(inv_root).max()), rtol=0)
  np.testing.assert_allclose(b @ out.inverse_root, out.factor, atol=1e-12 * kappa, rtol=0)


@pytest.mark.parametrize("kappa", [10.0, 1e3, 1e4])
def test_polar_float32_is_as_accurate_as_conditioning_allows(kappa):
  b, want = matrix_with_spectrum(256, 10, kappa, seed=1)
  p = newton_schulz.polar(b.astype(jnp.float32), 1.0 / (2 * kappa)).factor
  err = float(jnp.abs(p.astype(jnp.float64) - want).max())
  assert p.dtype == jnp.float32
  assert err <= 2 * kappa * EPS32  # perturbation bound of the polar factor: κ·eps
  assert float(stiefel.orthonormality_error(p)) < 10 * EPS32


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_polar_residual_shows_a_bound_that_does_not_hold(dtype):
  """The schedule is fixed; a σ_min below the bound is left unconverged, and the residual
  (free: the final step's Gram matrix) says so. A bound that holds certifies."""
  b, want = matrix_with_spectrum(30, 6, 1e4, seed=2)
  b = b.astype(dtype)
  bad = newton_schulz.polar(b, 0.5)
  assert not bool(newton_schulz.converged(bad.residual)) and float(bad.residual) > 0.1
  good = newton_schulz.polar(b, 1e-4 / 4)
  assert bool(newton_schulz.converged(good.residual))
  assert float(good.residual) <= newton_schulz.tolerance(dtype)
  assert not bool(newton_schulz.converged(jnp.asarray(jnp.nan, dtype)))


def test_polar_at_equal_singular_values():
  """Neural collapse: all singular values equal, the scaled input is already orthonormal."""
  b = 0.3 * stiefel.random_point(jax.random.PRNGKey(3), 20, 5, jnp.float64)
  p = newton_schulz.polar(b, 1e-3).factor
  np.testing.assert_allclose(p, b / 0.3, atol=1e-15, rtol=0)


def test_polar_vmap_equals_loop():
  bs = jnp.stack([matrix_with_spectrum(16, 4, 10.0 ** i, seed=i)[0] for i in range(3)])
  batched = jax.vmap(lambda b: newton_schulz.polar(b, 1e-4))(bs)
  for i in range(3):
    single = newton_schulz.polar(bs[i], 1e-4)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(batched)):
      np.testing.assert_allclose(b[i], a, atol=1e-15, rtol=0)


def test_shape_errors():
  with pytest.raises(ValueError, match=r"^b: expected a \(d, K\) matrix with d >= K, got shape \(3, 5\)"):
    newton_schulz.polar(jnp.ones((3, 5)), 0.1)
  with pytest.raises(ValueError, match=r"^s: expected a square"):
    newton_schulz.lyapunov(jnp.ones((3, 4)), jnp.ones((3, 4)), 0.1)
  with pytest.raises(ValueError, match=r"^c: expected shape \(\.\.\., 3, 3\), got \(2, 3, 4\)"):
    newton_schulz.lyapunov(jnp.eye(3), jnp.ones((2, 3, 4)), 0.1)
  # Values that would give NaN are refused (concrete inputs).
  with pytest.raises(ValueError, match=r"^b: expected a full-column-rank matrix, got all zeros"):
    newton_schulz.polar(jnp.zeros((4, 2)), 0.1)
  with pytest.raises(ValueError, match=r"^b: expected finite values"):
    newton_schulz.polar(jnp.full((4, 2), jnp.nan), 0.1)
  with pytest.raises(ValueError, match=r"^s: expected a positive definite matrix"):
    newton_schulz.lyapunov(jnp.zeros((3, 3)), jnp.eye(3), 0.1)
  with pytest.raises(ValueError, match=r"^c: expected finite values"):
    newton_schulz.lyapunov(jnp.eye(3), jnp.full((3, 3), jnp.inf), 0.1)


# --------------------------------------------------------------------------- #
# Lyapunov equation
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kappa", [1.0, 1e2, 1e5])
def test_lyapunov_float64_matches_eigenbasis_solution(kappa):
  k = 9
  s, lam, v = spd_with_spectrum(k, kappa)
  s = 0.37 * s
  lam = 0.37 * lam
  rng = np.random.default_rng(0)
  c = jnp.asarray(rng.standard_normal((3, k, k)))
  c = c.at[1].set(c[1] - c[1].T).at[2].set(2 * jnp.eye(k))   # general, skew, 2I
  out = jax.jit(newton_schulz.lyapunov, static_argnums=2)(s, c, 1 / (2 * kappa))
  y, iterations = out.solution, out.steps
  assert bool(newton_schulz.converged(out.residual))
  want = jnp.einsum("ij,bjk,lk->bil", v, jnp.einsum("ji,bjk,kl->bil", v, c, v)
                    / (lam[:, None] + lam[None, :]), v)
  scale = float(jnp.abs(want).max())
  np.testing.assert_allclose(y, want, atol=1e-13 * kappa * scale, rtol=0)
  np.testing.assert_allclose(y[2], jnp.linalg.inv(s), atol=1e-13 * kappa * scale, rtol=0)
  residual = s @ y + y @ s - c
  assert float(jnp.abs(residual).max()) < 1e-12 * max(kappa, 10.0)
  assert int(iterations) == len(newton_schulz.schedule(1 / (2 * kappa), jnp.float64)) + 1


def test_lyapunov_residual_shows_a_bound_that_does_not_hold():
  s, lam, v = spd_with_spectrum(6, 1e3, seed=5)
  c = jnp.asarray(np.random.default_rng(1).standard_normal((6, 6)))
  assert not bool(newton_schulz.converged(newton_schulz.lyapunov(s, c, 0.9).residual))
  out = newton_schulz.lyapunov(s, c, 1e-3 / 2)
  assert bool(newton_schulz.converged(out.residual))
  np.testing.assert_allclose(s @ out.solution + out.solution @ s, c, atol=1e-10, rtol=0)


def test_lyapunov_with_the_polar_scale_repeats_the_polar_recurrence():
  """The solver's backward passes the forward's scale: S = PᵀB then has the scaled spectrum
  the forward iterated on, so the forward's residual certifies the backward."""
  b, p = matrix_with_spectrum(40, 6, 300.0, seed=12)
  fwd = newton_schulz.polar(b, 1e-3)
  s = p.T @ b
  c = jnp.asarray(np.random.default_rng(2).standard_normal((6, 6)))
  c = c - c.T
  out = newton_schulz.lyapunov(s, c, 1e-3, scale=fwd.scale)
  np.testing.assert_allclose(s @ out.solution + out.solution @ s, c, atol=1e-11, rtol=0)
  assert out.steps == fwd.steps
  assert bool(newton_schulz.converged(fwd.residual)) and bool(newton_schulz.converged(out.residual))
  # A bound that does not hold: both lag by the same scalar recurrence (the smallest value
  # ends at f < 1: 1 − f² in the forward's XᵀX, 1 − f in the backward's S), and both say so.
  fwd = newton_schulz.polar(b, 0.05)
  out = newton_schulz.lyapunov(s, c, 0.05, scale=fwd.scale)
  assert not bool(newton_schulz.converged(fwd.residual))
  assert not bool(newton_schulz.converged(out.residual))


# --------------------------------------------------------------------------- #
# Inside the solver: factorisation="newton_schulz"
# --------------------------------------------------------------------------- #


def problem(d, k, dtype=jnp.float64, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  y = jax.random.normal(k1, (d, k), dtype)
  prox = stiefel.random_point(k2, d, k, dtype)
  cot = jax.random.normal(k3, (d, k), dtype)
  return y / jnp.linalg.norm(y), prox, cot - cot.mean(1, keepdims=True)


def grad_of(factorisation, y, prox, cot):
  return jax.grad(lambda a: jnp.vdot(cot, nc.nearest_etf(a, prox, factorisation=factorisation)))(y)


@pytest.mark.parametrize("d,k", [(10, 5), (64, 10), (128, 40)])
def test_matmul_only_vjp_equals_eigh_vjp_float64(d, k):
  y, prox, cot = problem(d, k, seed=6)
  want = grad_of("svd", y, prox, cot)
  got = grad_of("newton_schulz", y, prox, cot)
  np.testing.assert_allclose(got, want, atol=1e-11 * float(jnp.abs(want).max()), rtol=0)


def test_matmul_only_vjp_matches_finite_differences():
  d, k = 24, 6
  y, prox, cot = problem(d, k, seed=7)
  f = lambda a: jnp.vdot(cot, nc.nearest_etf(a, prox, factorisation="newton_schulz"))
  jax.test_util.check_grads(f, (y,), order=1, modes=["rev"], atol=1e-8, rtol=1e-6, eps=1e-6)


@pytest.mark.parametrize("d,k,delta", [(512, 10, 1e-3), (512, 10, 1e-4), (512, 100, 1e-3)])
def test_float32_forward_and_backward_accuracy(d, k, delta):
  """float32 against the float64 closed form, next to the SVD/eigh path's own error."""
  y, prox, cot = problem(d, k, seed=8)
  want_p = nc.nearest_etf(y, prox, delta=delta)
  want_g = jax.grad(lambda a: jnp.vdot(cot, nc.nearest_etf(a, prox, delta=delta)))(y)
  y32, prox32, cot32 = (a.astype(jnp.float32) for a in (y, prox, cot))
  errors = {}
  for f in ("svd", "newton_schulz"):
    p = nc.nearest_etf(y32, prox32, delta=delta, factorisation=f)
    g = jax.grad(lambda a: jnp.vdot(cot32, nc.nearest_etf(a, prox32, delta=delta,
                                                          factorisation=f)))(y32)
    errors[f] = (float(jnp.abs(p - want_p).max()),
                 float(jnp.linalg.norm(g - want_g) / jnp.linalg.norm(want_g)))
  # At least the SVD path's accuracy, both directions (BUILD_NOTES §2b: the capped schedule in
  # correction form forward; S⁻¹ applied as S⁻¹M + (S⁻¹1)1ᵀ/K backward).
  assert errors["newton_schulz"][0] <= errors["svd"][0]
  assert errors["newton_schulz"][1] <= errors["svd"][1]


def test_float32_gradient_along_p_ones():
  """A cotangent with a component along P·1 (the ETF head never produces one) meets S⁻¹'s
  1/δ eigenvalue: within 2x of the SVD path's error there (measured 4.3e-5 vs 7.3e-5)."""
  d, k, delta = 512, 10, 1e-3
  y, prox, _ = problem(d, k, seed=8)
  cot = jnp.zeros((d, k)).at[:, :3].set(1.0)
  want = jax.grad(lambda a: jnp.vdot(cot, nc.nearest_etf(a, prox, delta=delta)))(y)
  y32, prox32, cot32 = (a.astype(jnp.float32) for a in (y, prox, cot))
  err = {}
  for f in ("svd", "newton_schulz"):
    g = jax.grad(lambda a: jnp.vdot(cot32, nc.nearest_etf(a, prox32, delta=delta,
                                                          factorisation=f)))(y32)
    err[f] = float(jnp.linalg.norm(g - want) / jnp.linalg.norm(want))
  assert err["newton_schulz"] <= 2 * err["svd"]


def test_unnormalised_means_are_refused_or_reported():
  """Means 1e3 larger than the unit-norm input the bound assumes: σ_min(B)/s is 1e3 below
  the bound, which the fixed schedule cannot reach. Concrete inputs raise; under jit the
  info says so (and the training step counts it)."""
  y, prox, _ = problem(64, 10, seed=9)
  with pytest.raises(ValueError, match=r"^means: the matmul-only nearest-ETF solve did not "
                     r"converge.*expected unit-Frobenius-norm means.*got norm 1e\+03"):
    nc.nearest_etf(1e3 * y, prox, factorisation="newton_schulz")
  solve = jax.jit(lambda a: nc.nearest_etf(a, prox, factorisation="newton_schulz",
                                           return_info=True))
  _, info = solve(1e3 * y)
  assert not bool(info.converged) and float(info.residual) > 1e-3
  _, info = solve(y)
  bound = solver.newton_schulz_bound(solver.DEFAULT_DELTA, 10)
  assert bool(info.converged)
  assert int(info.iterations) == len(newton_schulz.schedule(bound, jnp.float64)) + 1
  # Twice the unit norm is within the margin.
  assert bool(solve(2 * y)[1].converged)


def test_no_linear_algebra_library_call_no_loop_no_conditional():
  """The point of the method: only dots and elementwise ops — no LAPACK/cuSOLVER custom
  call, no loop, no conditional — in forward and backward. (The GPU program itself is
  checked by tests/test_gpu_program.py.)"""
  y, prox, cot = problem(128, 10, dtype=jnp.float32, seed=10)

  def compiled(factorisation):
    f = lambda a: jnp.vdot(cot, nc.nearest_etf(a, prox, factorisation=factorisation))
    return jax.jit(jax.value_and_grad(f)).lower(y).compile().as_text()

  text = compiled("newton_schulz")
  assert "custom_call" not in text
  assert "conditional(" not in text and " while(" not in text
  assert "custom_call" in compiled("svd")  # the check can see a LAPACK call when there is one
  assert " while(" in compiled("qdwh")     # … and a loop


def test_implicit_head_with_matmul_only_solver_trains_like_svd():
  """Three implicit-head train steps: the same losses and parameters as with the SVD."""
  from tests.test_train import setup  # noqa: PLC0415  (shared tiny model)
  from nc_jax import train  # noqa: PLC0415

  states = {}
  for f in ("svd", "newton_schulz"):
    model, cfg, tx, state, x, y = setup("implicit", dtype=jnp.float64, factorisation=f)
    step = train.compile_train_step(None, model=model, tx=tx, head_config=cfg)
    for i in range(3):
      state, metrics = step(state, x[32 * i:32 * (i + 1)], y[32 * i:32 * (i + 1)])
    states[f] = (state, metrics)
  for a, b in zip(jax.tree.leaves(states["svd"]), jax.tree.leaves(states["newton_schulz"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-11)


# --------------------------------------------------------------------------- #
# factorisation="auto"
# --------------------------------------------------------------------------- #


def test_auto_factorisation_per_platform():
  assert solver.resolve_factorisation("auto", "gpu") == "newton_schulz"
  assert solver.resolve_factorisation("auto", "cuda") == "newton_schulz"
  assert solver.resolve_factorisation("auto", "rocm") == "newton_schulz"
  assert solver.resolve_factorisation("auto", "cpu") == solver.AUTO_FACTORISATION["cpu"]
  assert solver.resolve_factorisation("auto", "tpu") == "svd"      # not measured: the SVD
  assert solver.resolve_factorisation("qdwh", "gpu") == "qdwh"
  assert solver.resolve_factorisation("auto") == solver.AUTO_FACTORISATION["cpu"]  # this process
  with pytest.raises(ValueError, match=r"^factorisation: expected one of \('auto', 'svd'"):
    solver.resolve_factorisation("lu")


def test_auto_is_chosen_inside_the_compiled_program():
  """"auto" is a platform_dependent choice: the CPU program is the CPU factorisation's,
  with no conditional left (the GPU program: tests/test_gpu_program.py)."""
  y, prox, cot = problem(64, 10, dtype=jnp.float32, seed=13)

  def program(factorisation):
    f = lambda a: jnp.vdot(cot, nc.nearest_etf(a, prox, factorisation=factorisation))
    return jax.jit(jax.value_and_grad(f))

  auto, cpu = program("auto"), program(solver.AUTO_FACTORISATION["cpu"])
  assert "conditional(" not in auto.lower(y).compile().as_text()
  for a, b in zip(auto(y), cpu(y)):
    np.testing.assert_array_equal(a, b)


def test_default_is_auto_everywhere():
  from nc_jax import config, heads  # noqa: PLC0415
  import inspect  # noqa: PLC0415

  assert inspect.signature(nc.nearest_etf).parameters["factorisation"].default == "auto"
  assert heads.HeadConfig("implicit", 10, 16).factorisation == "auto"
  assert config.TrainConfig().factorisation == "auto"
  y, prox, _ = problem(32, 6, dtype=jnp.float32, seed=11)
  np.testing.assert_array_equal(
      nc.nearest_etf(y, prox),
      nc.nearest_etf(y, prox, factorisation=solver.AUTO_FACTORISATION["cpu"]))
