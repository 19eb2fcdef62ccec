"""Fused Pallas kernels of the matmul-only solve (nc_jax.pallas_newton_schulz).

On this CPU machine the kernels run in Pallas' interpret mode (the kernel body through
JAX), which checks the algorithm, the padding and the API; that they lower to Triton with
float32 (not TF32) products is checked on the Triton IR of a lowering for CUDA, which
needs no GPU and no CUDA plugin. Timing and the Triton compile itself need a GPU or the
deviceless compile (module docstring).
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from nc_jax import newton_schulz, pallas_newton_schulz as pns, solver, stiefel
from nc_jax._linalg import centre_columns

EPS32 = float(jnp.finfo(jnp.float32).eps)


def target(d, k, delta, seed=0):
  """float32 B = c·Ȳ·M + δ·P_prev of a training-like step (P_prev: the solution for a
  1e-3-perturbed Ȳ, as between consecutive steps; benchmarks/solver_accuracy.py)."""
  key_y, key_p = jax.random.split(jax.random.key(seed))
  y = solver.normalise_means(jax.random.normal(key_y, (d, k), jnp.float64))
  noise = jax.random.normal(key_p, (d, k), jnp.float64)
  y_prev = solver.normalise_means(y + 1e-3 * noise / jnp.linalg.norm(noise))
  prox = solver.nearest_etf(y_prev, solver.feasibility_solution(y_prev), delta=delta,
                            factorisation="svd")
  return solver.procrustes_target(y, prox, delta).astype(jnp.float32), y, prox


def polar64(b):
  u, _, vt = np.linalg.svd(np.asarray(b, np.float64), full_matrices=False)
  return u @ vt


def max_err(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# --------------------------------------------------------------------------- #
# Forward
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("d,k,delta", [(512, 10, 1e-3), (512, 10, 1e-4), (500, 32, 1e-3),
                                       (37, 5, 1e-2)])
def test_polar_is_the_xla_path(d, k, delta):
  """Same algorithm: same steps, scale, residual and inverse root as newton_schulz.polar to
  float32 rounding, and a polar factor as accurate as the XLA path's."""
  b, _, _ = target(d, k, delta)
  lower = solver.newton_schulz_bound(delta, k)
  want = newton_schulz.polar(b, lower)
  got = pns.polar(b, lower, interpret=True)
  assert got.factor.shape == (d, k) and got.inverse_root.shape == (k, k)
  assert got.factor.dtype == got.residual.dtype == jnp.float32
  assert int(got.steps) == int(want.steps)
  np.testing.assert_allclose(float(got.scale), float(want.scale), rtol=4 * EPS32)
  # The residual of the K×K problem alone (padding inside it would make it >= 1).
  assert newton_schulz.converged(got.residual)
  assert abs(float(got.residual) - float(want.residual)) <= 16 * EPS32
  ref = polar64(b)
  assert max_err(got.factor, ref) <= 2 * max(max_err(want.factor, ref), 8 * EPS32)
  root = np.asarray(want.inverse_root)
  assert max_err(got.inverse_root, root) <= 1e-4 * np.abs(root).max()


def test_polar_tight_on_a_well_conditioned_matrix():
  b = jax.random.normal(jax.random.key(1), (300, 12), jnp.float32)
  want = newton_schulz.polar(b, 0.5)
  got = pns.polar(b, 0.5, interpret=True)
  assert max_err(got.factor, want.factor) <= 4 * EPS32
  assert max_err(got.inverse_root, want.inverse_root) <= 8 * EPS32 * float(
      jnp.abs(want.inverse_root).max())
  assert abs(float(got.residual) - float(want.residual)) <= 4 * EPS32


def test_unrolled_schedule_and_given_scale():
  b, _, _ = target(64, 10, 1e-3)
  lower = solver.newton_schulz_bound(1e-3, 10)
  loop = pns.polar(b, lower, interpret=True)
  unrolled = pns.polar(b, lower, interpret=True, unroll=True)
  # Same arithmetic, compiled differently (XLA fuses the unrolled steps its own way).
  assert max_err(loop.factor, unrolled.factor) <= 1e-6
  assert max_err(loop.inverse_root, unrolled.inverse_root) <= 1e-5 * float(
      jnp.abs(loop.inverse_root).max())
  assert float(loop.scale) == float(unrolled.scale) and int(loop.steps) == int(unrolled.steps)
  assert abs(float(loop.residual) - float(unrolled.residual)) <= 8 * EPS32
  scaled = pns.polar(b, lower, scale=2 * loop.scale, interpret=True)
  want = newton_schulz.polar(b, lower, scale=2 * loop.scale)
  assert float(scaled.scale) == float(2 * loop.scale)
  assert max_err(scaled.factor, want.factor) <= 1e-5
  # A single classical step (empty schedule): the loop degenerates to the last step.
  one = pns.polar(b / loop.scale, 1.0, scale=1.0, interpret=True)
  assert int(one.steps) == 1
  assert max_err(one.factor, newton_schulz.polar(b / loop.scale, 1.0, scale=1.0).factor) <= 1e-6


def test_padding_is_invisible():
  """Padded rows and columns are zeros that never reach the outputs: a problem embedded
  with extra zero rows (d 40 → 64, same padded block) has the same factor on its rows and
  zeros below, and the residual is the K×K one."""
  b, _, _ = target(40, 6, 1e-2)
  got = pns.polar(b, 1e-3, interpret=True)
  taller = pns.polar(jnp.concatenate([b, jnp.zeros((24, 6), jnp.float32)]), 1e-3,
                     interpret=True)
  assert np.array_equal(np.asarray(taller.factor[40:]), np.zeros((24, 6)))
  assert max_err(taller.factor[:40], got.factor) <= 2 * EPS32
  p = np.asarray(got.factor, np.float64)
  assert np.abs(p.T @ p - np.eye(6)).max() <= 1e-6
  assert float(got.residual) < 1e-5


def test_a_bound_that_does_not_hold_shows_in_the_residual():
  """σ_min/s = 1e-5 with a schedule sized for 1e-2: the residual says so, as the XLA
  path's does (same iteration)."""
  b = _matrix_with_spectrum(256, 10, kappa=1e5).astype(jnp.float32)
  want = newton_schulz.polar(b, 1e-2)
  got = pns.polar(b, 1e-2, interpret=True)
  assert not newton_schulz.converged(got.residual)
  np.testing.assert_allclose(float(got.residual), float(want.residual), rtol=1e-3)
  assert newton_schulz.converged(pns.polar(b, 1e-6, interpret=True).residual)


def _matrix_with_spectrum(d, k, kappa, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  u = stiefel.random_point(k1, d, k, jnp.float64)
  v = stiefel.random_point(k2, k, k, jnp.float64)
  return (u * jnp.geomspace(1.0, 1.0 / kappa, k)) @ v.T


# --------------------------------------------------------------------------- #
# Lyapunov solve and backward
# --------------------------------------------------------------------------- #


def _backward_problem(d, k, delta, seed=0):
  b, y, prox = target(d, k, delta, seed)
  lower = solver.newton_schulz_bound(delta, k)
  fwd = newton_schulz.polar(b, lower)
  g = solver.normalise_means(jax.random.normal(jax.random.key(seed + 7), (d, k),
                                               jnp.float64)).astype(jnp.float32)
  return b, y, prox, g, lower, fwd


@pytest.mark.parametrize("k,delta", [(10, 1e-3), (32, 1e-4)])
def test_lyapunov_is_the_xla_path(k, delta):
  b, _, _, g, lower, fwd = _backward_problem(128, k, delta)
  s = jnp.asarray(np.asarray(fwd.factor, np.float64).T @ np.asarray(b, np.float64))
  s = (0.5 * (s + s.T)).astype(jnp.float32)
  a = fwd.factor.T @ g
  c = a - a.T
  for scale in (fwd.scale, None):
    want = newton_schulz.lyapunov(s, c, lower, scale=scale)
    got = pns.lyapunov(s, c, lower, scale=scale, interpret=True)
    assert got.solution.shape == (k, k) and int(got.steps) == int(want.steps)
    sol = np.abs(np.asarray(want.solution)).max()
    assert max_err(got.solution, want.solution) <= 1e-4 * sol
    assert abs(float(got.residual) - float(want.residual)) <= 8 * EPS32
    y = np.asarray(got.solution, np.float64)
    s64 = np.asarray(s, np.float64)
    assert np.abs(s64 @ y + y @ s64 - np.asarray(c)).max() <= 1e-4 * np.abs(c).max()


@pytest.mark.parametrize("k,delta", [(10, 1e-4), (32, 1e-3)])
def test_polar_vjp_is_the_solver_backward(k, delta):
  """Same backward as the solver's: the gradient the solver returns (∂L/∂B centred, as
  ∂L/∂Ȳ = c·(∂L/∂B)·M) as accurate against float64 as the XLA path's."""
  b, _, _, g, lower, fwd = _backward_problem(300, k, delta)
  want = solver.polar_vjp_newton_schulz(fwd.factor, b, g, lower,
                                        inverse_root=fwd.inverse_root, scale=fwd.scale)
  got, residual = pns.polar_vjp(fwd.factor, b, g, lower, inverse_root=fwd.inverse_root,
                                scale=fwd.scale, interpret=True)
  assert got.shape == (300, k) and got.dtype == jnp.float32
  assert newton_schulz.converged(residual)
  p64 = jnp.asarray(polar64(b))
  exact = np.asarray(centre_columns(solver.polar_vjp(p64, b.astype(jnp.float64),
                                                     g.astype(jnp.float64))))
  err = lambda x: float(np.linalg.norm(np.asarray(centre_columns(x), np.float64) - exact)
                        / np.linalg.norm(exact))
  assert err(got) <= 2 * max(err(want), 1e-6)
  assert err(want) <= 1e-5


def test_polar_factor_gradient_is_the_solvers():
  """``polar_factor`` inside the solver's composition (B from Ȳ, then the polar factor)
  gives nearest_etf's newton_schulz value and gradient."""
  delta, k = 1e-3, 10
  b, y, prox, g, lower, _ = _backward_problem(64, k, delta)
  y32, prox32 = y.astype(jnp.float32), prox.astype(jnp.float32)
  c = 2.0 / math.sqrt(k - 1)

  def fused(y):
    p, _ = pns.polar_factor(c * centre_columns(y) + delta * prox32, lower, True)
    return jnp.vdot(g, p)

  def xla(y):
    return jnp.vdot(g, solver.nearest_etf(y, prox32, delta=delta,
                                          factorisation="newton_schulz"))

  (v1, g1), (v2, g2) = jax.value_and_grad(fused)(y32), jax.value_and_grad(xla)(y32)
  assert abs(float(v1) - float(v2)) <= 1e-5
  assert max_err(g1, g2) <= 1e-5 * np.abs(np.asarray(g2)).max()
  p, residual = jax.jit(pns.polar_factor, static_argnums=(1, 2))(b, lower, True)
  assert newton_schulz.converged(residual) and p.shape == (64, k)


# --------------------------------------------------------------------------- #
# Triton lowering: float32 products, not TF32
# --------------------------------------------------------------------------- #


def _triton_dots(fn, *args):
  """The ``tt.dot`` lines of every Triton kernel in ``fn`` lowered for CUDA (no GPU
  needed: the Pallas lowering serialises the Triton IR into the custom call)."""
  from jax._src.lib.mlir import ir  # pylint: disable=import-outside-toplevel
  from jax._src.pallas.triton import lowering  # pylint: disable=import-outside-toplevel
  lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  calls = []

  def walk(op):
    for region in op.regions:
      for block in region:
        for inner in block:
          if inner.name == "stablehlo.custom_call":
            calls.append(inner)
          walk(inner)

  walk(lowered.compiler_ir().operation)
  dots = []
  for call in calls:
    raw = ir.StringAttr(call.attributes["mhlo.backend_config"]["ir"]).value_bytes
    with lowering._new_ir_context():  # pylint: disable=protected-access
      asm = str(ir.Module.parse(raw))
    dots += [line.strip() for line in asm.splitlines() if "tt.dot" in line]
  return len(calls), dots


@pytest.fixture
def target_gpu_info(monkeypatch):
  """jax ≥ 0.11's Pallas-Triton lowering asks an attached GPU for its compute capability;
  with none attached, answer as an H100 would (benchmarks/gpu_program.py does the same)."""
  try:
    from jax._src.pallas.triton import gpu_info  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  version = getattr(gpu_info, "gpu_version_from_device_kind", lambda _: None)(
      "NVIDIA H100 80GB HBM3")
  if version is not None:
    monkeypatch.setattr(gpu_info, "get_gpu_info",
                        lambda: gpu_info.get_gpu_info_from_version(version))


@pytest.mark.usefixtures("target_gpu_info")
def test_kernels_lower_to_triton_with_float32_products():
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  lower = solver.newton_schulz_bound(1e-3, 10)
  calls, dots = _triton_dots(lambda b, g: jax.grad(
      lambda b: jnp.vdot(g, pns.polar_factor(b, lower)[0]))(b), f32(500, 10), f32(500, 10))
  assert calls == 2 and dots  # forward and backward kernels
  # Triton prints the default inputPrecision (ieee) not at all, TF32 as "tf32".
  assert not [line for line in dots if "inputPrecision" in line], dots
  assert all(re.search(r"tensor<\d+x\d+xf32> \* tensor<\d+x\d+xf32>", line) for line in dots)
  calls, dots = _triton_dots(lambda s, c: pns.lyapunov(s, c, lower).solution,
                             f32(10, 10), f32(10, 10))
  assert calls == 1 and dots and not [line for line in dots if "inputPrecision" in line]

  def tf32_control(x):  # the same lowering with DEFAULT precision: TF32
    def kernel(x_ref, o_ref):
      o_ref[...] = lax.dot_general(x_ref[...], x_ref[...], (((0,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)
    from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32),
                          compiler_params=plgpu.CompilerParams())(x)

  _, dots = _triton_dots(tf32_control, f32(64, 16))
  assert dots and all("inputPrecision = tf32" in line for line in dots)


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


def test_shape_and_dtype_errors():
  ok = jnp.ones((64, 10), jnp.float32)
  with pytest.raises(ValueError, match=r"^b: expected a \(d, K\) matrix with d >= K, got "
                                       r"shape \(4, 10\)"):
    pns.polar(jnp.ones((4, 10), jnp.float32), 0.1)
  with pytest.raises(ValueError, match=r"^b: expected a \(d, K\) matrix .* got shape \(64,\)"):
    pns.polar(jnp.ones((64,), jnp.float32), 0.1)
  with pytest.raises(ValueError, match=r"^b.shape\[1\]: expected 1 to 32 columns \(K\) "
                                       r"for the fused kernel, got 33"):
    pns.polar(jnp.ones((64, 33), jnp.float32), 0.1)
  with pytest.raises(ValueError, match=r"^b: expected padded d × padded K <= 16384 .* "
                                       r"got shape \(2000, 10\) -> 2048 × 16"):
    pns.polar(jnp.ones((2000, 10), jnp.float32), 0.1)
  with pytest.raises(ValueError, match=r"^b: expected float32 \(the kernel's dtype\), "
                                       r"got float64"):
    pns.polar(ok.astype(jnp.float64), 0.1)
  with pytest.raises(ValueError, match=r"^b: expected finite values"):
    pns.polar(ok.at[0, 0].set(jnp.nan), 0.1)
  with pytest.raises(ValueError, match=r"^b: expected a full-column-rank matrix, got all "
                                       r"zeros"):
    pns.polar(jnp.zeros((64, 10), jnp.float32), 0.1)
  with pytest.raises(ValueError, match=r"^scale: expected a scalar, got shape \(2,\)"):
    pns.polar(ok, 0.1, scale=jnp.ones(2))
  with pytest.raises(ValueError, match=r"^lower: expected a bound in \(0, 1\]"):
    pns.polar(ok, 0.0)
  eye = jnp.eye(10, dtype=jnp.float32)
  with pytest.raises(ValueError, match=r"^s: expected a square \(K, K\) matrix, got shape "
                                       r"\(10, 9\)"):
    pns.lyapunov(eye[:, :9], eye, 0.1)
  with pytest.raises(ValueError, match=r"^c: expected shape \(10, 10\), got \(2, 10, 10\)"):
    pns.lyapunov(eye, jnp.stack([eye, eye]), 0.1)
  with pytest.raises(ValueError, match=r"^g: expected shape \(64, 10\), got \(64, 9\)"):
    pns.polar_vjp(ok, ok, ok[:, :9], 0.1, inverse_root=eye, scale=1.0)
  with pytest.raises(ValueError, match=r"^inverse_root: expected shape \(10, 10\), got "
                                       r"\(9, 9\)"):
    pns.polar_vjp(ok, ok, ok, 0.1, inverse_root=eye[:9, :9], scale=1.0)


def test_padded_side():
  assert [pns.padded_side(n) for n in (1, 10, 16, 17, 32, 500, 512)] == [
      16, 16, 16, 32, 32, 512, 512]
  assert pns.lyapunov_num_warps(10) == 4 and pns.lyapunov_num_warps(32) == 8
