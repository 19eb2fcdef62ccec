r"""Fused Pallas (Triton) kernels for the small-K matmul-only polar factor and its backward.

Why. :mod:`nc_jax.newton_schulz` runs the nearest-ETF solve with matrix products only, so
XLA compiles it into one CUDA graph without loops, conditionals or cuSOLVER calls. At the
paper's size (d = 512, K = 10) that graph still holds ~175 small kernels (forward and
backward of ~17 Newton–Schulz steps, a few GEMM and elementwise kernels each), and at
~1–2 µs per graph node the solve costs a few hundred µs of launch latency for a few µs
of arithmetic. For small K the whole problem fits one thread block (a 512×16 float32
iterate is 32 KB: 32 values per thread at 8 warps), so here the forward is ONE kernel
and the backward ONE kernel; the iterate stays in registers from the first Gram product
to the certificate. Deviceless H100 compile of ``value_and_grad`` of
:math:`\langle G, \mathrm{polar}(c\bar YM + \delta P_{prev})\rangle` at (512, 10): one
CUDA graph of 5 kernels (B, forward, backward, the centring of the gradient, the loss)
instead of 177 (208 at K = 32).

What. Same algorithm and operation order as the XLA path, so results agree with it to
float32 rounding (only the summation order inside products differs):

* :func:`polar` is :func:`nc_jax.newton_schulz.polar`: the capped Chen–Chow schedule
  :func:`nc_jax.newton_schulz.schedule` plus one classical step, each step
  :math:`X \leftarrow X + X(M_k - I)`, :math:`Q \leftarrow Q + Q(M_k - I)` with
  :math:`M_k - I = (\tfrac32\alpha_k - 1)I - \tfrac12\alpha_k^3X^TX`, the first step's
  Gram matrix :math:`B^TB/s^2`, and the residual :math:`\max|X^TX - I|` before the last
  step.
* :func:`lyapunov` is :func:`nc_jax.newton_schulz.lyapunov` for one right-hand side
  (the block sign iteration on K×K blocks, five products per step).
* :func:`polar_vjp` is the whole of :func:`nc_jax.solver.polar_vjp_newton_schulz` given
  the forward's :math:`S^{-1}` and scale: :math:`[P^TB\,|\,P^T\bar G]`, the Lyapunov
  solve, the Newton refinement of :math:`S^{-1}`, its split :math:`S^{-1}M +
  (S^{-1}1)1^T/K` and :math:`P\Omega' + (\bar G - PA)S^{-1}`, in one launch.
* :func:`polar_factor` is :math:`B \mapsto \mathrm{polar}(B)` with a ``custom_vjp``
  through :func:`polar` and :func:`polar_vjp`: what the solver's ``"newton_schulz"`` path
  computes; the solver calls it on NVIDIA GPUs when K is small.

Limits. K ≤ :data:`MAX_COLUMNS` and :math:`d_pK_p \le` :data:`MAX_BLOCK` (shared memory
of one block); larger problems belong to the XLA path, whose GEMMs use the whole GPU.

Padding. Triton blocks have power-of-two sides and ``tt.dot`` needs every side
:math:`\ge 16`, so a ``(d, K)`` problem runs as a :math:`(d_p, K_p)` block
(:func:`padded_side`); the padding is loaded as zeros (masked loads, no copy) and never
stored. Zero columns stay exactly zero: with :math:`X = [X_K\;0]`, :math:`X^TX` vanishes
outside its leading K×K block, and the padded identity :math:`E_K =
\mathrm{diag}(1_K, 0)` used in place of :math:`I` keeps :math:`M_k - I` zero there too,
so :math:`X + X(M_k - I)` never writes the padded columns, and :math:`\max|X^TX - E_K|`
is the residual of the K×K problem alone. The Lyapunov iterates (zero-padded
:math:`S_k`, :math:`X_k`) stay block-diagonal the same way.

Precision. Every product is ``lax.dot_general(..., precision=Precision.HIGHEST)``. The
Pallas-Triton lowering (``jax/_src/pallas/triton/lowering.py``,
``_dot_general_lowering``, jax 0.10.2) maps a float32 operand pair whose precisions are
not ``DEFAULT``/``HIGH`` to ``tt.dot(..., inputPrecision = ieee)``: float32 FMAs
(``fma.rn.f32`` in the PTX, no ``mma``). ``DEFAULT`` would give TF32 tensor-core
``mma.sync...tf32``, which loses the δ-direction (conditioning ~1/δ).

Schedule. By default the per-step coefficients :math:`\tfrac32\alpha_k - 1` and
:math:`\tfrac12\alpha_k^3` (computed in double on the host and rounded once, as the XLA
path's constants are) are a small input array read by a ``fori_loop``; ``unroll=True``
writes them into a fully unrolled kernel instead. Same numbers; but at (512, 10) the
unrolled forward is ~31k PTX lines and compiles in ~15 s (deviceless, on a 2-core CPU
host), the loop ~4k lines in ~1 s, with no spill either way; at (512, 32) the unrolled
forward and Lyapunov kernels took ~500 s to compile.

Registers (ptxas 13.0, sm_90a, loop form, 8 warps; XLA calls the same ptxas): at
(512, 10) :func:`polar` uses 128 registers per thread and spills nothing;
:func:`polar_vjp` uses 255 and spills ~1.2 KB per thread, at (512, 32) 205 / none and
255 / ~5.4 KB. The spill comes with the d-long products of the backward, not with its
K×K loop: :func:`lyapunov` alone does not spill, while two products
:math:`X^TY`, :math:`X^TZ` of 512×16 blocks alone spill ~2 KB (the symmetric
:math:`X^TX` of the forward does not).

Platforms. ``interpret=False`` (default) lowers to a Triton kernel: NVIDIA GPUs only
(the Triton ``CompilerParams`` select that backend; without them jax 0.10.2 lowers a GPU
``pallas_call`` to Mosaic GPU, which has no ``dot_general`` for these kernels).
``interpret=True`` runs the same kernel body through JAX on any backend (the tests, on
CPU). The caller chooses: on a CPU host compiling for a GPU (deviceless ahead-of-time
compile) the default backend says nothing about the target.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from nc_jax import _validation as v
from nc_jax import newton_schulz

HIGHEST = lax.Precision.HIGHEST
MAX_COLUMNS = 32
"""Largest K: the :math:`(d_p, K_p)` iterate and the K×K Gram matrix of one problem live
in the registers of one thread block."""
MAX_BLOCK = 16384
"""Largest :math:`d_pK_p`: Triton stages the d×K dot operands through shared memory,
8 bytes per element (128 KB at 512×32 or 1024×16); 2048×16 asks for 256 KB, above the
H100's 227 KB per block, and does not compile."""
MIN_SIDE = 16
"""Smallest block side of a Triton ``tt.dot`` operand."""
NUM_WARPS = 8
"""Warps of the d×K kernels (:func:`polar`, :func:`polar_vjp`). Deviceless H100 compile,
ptxas sm_90a, loop form, (512, 10): :func:`polar` 128 registers per thread and no spill
at 8 warps; at 4 warps it needs 235, at 16 warps ptxas keeps 64 and spills 8 bytes."""


def padded_side(n: int) -> int:
  """Block side for an array side ``n``: the next power of two, at least :data:`MIN_SIDE`."""
  return max(MIN_SIDE, 1 << max(0, int(n) - 1).bit_length())


def lyapunov_num_warps(k: int) -> int:
  """Default warps of the K×K-only :func:`lyapunov` kernel: 4 for :math:`K_p = 16` (a
  16×16 block is 256 values), 8 for :math:`K_p = 32` (4 warps spill ~0.3 KB there)."""
  return 4 if padded_side(k) <= 16 else 8


# --------------------------------------------------------------------------- #
# Kernel bodies (traced inside the kernel: block values, not arrays in memory)
# --------------------------------------------------------------------------- #


def _mm(a, b):
  """``a @ b`` in float32 (``inputPrecision = ieee`` in Triton)."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=HIGHEST,
                         preferred_element_type=jnp.float32)


def _mtm(a, b):
  """``aᵀ @ b`` in float32."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=HIGHEST,
                         preferred_element_type=jnp.float32)


def _sym(a):
  return 0.5 * (a + a.T)


def _skew(a):
  return 0.5 * (a - a.T)


def _padded_eye(kp: int, k: int):
  r""":math:`E_K = \mathrm{diag}(1_K, 0_{K_p-K})`, ``(kp, kp)`` float32."""
  i = lax.broadcasted_iota(jnp.int32, (kp, kp), 0)
  j = lax.broadcasted_iota(jnp.int32, (kp, kp), 1)
  return ((i == j) & (i < k)).astype(jnp.float32)


def _leading(shape, rows: int, cols: int):
  """Boolean mask of the leading ``rows × cols`` corner of a block of ``shape``."""
  i = lax.broadcasted_iota(jnp.int32, shape, 0)
  j = lax.broadcasted_iota(jnp.int32, shape, 1)
  return (i < rows) & (j < cols)


def _load(ref, rows: int, cols: int, again: bool = False):
  """The ``(rows, cols)`` array behind a block ref, zero-padded to the block's shape.

  ``again``: a second load of the same ref, marked (eviction policy) so that the compiler
  does not merge it with the first one and keep that value live in between.
  """
  mask = None if tuple(ref.shape) == (rows, cols) else _leading(ref.shape, rows, cols)
  return plgpu.load(ref, mask=mask, other=None if mask is None else 0.0,
                    eviction_policy="evict_last" if again else None)


def _store(ref, value, rows: int, cols: int):
  """Stores the leading ``(rows, cols)`` corner of the block ``value``."""
  if tuple(ref.shape) == (rows, cols):
    ref[...] = value
  else:
    plgpu.store(ref, value, mask=_leading(ref.shape, rows, cols))


def _max_abs(a):
  """max |a| of a 2-D block (Triton reduces one axis at a time)."""
  return jnp.max(jnp.max(jnp.abs(a), axis=1), axis=0)


def _store_scalar(ref, value):
  """A scalar output, stored as a ``(1,)`` array (reshaped to ``()`` for free outside)."""
  ref[...] = jnp.full((1,), value, jnp.float32)


class _Schedule:
  """The step coefficients :math:`(\\tfrac32\\alpha_k - 1, \\tfrac12\\alpha_k^3)` as
  Python constants (unrolled) or, inside a ``fori_loop``, read from a ``(2, n_p)``
  input ref."""

  def __init__(self, alphas: tuple[float, ...], ref=None):
    self.n = len(alphas)
    self.consts = [(1.5 * a - 1.0, 0.5 * a ** 3) for a in alphas]
    self.ref = ref

  def at(self, i):
    """Coefficients of step ``i`` (a Python int: constants; traced: loads)."""
    if isinstance(i, int):
      return self.consts[i]
    return self.ref[0, i], self.ref[1, i]


def _coefficient_array(alphas: tuple[float, ...]) -> jax.Array:
  """``(2, n_p)`` float32 rows :math:`\\tfrac32\\alpha_k - 1` and :math:`\\tfrac12\\alpha_k^3`
  (double on the host, rounded once), zero-padded to a power of two."""
  n = len(alphas)
  out = np.zeros((2, padded_side(n)), np.float32)
  out[0, :n] = [1.5 * a - 1.0 for a in alphas]
  out[1, :n] = [0.5 * a ** 3 for a in alphas]
  return jnp.asarray(out)


def _iterate(state, step, last, residual_of, schedule: _Schedule):
  """Runs the schedule: ``step(state, c1, c3)`` for all steps but the last (a
  ``fori_loop`` when ``schedule.ref`` is given, else unrolled), then
  ``residual_of(state)``, then ``last(state, c1, c3)``. Returns ``(last's value,
  residual)``."""
  n = schedule.n
  if schedule.ref is None:
    for i in range(n - 1):
      state = step(state, *schedule.at(i))
  else:
    state = lax.fori_loop(0, n - 1, lambda i, s: step(s, *schedule.at(i)), state)
  return last(state, *schedule.at(n - 1)), residual_of(state)


def _polar_block(b, gram, scale, eye, schedule: _Schedule):
  r"""Newton–Schulz on blocks: ``b`` :math:`(d_p, K_p)`, ``gram`` :math:`B^TB`, ``eye``
  :math:`E_K`. Returns ``(X, Q, residual)``.

  The state ``(X, Q, G)`` carries :math:`G = X^TX` of its iterate (the first one
  :math:`B^TB/s^2`, as ``polar``), so the residual before the last step and that step
  share one Gram product, and the last step computes none.
  """

  def update(state, c1, c3):
    x, q, g = state
    m_minus_eye = c1 * eye - c3 * g
    return x + _mm(x, m_minus_eye), q + _mm(q, m_minus_eye)

  def step(state, c1, c3):
    x, q = update(state, c1, c3)
    return x, q, _mtm(x, x)

  state = (b / scale, eye / scale, gram / (scale * scale))
  (x, q), residual = _iterate(state, step, update, lambda s: _max_abs(s[2] - eye), schedule)
  return x, q, residual


def _default_polar_scale(gram, eye):
  r""":math:`\sqrt{\min(\mathrm{tr}\,G, \|G\|_1)}` of the Gram matrix (as ``polar``)."""
  trace = jnp.sum(jnp.sum(gram * eye, axis=1), axis=0)
  norm1 = jnp.max(jnp.sum(jnp.abs(gram), axis=0), axis=0)
  return jnp.sqrt(jnp.minimum(trace, norm1))


def _polar_kernel(*refs, d, k, alphas, given_scale, loop):
  refs = list(refs)
  b_ref = refs.pop(0)
  scale_ref = refs.pop(0) if given_scale else None
  schedule = _Schedule(alphas, refs.pop(0) if loop else None)
  p_ref, q_ref, scale_out, residual_out = refs
  eye = _padded_eye(b_ref.shape[1], k)
  b = _load(b_ref, d, k)
  gram = _mtm(b, b)
  scale = scale_ref[0] if given_scale else _default_polar_scale(gram, eye)
  x, q, residual = _polar_block(b, gram, scale, eye, schedule)
  _store(p_ref, x, d, k)
  _store(q_ref, q, k, k)
  _store_scalar(scale_out, scale)
  _store_scalar(residual_out, residual)


def _lyapunov_block(s, c, scale, eye, schedule: _Schedule):
  r"""Block sign iteration on K×K blocks; returns ``(Y, residual)``, :math:`SY + YS = C`.

  Per step (:func:`nc_jax.newton_schulz._sign_step` for one right-hand side):
  :math:`M - I = c_1E_K - c_3\,\mathrm{sym}(S^2)`, :math:`S \leftarrow
  \mathrm{sym}(S + S(M - I))`, :math:`X \leftarrow X + X(M - I) - c_3S(SX - XS)`.
  """

  def halves(s, x, c1, c3):
    m_minus_eye = c1 * eye - c3 * _sym(_mm(s, s))
    x_next = x + _mm(x, m_minus_eye) - c3 * _mm(s, _mm(s, x) - _mm(x, s))
    return m_minus_eye, x_next

  def step(state, c1, c3):
    s, x = state
    m_minus_eye, x_next = halves(s, x, c1, c3)
    return _sym(s + _mm(s, m_minus_eye)), x_next

  def last(state, c1, c3):  # the S iterate of the last step is not needed
    return halves(*state, c1, c3)[1]

  state = (_sym(s) / scale, c / scale)
  x, residual = _iterate(state, step, last, lambda st: _max_abs(st[0] - eye), schedule)
  return 0.5 * x, residual


def _default_lyapunov_scale(s):
  r""":math:`\min(\|S\|_F, \|S\|_1)` (as ``lyapunov``)."""
  frobenius = jnp.sqrt(jnp.sum(jnp.sum(s * s, axis=1), axis=0))
  return jnp.minimum(frobenius, jnp.max(jnp.sum(jnp.abs(s), axis=0), axis=0))


def _lyapunov_kernel(*refs, k, alphas, given_scale, loop):
  refs = list(refs)
  s_ref, c_ref = refs.pop(0), refs.pop(0)
  scale_ref = refs.pop(0) if given_scale else None
  schedule = _Schedule(alphas, refs.pop(0) if loop else None)
  y_ref, residual_out = refs
  eye = _padded_eye(s_ref.shape[0], k)
  s = _load(s_ref, k, k)
  scale = scale_ref[0] if given_scale else _default_lyapunov_scale(s)
  y, residual = _lyapunov_block(s, _load(c_ref, k, k), scale, eye, schedule)
  _store(y_ref, y, k, k)
  _store_scalar(residual_out, residual)


def _row_means(x, k: int):
  r"""``(XM, X11^T/K)`` on a block whose first ``k`` columns are the matrix (:math:`M = I -
  11^T/K`): the centred columns and the row means repeated in every column (both exactly as
  ``x - mean`` and ``mean`` in XLA: the second is exactly rank one along :math:`1^T`). The
  padded columns stay zero."""
  valid = lax.broadcasted_iota(jnp.int32, x.shape, 1) < k
  mean = jnp.sum(x, axis=1, keepdims=True) / k
  return jnp.where(valid, x - mean, 0.0), jnp.where(valid, mean, 0.0)


def _vjp_kernel(*refs, d, k, alphas, loop):
  r"""The whole of :func:`nc_jax.solver.polar_vjp_newton_schulz` (given :math:`S^{-1}`).

  :math:`S^{-1}` is applied as :math:`R + u1^T` with :math:`R = S^{-1}M` (refined by one
  Newton correction :math:`R + S^{-1}(M - SR)`) and :math:`u = S^{-1}1/K`, as the solver
  does; :math:`X(u1^T)` is the product of X with the block :math:`[u \dots u\;0]`, whose
  columns all equal :math:`Xu`.
  """
  refs = list(refs)
  p_ref, b_ref, g_ref, root_ref, scale_ref = refs[:5]
  schedule = _Schedule(alphas, refs[5] if loop else None)
  grad_ref, residual_out = refs[-2:]
  eye = _padded_eye(p_ref.shape[1], k)
  p = _load(p_ref, d, k)
  s = _sym(_mtm(p, _load(b_ref, d, k)))
  a = _mtm(p, _load(g_ref, d, k))
  omega, residual = _lyapunov_block(s, a - a.T, scale_ref[0], eye, schedule)
  omega = _skew(omega)
  s_inv = _sym(_load(root_ref, k, k))
  s_inv = _sym(_mm(s_inv, 2.0 * eye - _mm(s, s_inv)))
  r, ones_part = _row_means(s_inv, k)               # S⁻¹M and [u … u 0], u = S⁻¹1/K
  r = r + _mm(s_inv, _row_means(eye, k)[0] - _mm(s, r))

  def apply_s_inv(x):
    return _mm(x, r) + _mm(x, ones_part)

  # P and Ḡ are loaded again rather than kept live through the Lyapunov iteration (a
  # plain second load would be merged with the first).
  grad = (_mm(_load(p_ref, d, k, again=True), omega - apply_s_inv(a))
          + apply_s_inv(_load(g_ref, d, k, again=True)))
  _store(grad_ref, grad, d, k)
  _store_scalar(residual_out, residual)


# --------------------------------------------------------------------------- #
# Calls
# --------------------------------------------------------------------------- #


def _check_matrix(name: str, x: jax.Array, shape: tuple[int, ...] | None = None) -> None:
  if shape is not None and tuple(x.shape) != shape:
    raise ValueError(f"{name}: expected shape {shape}, got {tuple(x.shape)}")
  if x.dtype != jnp.float32:
    raise ValueError(f"{name}: expected float32 (the kernel's dtype), got {x.dtype}")
  v.check_finite(name, x)


def _check_columns(name: str, k: int) -> None:
  if not 1 <= k <= MAX_COLUMNS:
    raise ValueError(f"{name}: expected 1 to {MAX_COLUMNS} columns (K) for the fused kernel, "
                     f"got {k}; nc_jax.newton_schulz handles any K")


def _check_tall(name: str, x: jax.Array) -> None:
  if x.ndim != 2 or x.shape[0] < x.shape[1]:
    raise ValueError(f"{name}: expected a (d, K) matrix with d >= K, got shape "
                     f"{tuple(x.shape)}")
  _check_columns(f"{name}.shape[1]", x.shape[1])
  d, k = x.shape
  if padded_side(d) * padded_side(k) > MAX_BLOCK:
    raise ValueError(f"{name}: expected padded d × padded K <= {MAX_BLOCK} (one thread "
                     f"block's shared memory), got shape {tuple(x.shape)} -> "
                     f"{padded_side(d)} × {padded_side(k)}; nc_jax.newton_schulz handles "
                     f"any shape")


def _scale_operand(scale) -> jax.Array:
  scale = jnp.asarray(scale, jnp.float32)
  if scale.shape != ():
    raise ValueError(f"scale: expected a scalar, got shape {tuple(scale.shape)}")
  return scale.reshape(1)


def _block(shape: Sequence[int]) -> pl.BlockSpec:
  """One block covering the whole (padded) array."""
  return pl.BlockSpec(tuple(shape), lambda i: (0,) * len(shape))


def _call(kernel, inputs, in_blocks, out_shapes, out_blocks, *, interpret, num_warps, name):
  """One program (grid ``(1,)``): each block covers its array, padded to ``*_blocks``."""
  return pl.pallas_call(
      kernel,
      out_shape=tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in out_shapes),
      grid=(1,),
      in_specs=[_block(s) for s in in_blocks],
      out_specs=tuple(_block(s) for s in out_blocks),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name=name,
  )(*inputs)


def _with_schedule(inputs: list, blocks: list, alphas, unroll: bool) -> bool:
  """Appends the coefficient array unless unrolled; True when the kernel loops."""
  loop = not unroll and len(alphas) > 2  # at least two steps before the last
  if loop:
    inputs.append(_coefficient_array(alphas))
    blocks.append(tuple(inputs[-1].shape))
  return loop


def polar(b: jax.Array, lower: float, *, scale: jax.Array | None = None,
          interpret: bool = False, num_warps: int = NUM_WARPS,
          unroll: bool = False) -> newton_schulz.Polar:
  r""":func:`nc_jax.newton_schulz.polar` as one fused kernel (K ≤ :data:`MAX_COLUMNS`).

  Args:
    b: ``(d, K)`` float32, ``d >= K``, ``K <= 32``, full column rank.
    lower: static lower bound of :math:`\sigma_{min}(B)/s` (sizes the schedule). A bound
      that does not hold shows in the residual.
    scale: optional ``()`` :math:`s \ge \|B\|_2`; default
      :math:`\sqrt{\min(\mathrm{tr}(B^TB), \|B^TB\|_1)}`.
    interpret: run the kernel body through JAX (any backend) instead of Triton (GPU).
    num_warps: warps of the one thread block.
    unroll: unroll the schedule into the kernel instead of a ``fori_loop`` (module
      docstring, "Schedule").

  Returns:
    :class:`nc_jax.newton_schulz.Polar`: factor ``(d, K)``, inverse_root ``(K, K)``,
    scale ``()``, residual ``()``, steps ``()`` int32.
  """
  _check_tall("b", b)
  _check_matrix("b", b)
  if v.is_concrete(b) and not bool(jnp.any(b != 0)):
    raise ValueError("b: expected a full-column-rank matrix, got all zeros")
  d, k = b.shape
  dp, kp = padded_side(d), padded_side(k)
  alphas = newton_schulz.schedule(lower, b.dtype) + (1.0,)
  inputs, blocks = [b], [(dp, kp)]
  if scale is not None:
    inputs.append(_scale_operand(scale))
    blocks.append((1,))
  loop = _with_schedule(inputs, blocks, alphas, unroll)
  kernel = functools.partial(_polar_kernel, d=d, k=k, alphas=alphas,
                             given_scale=scale is not None, loop=loop)
  p, q, used_scale, residual = _call(kernel, inputs, blocks, [(d, k), (k, k), (1,), (1,)],
                                     [(dp, kp), (kp, kp), (1,), (1,)], interpret=interpret,
                                     num_warps=num_warps, name="newton_schulz_polar")
  return newton_schulz.Polar(p, q, used_scale.reshape(()), residual.reshape(()),
                             jnp.asarray(len(alphas), jnp.int32))


def lyapunov(s: jax.Array, c: jax.Array, lower: float, *, scale: jax.Array | None = None,
             interpret: bool = False, num_warps: int | None = None,
             unroll: bool = False) -> newton_schulz.Lyapunov:
  r""":func:`nc_jax.newton_schulz.lyapunov` for one right-hand side, as one fused kernel.

  Args:
    s: ``(K, K)`` float32 symmetric positive definite, ``K <= 32``.
    c: ``(K, K)`` float32 right-hand side.
    lower: static lower bound of :math:`\lambda_{min}(S)/s`.
    scale: optional ``()`` :math:`s \ge \|S\|_2`; default :math:`\min(\|S\|_F, \|S\|_1)`.
    interpret, unroll: as in :func:`polar`.
    num_warps: default :func:`lyapunov_num_warps`.

  Returns:
    :class:`nc_jax.newton_schulz.Lyapunov`, solution ``(K, K)``.
  """
  if s.ndim != 2 or s.shape[0] != s.shape[-1]:
    raise ValueError(f"s: expected a square (K, K) matrix, got shape {tuple(s.shape)}")
  k = s.shape[0]
  _check_columns("s.shape[0]", k)
  _check_matrix("s", s)
  _check_matrix("c", c, (k, k))
  if v.is_concrete(s) and not bool(jnp.any(s != 0)):
    raise ValueError("s: expected a positive definite matrix, got all zeros")
  kp = padded_side(k)
  alphas = newton_schulz.schedule(lower, s.dtype) + (1.0,)
  inputs, blocks = [s, c], [(kp, kp), (kp, kp)]
  if scale is not None:
    inputs.append(_scale_operand(scale))
    blocks.append((1,))
  loop = _with_schedule(inputs, blocks, alphas, unroll)
  kernel = functools.partial(_lyapunov_kernel, k=k, alphas=alphas,
                             given_scale=scale is not None, loop=loop)
  if num_warps is None:
    num_warps = lyapunov_num_warps(k)
  y, residual = _call(kernel, inputs, blocks, [(k, k), (1,)], [(kp, kp), (1,)],
                      interpret=interpret, num_warps=num_warps, name="newton_schulz_lyapunov")
  return newton_schulz.Lyapunov(y, residual.reshape(()), jnp.asarray(len(alphas), jnp.int32))


def polar_vjp(p: jax.Array, b: jax.Array, g: jax.Array, lower: float, *,
              inverse_root: jax.Array, scale: jax.Array, interpret: bool = False,
              num_warps: int = NUM_WARPS, unroll: bool = False
              ) -> tuple[jax.Array, jax.Array]:
  r""":func:`nc_jax.solver.polar_vjp_newton_schulz` (given ``inverse_root`` and ``scale``)
  as one fused kernel.

  .. math::
     \frac{\partial L}{\partial B} = P\,(\Omega' - AS^{-1}) + \bar G S^{-1},\qquad
     S\Omega' + \Omega'S = A - A^T,\quad A = P^T\bar G,\quad S = \mathrm{sym}(P^TB),

  with :math:`S^{-1}` the forward's inverse root after one Newton step
  :math:`Y(2I - SY)`, applied as :math:`S^{-1}M + (S^{-1}1)1^T/K` (:math:`M = I -
  11^T/K`; the solver's split, which keeps the rounding of the 1/δ eigenvalue along
  :math:`1^T`, where the centring of :math:`\partial L/\partial\bar Y` removes it).

  Args:
    p, b, g: ``(d, K)`` float32: the polar factor, B and the cotangent :math:`\bar G`.
    lower: the forward's static bound.
    inverse_root: ``(K, K)`` :math:`S^{-1}` from the forward.
    scale: ``()`` the forward's scale (the Lyapunov iteration then repeats the forward's
      scalar recurrence, so the forward's residual certifies it too).
    interpret, num_warps, unroll: as in :func:`polar`.

  Returns:
    ``(grad_b, residual)``: ``(d, K)`` :math:`\partial L/\partial B` and the Lyapunov
    residual ``()``.
  """
  _check_tall("p", p)
  d, k = p.shape
  for name, x in (("p", p), ("b", b), ("g", g)):
    _check_matrix(name, x, (d, k))
  _check_matrix("inverse_root", inverse_root, (k, k))
  dp, kp = padded_side(d), padded_side(k)
  alphas = newton_schulz.schedule(lower, p.dtype) + (1.0,)
  inputs = [p, b, g, inverse_root, _scale_operand(scale)]
  blocks = [(dp, kp)] * 3 + [(kp, kp), (1,)]
  loop = _with_schedule(inputs, blocks, alphas, unroll)
  kernel = functools.partial(_vjp_kernel, d=d, k=k, alphas=alphas, loop=loop)
  grad, residual = _call(kernel, inputs, blocks, [(d, k), (1,)], [(dp, kp), (1,)],
                         interpret=interpret, num_warps=num_warps, name="newton_schulz_vjp")
  return grad, residual.reshape(())


# --------------------------------------------------------------------------- #
# Differentiable polar factor
# --------------------------------------------------------------------------- #


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def polar_factor(b: jax.Array, lower: float, interpret: bool = False
                 ) -> tuple[jax.Array, jax.Array]:
  r"""Polar factor of ``b`` with its implicit VJP, one kernel launch each way.

  The solver's ``"newton_schulz"`` path as kernels: forward :func:`polar`, backward
  :func:`polar_vjp` (the adjoint of :math:`B \mapsto UV^T`; see :mod:`nc_jax.solver`).

  Args:
    b: ``(d, K)`` float32, ``K <= 32``.
    lower: static bound of :math:`\sigma_{min}(B)/s` (the solver's
      :func:`nc_jax.solver.newton_schulz_bound`).
    interpret: as in :func:`polar`.

  Returns:
    ``(P, residual)``: ``(d, K)`` and the forward's certificate ``()``
    (``newton_schulz.converged(residual)``); the residual receives no gradient.
  """
  out = polar(b, lower, interpret=interpret)
  return out.factor, out.residual


def _polar_factor_fwd(b, lower, interpret):
  out = polar(b, lower, interpret=interpret)
  return (out.factor, out.residual), (out.factor, b, out.inverse_root, out.scale)


def _polar_factor_bwd(lower, interpret, saved, cotangents):
  p, b, inverse_root, scale = saved
  grad, _ = polar_vjp(p, b, cotangents[0], lower, inverse_root=inverse_root, scale=scale,
                      interpret=interpret)
  return (grad,)


polar_factor.defvjp(_polar_factor_fwd, _polar_factor_bwd)
