r"""The nearest simplex ETF: exact solver with an implicit (Lyapunov) VJP.

Problem (docs/method.md §2, §3). Given unit-Frobenius centred class means
:math:`\bar Y \in \mathbb R^{d\times K}` and the previous solution
:math:`P_{prev} \in St(d,K)`, find

.. math::
   P^\star = \arg\min_{P \in St(d,K)} \|\bar Y - P\tilde M\|_F^2
             + \tfrac{\delta}{2}\|P - P_{prev}\|_F^2,
   \qquad \tilde M = M/\sqrt{K-1}.

On the Stiefel manifold :math:`\operatorname{tr}(P^TPM)` and :math:`\|P\|_F^2` are
constant, so the cost equals :math:`\text{const} - \operatorname{tr}(P^TB)` with

.. math::
   B = c\,\bar Y M + \delta P_{prev}, \qquad c = 2/\sqrt{K-1},

an orthogonal Procrustes problem whose unique minimiser (rank B = K, generic for
:math:`\delta > 0`) is the polar factor :math:`P^\star = UV^T` of :math:`B = U\Sigma V^T`.

Two solvers compute it:

* ``method="polar"``: the closed form, by a choice of factorisation
  (``"svd"``; ``"eigh"``: the eigenvectors of the K×K Gram matrix plus a graded
  refinement, the CPU default; ``"qdwh"``: the QR-based dynamically weighted Halley
  iteration; ``"newton_schulz"``: scaled Newton–Schulz with a fixed schedule, matrix
  products only, forward and backward — :mod:`nc_jax.newton_schulz`, fused Pallas kernels
  on NVIDIA GPUs at small K — the GPU default; ``"auto"`` chooses per compile platform).
* ``method="rgd"``: Riemannian gradient descent on :math:`St(d,K)` with the
  sign-fixed QR retraction, warm-started at :math:`P_{prev}`, Barzilai–Borwein
  trial steps and Armijo backtracking (monotone decrease), stopped on the
  Riemannian gradient norm.

Backward (both methods, one ``jax.custom_vjp``). Write :math:`B = PS` with
:math:`S = P^TB = (B^TB)^{1/2} = V\Sigma V^T` (the optimality condition says
:math:`P^TB` is symmetric positive definite). Differentiating :math:`B = PS`
gives the tangent part :math:`\Omega = P^T dP` from the Lyapunov equation
:math:`S\Omega + \Omega S = P^TdB - dB^TP` and the normal part
:math:`(I - PP^T)dP = (I-PP^T)\,dB\,S^{-1}`. Its adjoint, for
:math:`\bar G = \partial L/\partial P` and :math:`A = P^T\bar G`, is

.. math::
   \frac{\partial L}{\partial B} = P\,V\tilde\Omega V^T + (\bar G - PA)\,S^{-1},
   \qquad \tilde\Omega_{ij} = \frac{(V^TAV)_{ij} - (V^TAV)_{ji}}{\sigma_i + \sigma_j},

and :math:`\partial L/\partial\bar Y = c\,(\partial L/\partial B)\,M`. In the
original basis :math:`V\tilde\Omega V^T` is the solution :math:`\Omega'` of
:math:`S\Omega' + \Omega'S = A - A^T`: ``"newton_schulz"`` solves it (and
:math:`S^{-1}`, from :math:`SY + YS = 2I`) by products only; the other choices
diagonalise S with one K×K ``eigh``. Only
:math:`1/(\sigma_i+\sigma_j) \le 1/(2\sigma_{min})` appears, never the
:math:`1/(\sigma_i^2-\sigma_j^2)` of an SVD derivative, so it stays finite at
neural collapse where the singular values of :math:`\bar YM` coincide. Cost
:math:`O(dK^2 + K^3)` time and :math:`O(dK + K^2)` memory, versus the official
dense DDN backward's :math:`O(dK^5)` and :math:`O(dK^3)`. The previous solution
:math:`P_{prev}` receives no gradient (it is gradient-free state, as in the
official code).

All products use ``Precision.HIGHEST``: TF32 would lose the
:math:`\delta`-direction, whose conditioning is ~1/δ.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from nc_jax import _validation as v
from nc_jax import newton_schulz, pallas_newton_schulz, stiefel
from nc_jax._linalg import centre_columns, mm, mtm, skew, sym
from nc_jax.geometry import frobenius_normalise

METHODS = ("polar", "rgd")
FACTORISATIONS = ("svd", "eigh", "qdwh", "newton_schulz")
FACTORISATION_CHOICES = ("auto",) + FACTORISATIONS
# "auto", per platform of the compiled program (``lax.platform_dependent``, resolved when
# XLA compiles for the device, never from the host's default backend): on GPUs the
# matmul-only solve, the only one with no cuSOLVER call, no loop and no host
# synchronisation (BUILD_NOTES §2b); on CPU the eigh path, 0.9× a plain
# eigh-of-the-Gram solve and more accurate than the SVD (§2c). Platforms not listed (TPU:
# not measured) get AUTO_DEFAULT.
AUTO_FACTORISATION = types.MappingProxyType({"cpu": "eigh", "cuda": "newton_schulz",
                                             "rocm": "newton_schulz"})
AUTO_DEFAULT = "svd"
DEFAULT_DELTA = 1e-3


class SolverInfo(NamedTuple):
  """Diagnostics of one solve (no gradient).

  Attributes:
    iterations: int32 scalar; RGD, QDWH or Newton–Schulz iterations, else 0.
    grad_norm: scalar, Frobenius norm of the Riemannian gradient
      :math:`P\\,\\mathrm{sym}(P^TB) - B` at the returned point (0 = optimal).
    residual: scalar, the Newton–Schulz certificate :math:`\\max|X^TX - I|` before
      the final step (:func:`nc_jax.newton_schulz.polar`); 0 for the other solvers.
    converged: bool scalar. Newton–Schulz: ``residual`` ≤ √eps (its fixed schedule
      reached the polar factor); RGD: the gradient tolerance was met before
      ``max_iterations`` or the rounding floor stopped it; the direct factorisations:
      True. False whenever the result is not finite.
  """
  iterations: jax.Array
  grad_norm: jax.Array
  residual: jax.Array
  converged: jax.Array


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static solver settings (hashable: a ``nondiff_argnums`` argument)."""
  delta: float
  method: str
  factorisation: str
  tol: float
  max_iterations: int

  @property
  def matmul_only(self) -> bool:
    """The matmul-only forward and backward (factorisation ``"newton_schulz"``)."""
    return self.method == "polar" and self.factorisation == "newton_schulz"


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #


def normalise_means(class_means: jax.Array, global_mean: jax.Array | None = None) -> jax.Array:
  r"""Turns per-class means into the solver's input, as the paper does.

  .. math::
     \bar Y = \frac{\mu_{1:K} - \mu_G 1^T}{\|\mu_{1:K} - \mu_G 1^T\|_F}

  (centring by the global mean, then Frobenius normalisation). Differentiable.

  Args:
    class_means: ``(d, K)``, column k the mean feature of class k.
    global_mean: ``(d,)`` global feature mean :math:`\mu_G` (the official layer
      uses the batch mean over samples). ``None`` uses the mean of the class
      means (equal for balanced classes).

  Returns:
    ``(d, K)`` array with unit Frobenius norm.
  """
  class_means = v.as_float_array("class_means", class_means)
  v.check_ndim("class_means", class_means, 2, "(d, K) of class means")
  v.check_num_classes("class_means.shape[1]", class_means.shape[1])
  v.check_finite("class_means", class_means)
  if global_mean is None:
    centred = centre_columns(class_means)
  else:
    global_mean = v.as_float_array("global_mean", global_mean)
    if global_mean.shape != class_means.shape[:1]:
      raise ValueError(f"global_mean: expected shape ({class_means.shape[0]},), "
                       f"got {tuple(global_mean.shape)}")
    v.check_finite("global_mean", global_mean)
    centred = class_means - global_mean[:, None]
  if v.is_concrete(centred) and not float(jnp.linalg.norm(centred)) > 0:
    raise ValueError("class_means: expected class means that are not all equal "
                     "(the centred means are zero, so they cannot be normalised)")
  return frobenius_normalise(centred)


def nearest_etf(
    means: jax.Array,
    prox: jax.Array | None = None,
    *,
    delta: float = DEFAULT_DELTA,
    method: str = "polar",
    factorisation: str = "auto",
    tol: float | None = None,
    max_iterations: int = 5000,
    return_info: bool = False,
):
  r"""Nearest simplex ETF to ``means``: :math:`P^\star \in St(d,K)` (module docstring).

  The classifier of the implicit-ETF head is then
  :math:`W = \sqrt{K/(K-1)}\,M P^{\star T}`.

  Args:
    means: ``(d, K)`` solver input :math:`\bar Y` (see :func:`normalise_means`),
      float32 or float64, ``d >= K >= 2``. Receives the implicit gradient.
    prox: ``(d, K)`` previous solution :math:`P_{prev}` with orthonormal columns
      (no gradient). ``None`` solves the feasibility problem (δ = 0) of the
      first training step: its minimisers are :math:`U_{K-1}V_{K-1}^T + u v^T`
      (:math:`v = 1/\sqrt K`, any unit :math:`u \perp \mathrm{range}(\bar YM)`)
      with unique :math:`PM`; the one nearest the official start
      :math:`I_{d,K}` is returned, and its gradient is that of the proximal
      problem with :math:`P_{prev} = P_{feas}` (whose solution is
      :math:`P_{feas}` itself), as in the official code.
    delta: proximal weight δ > 0 (paper: 1e-3).
    method: ``"polar"`` (exact closed form) or ``"rgd"`` (Riemannian gradient
      descent from ``prox``).
    factorisation: for ``method="polar"``: ``"svd"``, ``"eigh"`` (:func:`eigh_schedule`),
      ``"qdwh"``, ``"newton_schulz"`` (matrix products only, forward and backward, a fixed
      schedule: no cuSOLVER/LAPACK call, no loop; see :func:`newton_schulz_bound`) or
      ``"auto"`` (:data:`AUTO_FACTORISATION`, chosen inside the compiled program for the
      platform it is compiled for: ``"newton_schulz"`` on GPUs, ``"eigh"`` on CPU). All
      agree to float32 rounding; they differ in speed.
    tol: RGD stop on the Riemannian gradient norm, relative to
      :math:`\|B\|_F`; default ``4·eps`` of the dtype (the gradient's rounding
      floor is ~1–2 eps; float32 at K = 10 needs ``tol=eps`` for 1e-5 agreement
      with the closed form).
    max_iterations: RGD iteration cap.
    return_info: also return a :class:`SolverInfo`.

  Returns:
    ``P`` of shape ``(d, K)`` with orthonormal columns, or ``(P, info)``.

  Raises:
    ValueError: bad shapes, K < 2, d < K, non-finite input, ``prox`` not
      orthonormal, unknown ``method``/``factorisation``, δ ≤ 0; on concrete inputs, a
      matmul-only solve whose fixed schedule did not converge (means far from unit norm).
      Value checks run on concrete inputs; under a caller's ``jit`` only shapes are
      checked, and ``return_info=True`` gives ``info.converged``.
  """
  means = v.check_means_matrix("means", means, "(d, K) of normalised class means")
  d, k = means.shape
  if prox is not None:
    prox = v.as_float_array("prox", prox)
    if prox.shape != means.shape:
      raise ValueError(f"prox: expected shape {tuple(means.shape)} (same as means), "
                       f"got {tuple(prox.shape)}")
    v.check_finite("prox", prox)
    v.check_orthonormal_columns("prox", prox)
    prox = prox.astype(means.dtype)
  if method not in METHODS:
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
  check_factorisation(factorisation)
  if not (isinstance(delta, (int, float)) and delta > 0):
    raise ValueError(f"delta: expected a positive Python float, got {delta!r}")
  if tol is None:
    tol = 4.0 * float(jnp.finfo(means.dtype).eps)
  if not tol > 0:
    raise ValueError(f"tol: expected a positive float, got {tol!r}")
  if int(max_iterations) < 1:
    raise ValueError(f"max_iterations: expected an integer >= 1, got {max_iterations!r}")
  config = _Config(float(delta), method, factorisation, float(tol), int(max_iterations))
  if prox is None:
    prox = lax.stop_gradient(_feasible_point(means))
  p, iterations, grad_norm, residual, converged = _solve_dispatch(config, means, prox)
  if config.method == "polar" and v.is_concrete(converged) and not bool(converged):
    raise ValueError(
        f"means: the matmul-only nearest-ETF solve did not converge in its fixed schedule "
        f"(residual {float(residual):.2e} > {newton_schulz.tolerance(means.dtype):.1e}): "
        f"σ_min(B) is below the bound δ/16 the schedule is sized for; expected "
        f"unit-Frobenius-norm means (normalise_means), got norm "
        f"{float(jnp.linalg.norm(means)):.3g}. Use factorisation='svd' for other inputs.")
  if return_info:
    return p, SolverInfo(iterations, grad_norm, residual, converged)
  return p


def check_factorisation(factorisation: str) -> None:
  """Raises ``ValueError`` unless ``factorisation`` is one of :data:`FACTORISATION_CHOICES`."""
  if factorisation not in FACTORISATION_CHOICES:
    raise ValueError(f"factorisation: expected one of {FACTORISATION_CHOICES}, "
                     f"got {factorisation!r}")


def resolve_factorisation(factorisation: str, platform: str | None = None) -> str:
  """The factorisation ``factorisation`` runs as on ``platform`` (``"auto"`` → per platform).

  ``"auto"`` is not resolved on the host: :func:`nearest_etf` stages every choice of
  :data:`AUTO_FACTORISATION` with ``lax.platform_dependent`` and XLA keeps the one of the
  platform it compiles for (so a program compiled for a GPU on a CPU host takes the GPU
  path). This function names that choice, e.g. for run records.

  Args:
    factorisation: one of :data:`FACTORISATION_CHOICES`.
    platform: ``"cpu"``, ``"cuda"``, ``"rocm"``, ``"tpu"`` (``"gpu"`` means the
      backend's GPU platform); default ``jax.default_backend()``.

  Returns:
    One of :data:`FACTORISATIONS`: ``"newton_schulz"`` on GPUs, ``"svd"`` elsewhere for
    ``"auto"``.
  """
  check_factorisation(factorisation)
  if factorisation != "auto":
    return factorisation
  platform = platform or jax.default_backend()
  platform = {"gpu": "cuda"}.get(platform, platform)  # CUDA and ROCm choose alike
  return AUTO_FACTORISATION.get(platform, AUTO_DEFAULT)


def feasibility_solution(means: jax.Array) -> jax.Array:
  r"""Minimiser of :math:`\|\bar Y - P\tilde M\|_F^2` nearest :math:`I_{d,K}` (no gradient).

  See ``prox=None`` in :func:`nearest_etf`. Shape ``(d, K)``.
  """
  means = v.check_means_matrix("means", means, "(d, K) of normalised class means")
  return _feasible_point(means)


# --------------------------------------------------------------------------- #
# Forward solvers
# --------------------------------------------------------------------------- #


def procrustes_target(y: jax.Array, prox: jax.Array, delta: float) -> jax.Array:
  r""":math:`B = c\bar YM + \delta P_{prev}` (:math:`c = 2/\sqrt{K-1}`), the matrix whose
  polar factor is the nearest ETF (module docstring). Shapes ``(d, K)``; public for studies
  of the problem's conditioning (its singular values: ``benchmarks.solver_accuracy``)."""
  k = y.shape[-1]
  c = 2.0 / jnp.sqrt(jnp.asarray(k - 1.0, y.dtype))
  return c * centre_columns(y) + delta * prox


@jax.jit
def _feasible_point(y: jax.Array) -> jax.Array:
  """Closed-form feasibility minimiser nearest I_{d,K} (docs/method.md §5)."""
  d, k = y.shape
  b0 = centre_columns(y)  # c > 0 does not change the polar factor
  u, _, vt = jnp.linalg.svd(b0, full_matrices=False)
  u1, vt1 = u[:, : k - 1], vt[: k - 1]
  ones = jnp.full((k,), 1.0 / jnp.sqrt(k), y.dtype)
  # Free column: u ∝ (I − U₁U₁ᵀ)·I_{d,K}·v maximises tr(PᵀI_{d,K}).
  e = jnp.zeros((d,), y.dtype).at[:k].set(ones)
  w = e - mm(u1, mtm(u1, e[:, None]))[:, 0]
  w_norm = jnp.linalg.norm(w)
  # Degenerate only if I_{d,K}v lies in range(ȲM): then any orthogonal unit vector
  # is optimal; the K-th left singular vector is one.
  w = jnp.where(w_norm > jnp.sqrt(jnp.finfo(y.dtype).eps), w / w_norm, u[:, k - 1])
  # Remove the v-component from the rank-(K−1) part so that P·v = u exactly.
  vt1 = vt1 - jnp.outer(mm(vt1, ones[:, None])[:, 0], ones)
  p = mm(u1, vt1) + jnp.outer(w, ones)
  return stiefel.newton_schulz_step(p)  # against rounding


# Every factorisation: (B, δ) ↦ _Polar. δ sizes the schedule of the matmul-only one.


class _Polar(NamedTuple):
  p: jax.Array               # (d, K) polar factor of B
  iterations: jax.Array      # () int32
  residual: jax.Array        # () the Newton–Schulz certificate; 0 for direct factorisations
  backward: tuple            # what the backward needs besides (P, B): () or (S⁻¹, scale)


def _direct(p, iterations=None):
  zero = jnp.zeros((), p.dtype)
  iterations = jnp.zeros((), jnp.int32) if iterations is None else iterations
  return _Polar(p, iterations, zero, ())


def _polar_svd(b, delta):
  del delta
  u, s, vt = jnp.linalg.svd(b, full_matrices=False)
  return _direct(mm(u, vt))


EIGH_SCHEDULE = ((0.03, 2, 1), (0.1, 3, 2), (0.3, 6, 3), (1.0, 10, 5))
"""``factorisation="eigh"``: (bound on q, refinement steps, backward Jacobi sweeps), the first
row whose bound holds (:func:`eigh_schedule`); measured on a scan of sizes, δ and problem
kinds (BUILD_NOTES §2c)."""


def eigh_schedule(delta: float, num_classes: int, dtype) -> tuple[int, int] | None:
  r"""Static ``(steps, sweeps)`` of ``factorisation="eigh"``, or None: the SVD instead.

  :math:`q = \varepsilon c^2/\delta^2` (:math:`c = 2/\sqrt{K-1}`) bounds the correlation
  between two columns of :math:`W = B\hat V` when several singular values of B sit near δ
  (σ_max(B) ≲ c, σ_min(B) ≈ δ): the refinement converges at about that rate per step, so it
  needs more steps as q grows and is not trusted beyond q = 1 (float32: δ < 2.3e-4 at
  K = 10, < 6.9e-5 at K = 100), where the problem goes to the SVD.
  """
  q = float(jnp.finfo(dtype).eps) * (4.0 / (num_classes - 1)) / (delta * delta)
  for bound, steps, sweeps in EIGH_SCHEDULE:
    if q <= bound:
      return steps, sweeps
  return None


def _polar_eigh(b, delta):
  r"""Polar factor from one eigh of BᵀB — its eigenvectors only — and a graded refinement.

  :math:`B^TB = \hat V\Lambda\hat V^T`. Λ carries the κ(B)² rounding error and is not
  used. :math:`W = B\hat V` has nearly orthogonal columns :math:`\approx\sigma_iu_i`, and
  :math:`X = W^TW`, formed from W, is accurate relative to :math:`n_in_j` (:math:`n_i =
  \|w_i\|`, which equals :math:`\sigma_i` to ~κε, not κ²ε). Exactly,
  :math:`\mathrm{polar}(B) = WX^{-1/2}\hat V^T`; :math:`Y \approx X^{-1/2}` comes from
  chord steps :math:`Y \leftarrow Y + \mathrm{sym}((I - YXY)_{ij}/(n_i+n_j))` started at
  :math:`Y = N^{-1}`, each kept (``jnp.where``, no branch) only if it lowers
  :math:`\max|I - YXY|`. The first step orthogonalises a small column against the large
  ones with weights :math:`n_i/(n_i+n_j)`; a Newton–Schulz step would apply Löwdin's ½ and
  leave an O(κε) error in the singular subspaces. Backward residuals for
  :func:`polar_vjp_eigh`: (V̂, Z = sym(XY) ≈ V̂ᵀSV̂, T = YV̂ᵀ, n). Where
  :func:`eigh_schedule` says the refinement cannot be trusted, the SVD.
  """
  k, dtype = b.shape[-1], b.dtype
  schedule = eigh_schedule(delta, k, dtype)
  if schedule is None:
    return _polar_svd(b, delta)
  steps, _ = schedule
  eps = jnp.finfo(dtype).eps
  eye = jnp.eye(k, dtype=dtype)
  _, vecs = jnp.linalg.eigh(mtm(b, b))
  w = mm(b, vecs)
  x = mtm(w, w)
  idx = jnp.arange(k)
  n2 = x[idx, idx]                         # (jnp.diagonal lowers to a conditional)
  n = jnp.sqrt(jnp.maximum(n2, (eps * eps) * jnp.max(n2)))
  denom = n[:, None] + n[None, :]
  y = eye / n
  xy = x / n[None, :]
  resid = eye - x / (n[:, None] * n[None, :])
  res = jnp.max(jnp.abs(resid))
  for _ in range(steps):
    y_new = y + sym(resid / denom)
    xy_new = mm(x, y_new)
    resid_new = eye - sym(mm(y_new, xy_new))
    res_new = jnp.max(jnp.abs(resid_new))
    keep = res_new < res
    y, xy, resid, res = (jnp.where(keep, a, c) for a, c in
                         ((y_new, y), (xy_new, xy), (resid_new, resid), (res_new, res)))
  t = mm(y, vecs.T)
  return _Polar(mm(w, t), jnp.asarray(steps, jnp.int32), jnp.zeros((), dtype),
                (vecs, sym(xy), t, n))


def _polar_qdwh(b, delta):
  del delta
  u, _, iterations, _ = lax.linalg.qdwh(b)
  return _direct(u, jnp.asarray(iterations, jnp.int32))


BOUND_MARGIN = 64.0
"""Safety factor of :func:`newton_schulz_bound`: the fixed schedule converges for any
σ_min(B) ≥ δ/16 (one factor 4 for σ_min ≥ δ/16, one for ‖B‖₂ ≤ s ≤ ‖B‖_F)."""


def newton_schulz_bound(delta: float, num_classes: int) -> float:
  r"""Lower bound of :math:`\sigma_{min}(B)/s` that sizes the fixed Newton–Schulz schedule.

  :math:`B = c\bar YM + \delta P_{prev}` maps the direction :math:`v = 1/\sqrt K`
  (which M annihilates) to :math:`\delta P_{prev}v`, so :math:`\sigma_{min}(B) \le
  \delta`; in training-like problems it stays within a factor 0.6–1 of δ (BUILD_NOTES
  §2b; a square problem with a random P_prev reached 0.04δ). With
  :math:`\|\bar Y\|_F = 1`, the scale satisfies :math:`s \le \|B\|_F \le c +
  \delta\sqrt K`. The bound :math:`\delta/(64(c + \delta\sqrt K))`
  (:data:`BOUND_MARGIN`) covers :math:`\sigma_{min}(B) \ge \delta/16` with a further
  factor 4 to spare, at three steps more than a bound at δ itself; anything below shows in
  the solve's residual (:class:`SolverInfo`), which the training step counts.

  Accuracy (float32, BUILD_NOTES §2b): at least the SVD path's at δ ≥ 1e-4 for every K
  measured; at δ = 1e-5 with K ≈ 10 (κ(B) ≈ 2.5e4) the gradient is ~100× less accurate than
  the SVD path's (the polynomial iteration cannot isolate S's 1/δ direction as an
  eigendecomposition does): pass ``factorisation="svd"`` there.
  """
  c = 2.0 / math.sqrt(num_classes - 1)
  return min(1.0, delta / (BOUND_MARGIN * (c + delta * math.sqrt(num_classes))))


PALLAS_MAX_CLASSES = 16
"""Largest K whose matmul-only solve runs as fused Pallas (Triton) kernels on NVIDIA GPUs
(:mod:`nc_jax.pallas_newton_schulz`: the whole forward, and the whole backward, one kernel
each, on one SM). Beyond it, and for other dtypes, XLA's GEMMs, which use the whole GPU.
Unmeasured on a GPU: 16 is where the per-step work of one block is still small (§2d)."""


def _pallas_fits(b: jax.Array) -> bool:
  """Static: the Pallas kernels take this (d, K) float32 problem."""
  d, k = b.shape
  return (b.dtype == jnp.float32 and k <= PALLAS_MAX_CLASSES
          and pallas_newton_schulz.padded_side(d) * pallas_newton_schulz.padded_side(k)
          <= pallas_newton_schulz.MAX_BLOCK)


def _polar_newton_schulz(b, delta):
  lower = newton_schulz_bound(delta, b.shape[-1])
  xla = lambda b: newton_schulz.polar(b, lower)
  if _pallas_fits(b):  # same algorithm, fused, on NVIDIA GPUs; XLA elsewhere
    out = lax.platform_dependent(b, cuda=lambda b: pallas_newton_schulz.polar(b, lower),
                                 default=xla)
  else:
    out = xla(b)
  return _Polar(out.factor, out.steps, out.residual, (out.inverse_root, out.scale))


_POLAR = {"svd": _polar_svd, "eigh": _polar_eigh, "qdwh": _polar_qdwh,
          "newton_schulz": _polar_newton_schulz}


def _rgd(b: jax.Array, x0: jax.Array, tol: float, max_iterations: int):
  r"""Riemannian gradient descent with QR retraction for min −tr(XᵀB) on St(d,K).

  Trial step: alternating Barzilai–Borwein steps (Wen & Yin 2013), the first
  :math:`1/\|B\|_F \le 1/\sigma_{max}(B)`. Each step is then halved until the
  Armijo condition :math:`f(R_X(-tg)) \le f(X) - 10^{-4}\,t\|g\|^2` holds, so
  the cost decreases monotonically (Absil, Mahony & Sepulchre 2008, Thm 4.3.1:
  limit points are critical). Decreases are evaluated as
  :math:`\operatorname{tr}((X_{new}-X)^TB)` from the accurately computed
  retraction increment (:func:`nc_jax.stiefel.qr_retraction_increment`), so
  the test stays meaningful down to the rounding floor of the gradient. Stops when
  :math:`\|g\|_F \le tol\cdot\|B\|_F`, at ``max_iterations``, or when no step of
  the line search decreases the cost (rounding floor).

  Non-finite input (NaN or inf in ``B``, i.e. in the means or ``prox`` under a
  caller's ``jit``, where the value checks cannot run) or a norm
  :math:`\|B\|_F` that overflows the dtype gives an all-NaN ``X``, as the polar
  path does. Otherwise the loop's condition (a comparison with NaN) is False at
  once and ``x0``, the previous frame, would come back unchanged: a silently
  stale result.

  Returns:
    ``(X, iterations)``: ``(d, K)`` and a scalar int32.
  """
  dtype = b.dtype
  b_norm = jnp.linalg.norm(b)
  solvable = jnp.isfinite(b_norm)  # False for any NaN/inf in B, or if ‖B‖ overflows
  t_first = 1.0 / b_norm
  threshold = tol * b_norm
  armijo = 1e-4
  max_halvings = 40

  def line_search(x, g, g_sq, t0):
    def trial(t):
      step = stiefel.qr_retraction_increment(x, -t * g)
      return step, jnp.vdot(step, b)  # cost decrease f(X) − f(X_new), accurate

    def cond(c):
      t, _, gain, n = c
      return (gain < armijo * t * g_sq) & (n < max_halvings)

    def body(c):
      t, _, _, n = c
      t = 0.5 * t
      return (t, *trial(t), n + 1)

    t, step, gain, _ = lax.while_loop(cond, body, (t0, *trial(t0), 0))
    ok = gain >= armijo * t * g_sq
    # The Armijo test measured the descent alone; undo rounding drift afterwards.
    return t, stiefel.newton_schulz_step(x + step), ok

  def cond(state):
    _, g, _, _, _, it, stalled = state
    return (jnp.linalg.norm(g) > threshold) & (it < max_iterations) & ~stalled

  def body(state):
    x, g, x_prev, g_prev, t_prev, it, _ = state
    s, y = x - x_prev, g - g_prev
    sy, ss, yy = jnp.abs(jnp.vdot(s, y)), jnp.vdot(s, s), jnp.vdot(y, y)
    bb = jnp.where(it % 2 == 0, ss / jnp.maximum(sy, 1e-300), sy / jnp.maximum(yy, 1e-300))
    t0 = jnp.where((it == 0) | (sy <= 0) | ~jnp.isfinite(bb), t_prev, bb)
    t0 = jnp.clip(t0, 1e-6 * t_first, 1e6 * t_first).astype(dtype)
    g_sq = jnp.vdot(g, g)
    t, x_new, ok = line_search(x, g, g_sq, t0)
    x_next = jnp.where(ok, x_new, x)
    g_next = jnp.where(ok, stiefel.riemannian_gradient(x_new, -b), g)
    return x_next, g_next, x, g, t, it + 1, ~ok

  g0 = stiefel.riemannian_gradient(x0, -b)
  init = (x0, g0, x0, g0, t_first.astype(dtype), jnp.zeros((), jnp.int32), jnp.zeros((), bool))
  x, g, _, _, _, it, _ = lax.while_loop(cond, body, init)
  return jnp.where(solvable, x, jnp.full_like(x, jnp.nan)), it


def _forward(config: _Config, y: jax.Array, prox: jax.Array):
  """Outputs ``(P, iterations, grad_norm, residual, converged)``; residuals for the VJP."""
  b = procrustes_target(y, prox, config.delta)
  if config.method == "polar":
    out = _POLAR[config.factorisation](b, config.delta)
    converged = (newton_schulz.converged(out.residual) if config.matmul_only
                 else jnp.ones((), bool))
  else:
    x, iterations = _rgd(b, prox, config.tol, config.max_iterations)
    out = _direct(x, iterations)
    converged = iterations < config.max_iterations
  grad_norm = jnp.linalg.norm(stiefel.riemannian_gradient(out.p, -b))
  converged = converged & jnp.isfinite(grad_norm)  # a non-finite result is never converged
  return (out.p, out.iterations, grad_norm, out.residual, converged), (out.p, b, out.backward)


# --------------------------------------------------------------------------- #
# Implicit backward
# --------------------------------------------------------------------------- #


def polar_vjp(p: jax.Array, b: jax.Array, g: jax.Array) -> jax.Array:
  r"""Adjoint of :math:`B \mapsto \mathrm{polar}(B)` at ``(P, B)`` applied to ``g``.

  Implements the module-docstring formula with :math:`S = \mathrm{sym}(P^TB)`
  diagonalised by one K×K ``eigh`` (never differentiated). Symmetrising
  makes it the exact adjoint at the optimum and a consistent one at an
  approximate optimum (RGD to tolerance).

  Shapes: ``p``, ``b``, ``g``: ``(d, K)``. Returns ``(d, K)``.
  """
  sig, vecs = jnp.linalg.eigh(sym(mtm(p, b)))
  # κ(B) ≳ 1/eps: the smallest computed eigenvalue can be ≤ 0 (NaN gradients before the floor).
  sig = jnp.maximum(sig, jnp.finfo(sig.dtype).eps * sig[-1])
  a = mtm(p, g)                                    # K×K, PᵀḠ
  av = mm(a, vecs)                                 # A V
  a_eig = mtm(vecs, av)                            # Vᵀ A V
  denom = sig[:, None] + sig[None, :]
  omega = (a_eig - a_eig.T) / denom                # skew, 1/(σᵢ+σⱼ) only
  t = vecs.T / sig[:, None]                        # Σ⁻¹Vᵀ: S⁻¹ = V·t, applied factored
  tangent = mm(vecs, mm(omega, vecs.T)) - mm(av, t)
  return mm(p, tangent) + mm(mm(g, vecs), t)


def polar_vjp_eigh(p: jax.Array, g: jax.Array, vecs: jax.Array, z: jax.Array, t: jax.Array,
                   n: jax.Array, sweeps: int) -> jax.Array:
  r""":func:`polar_vjp` from the residuals of ``factorisation="eigh"`` (no second eigh).

  With :math:`S = \hat VZ\hat V^T` and :math:`S^{-1} = \hat VT` from the forward, the
  Lyapunov equation becomes :math:`Z\tilde\Omega + \tilde\Omega Z = \hat V^T(A -
  A^T)\hat V`, solved by ``sweeps`` Jacobi sweeps on :math:`Z = \mathrm{diag}(n) + F`
  (F = 0 in exact arithmetic, so the VJP is exact at the optimum), each clipped far above
  any legitimate value so that it stays finite; :math:`S^{-1}` is applied factored.

  Shapes: ``p``, ``g``: ``(d, K)``; ``vecs``, ``z``, ``t``: ``(K, K)``; ``n``: ``(K,)``.
  """
  a = mtm(p, g)
  av = mm(a, vecs)
  a_eig = mtm(vecs, av)
  rhs = a_eig - a_eig.T
  denom = n[:, None] + n[None, :]
  bound = jnp.linalg.norm(rhs) / (2.0 * jnp.finfo(p.dtype).eps * jnp.max(n))
  omega = rhs / denom
  f = z - jnp.eye(n.shape[0], dtype=n.dtype) * n
  for _ in range(sweeps):
    omega = jnp.clip((rhs - mm(f, omega) - mm(omega, f)) / denom, -bound, bound)
  tangent = mm(vecs, mm(omega, vecs.T)) - mm(av, t)
  return mm(p, tangent) + mm(mm(g, vecs), t)


def polar_vjp_newton_schulz(p: jax.Array, b: jax.Array, g: jax.Array, lower: float, *,
                            inverse_root: jax.Array | None = None,
                            scale: jax.Array | None = None) -> jax.Array:
  r""":func:`polar_vjp` by matrix products only (no eigendecomposition, no loop).

  Solves :math:`S\Omega' + \Omega'S = A - A^T` with
  :func:`nc_jax.newton_schulz.lyapunov` and returns
  :math:`P\Omega' + (\bar G - PA)\,S^{-1}`, with :math:`S^{-1}` refined by one Newton
  step :math:`Y(2I - SY)` (it carried most of the rounding error: float32 gradients were
  3–4× less accurate than eigh's without it, level with it).

  Args:
    p, b, g: ``(d, K)``: the polar factor, B, and the cotangent :math:`\bar G`.
    lower: static lower bound of :math:`\lambda_{min}(S)/s` (the forward's bound).
    inverse_root: ``(K, K)`` :math:`S^{-1}` from the forward
      (:attr:`nc_jax.newton_schulz.Polar.inverse_root`); without it the Lyapunov solve
      takes :math:`2I` as a second right-hand side to compute it.
    scale: ``()`` the forward's scale s; the iteration then repeats the forward's scalar
      recurrence exactly, so the forward's residual certifies this solve too.

  Accuracy in float32: level with :func:`polar_vjp` for the cotangents the ETF head
  produces (:math:`\bar G\,1 = 0`: W depends on PM only); a cotangent with a component along
  :math:`P1/\sqrt K` meets :math:`S^{-1}`'s 1/δ eigenvalue, where this inverse is less
  accurate than the eigendecomposition's (BUILD_NOTES §2b).

  Returns ``(d, K)``.
  """
  k = p.shape[-1]
  two_eye = 2.0 * jnp.eye(k, dtype=p.dtype)
  sa = mtm(p, jnp.concatenate([b, g], axis=1))       # [PᵀB | PᵀḠ], one product
  s, a = sym(sa[:, :k]), sa[:, k:]
  if inverse_root is None:
    y = newton_schulz.lyapunov(s, jnp.stack([two_eye, a - a.T]), lower, scale=scale).solution
    s_inv, omega = sym(y[0]), skew(y[1])
  else:
    omega = skew(newton_schulz.lyapunov(s, a - a.T, lower, scale=scale).solution)
    s_inv = sym(inverse_root)
  s_inv = sym(mm(s_inv, two_eye - mm(s, s_inv)))
  # S⁻¹ = S⁻¹M + (S⁻¹1)1ᵀ/K. Its 1/δ eigenvalue lies (nearly) along 1 = the kernel of M, so
  # R = S⁻¹M has moderate entries and one Newton correction R + S⁻¹(M − SR) makes it
  # accurate; the rank-one rest carries the rounding of the 1/δ part, but only along 1ᵀ,
  # which the centring of ∂L/∂Ȳ = c·(∂L/∂B)·M removes (a dense S⁻¹ spread it everywhere: 6×
  # the float32 gradient error).
  r = centre_columns(s_inv)
  r = r + mm(s_inv, centre_columns(jnp.eye(k, dtype=p.dtype)) - mm(s, r))
  ones_part = jnp.mean(s_inv, axis=1, keepdims=True)  # S⁻¹1/K, the rank-one rest: (·)1ᵀ

  def apply_s_inv(x):
    return mm(x, r) + mm(x, ones_part)

  return mm(p, omega - apply_s_inv(a)) + apply_s_inv(g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _solve(config: _Config, y: jax.Array, prox: jax.Array):
  return _forward(config, y, prox)[0]


def _solve_fwd(config, y, prox):
  return _forward(config, y, prox)


def _solve_bwd(config, residuals, cotangents):
  p, b, backward = residuals
  g = cotangents[0]
  k = p.shape[-1]
  c = 2.0 / jnp.sqrt(jnp.asarray(k - 1.0, p.dtype))
  if config.matmul_only:
    lower = newton_schulz_bound(config.delta, k)
    xla = lambda p, b, g, q, s: polar_vjp_newton_schulz(p, b, g, lower, inverse_root=q,
                                                        scale=s)
    if _pallas_fits(b):
      fused = lambda p, b, g, q, s: pallas_newton_schulz.polar_vjp(
          p, b, g, lower, inverse_root=q, scale=s)[0]
      grad_b = lax.platform_dependent(p, b, g, *backward, cuda=fused, default=xla)
    else:
      grad_b = xla(p, b, g, *backward)
  elif backward:  # factorisation="eigh" where its schedule applies
    grad_b = polar_vjp_eigh(p, g, *backward,
                            sweeps=eigh_schedule(config.delta, k, p.dtype)[1])
  else:
    grad_b = polar_vjp(p, b, g)
  grad_y = c * centre_columns(grad_b)
  # P_prev is gradient-free state (official code): zero cotangent.
  return grad_y, jnp.zeros_like(p)


_solve.defvjp(_solve_fwd, _solve_bwd)
# Compiled once per (config, shape, dtype); inside a caller's jit this inlines.
_solve_jit = jax.jit(_solve, static_argnums=0)


def _solve_dispatch(config: _Config, y: jax.Array, prox: jax.Array):
  """``_solve`` with ``factorisation="auto"`` staged per platform (:data:`AUTO_FACTORISATION`).

  ``lax.platform_dependent`` traces every branch; lowering for one platform keeps only
  its branch, so the compiled program holds no conditional.
  """
  if config.method != "polar" or config.factorisation != "auto":
    return _solve_jit(config, y, prox)
  branch = lambda f: functools.partial(_solve_jit, dataclasses.replace(config, factorisation=f))
  branches = {platform: branch(f) for platform, f in AUTO_FACTORISATION.items()}
  return lax.platform_dependent(y, prox, default=branch(AUTO_DEFAULT), **branches)
