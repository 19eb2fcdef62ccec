r"""Automatic gradient descent (AGD; Bernstein et al. 2023) as the official code uses it.

Port of ``nc/optimisers/agd.py`` of the official release (commit 00cdf29;
docs/method.md §10.1) to an :mod:`optax` gradient transformation on Flax parameter
pytrees.

Layout. The official code works in PyTorch layout, a linear weight ``(out, in)``
and a conv kernel ``(out, in, kh, kw)``. Flax stores a ``Dense`` kernel as
``(in, out)`` and a ``Conv`` kernel as ``(kh, kw, in, out)``. By default every
parameter of rank ≥ 2 is read in **Flax layout, leading spatial axes then
(in, out)**: the matrix of kernel position ``s`` is ``W_s = p[s]ᵀ`` of shape
``(out, in)``, with ``S = ∏ spatial`` positions (``S = 1`` for a Dense kernel).
Leaves stored in PyTorch layout ``(out, in, *spatial)`` (e.g. a classifier kept
as ``(K, d)``) are marked with the ``torch_layout`` predicate on their path
(``"head/kernel"``-style, see :func:`agd`). The layout only matters for ``sv``
(out/in) and for :func:`agd_init`; the per-slice Frobenius norms do not depend on it.

Definitions (L = number of parameter tensors in the pytree):

* :math:`\mathrm{sv}(p) = \sqrt{\mathrm{out}/\mathrm{in}}\,/\sqrt{S}`
  (:func:`agd_singular_value`; for a Dense kernel :math:`\sqrt{\mathrm{out}/\mathrm{in}}`,
  for a Conv kernel :math:`\sqrt{\mathrm{out}/\mathrm{in}}/\sqrt{k_h k_w}`).
* :math:`G = \frac1L\sum_p \mathrm{sv}(p)\sum_s \|\nabla p_s\|_F`.
* :math:`\eta = \ln\!\big((1 + \sqrt{1 + 4G})/2\big)` (:func:`agd_eta`; the
  official ``step()`` returns it and the training log records it, labelled
  "log(eta)").
* :math:`p_s \leftarrow p_s - \frac{\text{gain}}{L}\,\eta\,\mathrm{sv}(p)\,
  \nabla p_s / \|\nabla p_s\|_F` for every kernel position ``s``; a slice with
  zero gradient gets a zero update.

Initialisation (:func:`agd_init`, the official ``init_weights``): every
``(out, in)`` slice becomes a (semi-)orthogonal matrix, as
``torch.nn.init.orthogonal_`` draws it, times :math:`\mathrm{sv}(p)`.

Deviations from the official code (none affects the released networks):

* Zero-gradient slices. The official factor ``sv/‖∇p_s‖`` is ``inf`` there and
  ``torch.nan_to_num`` maps it to the largest float, so the update is
  ``(gain·η/L·FLT_MAX)·0``: 0 while ``gain·η/L ≤ 1``, but ``inf·0 = NaN`` beyond
  (float32). Here the factor is exactly 0, so the update is 0 always.
* Rank 3 and rank ≥ 5 kernels: the official ``singular_value`` divides by the
  kernel area only for rank-4 tensors (a ``Conv1d`` kernel would get
  :math:`\sqrt{\mathrm{out}/\mathrm{in}}`); here every rank ≥ 3 kernel is divided
  by :math:`\sqrt{S}`. ResNet18/50 with a linear classifier have only rank-2 and
  rank-4 parameters, where both agree.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "AGDState",
    "agd",
    "agd_eta",
    "agd_eta_from_state",
    "agd_init",
    "agd_singular_value",
]

#: ``torch_layout`` predicate: parameter path (``"head/kernel"``) → stored as (out, in, ...).
LayoutFn = Callable[[str], bool]


class AGDState(NamedTuple):
  """State of :func:`agd`: only the last step's η, for logging.

  ``eta`` is a scalar of the parameters' (at least float32) dtype; 0 before
  the first update.
  """

  eta: jax.Array


def _path_str(path: tuple[Any, ...]) -> str:
  """``('params', 'Dense_0', 'bias')``-style key path as ``params/Dense_0/bias``."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(str(k.name))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:  # pragma: no cover - future key types
      parts.append(str(k))
  return "/".join(parts) if parts else "<root>"


def _check_shape(path: str, shape: tuple[int, ...]) -> None:
  if len(shape) < 2:
    raise ValueError(
        f"AGD: parameter '{path}' has shape {tuple(shape)} (rank {len(shape)}); AGD supports "
        "only weight matrices and conv kernels (rank >= 2), as the official code. Build the "
        "model without biases and with BatchNorm(use_bias=False, use_scale=False), or exclude "
        "the parameter from AGD (e.g. optax.multi_transform).")
  if any(int(d) == 0 for d in shape):
    raise ValueError(f"AGD: parameter '{path}' has an empty shape {tuple(shape)}")


class _Layout(NamedTuple):
  n_in: int
  n_out: int
  n_spatial: int
  axes: tuple[int, int]  # the (in, out) or (out, in) axes: the per-slice norm axes


def _layout(shape: tuple[int, ...], torch_layout: bool) -> _Layout:
  if torch_layout:
    return _Layout(shape[1], shape[0], math.prod(shape[2:]), (0, 1))
  return _Layout(shape[-2], shape[-1], math.prod(shape[:-2]), (-2, -1))


def agd_singular_value(shape: tuple[int, ...], torch_layout: bool = False) -> float:
  r"""AGD's target singular value :math:`\sqrt{\mathrm{out}/\mathrm{in}}/\sqrt{S}` of a kernel.

  Flax layout ``(*spatial, in, out)`` by default: a Dense kernel ``(in, out)`` gets
  :math:`\sqrt{\mathrm{out}/\mathrm{in}}`, a Conv kernel ``(kh, kw, in, out)``
  :math:`\sqrt{\mathrm{out}/\mathrm{in}}/\sqrt{k_h k_w}` (the official
  ``singular_value`` of the PyTorch tensor ``(out, in, kh, kw)``). With
  ``torch_layout=True`` the shape is read as ``(out, in, *spatial)``.
  Raises ``ValueError`` for rank < 2 or an empty axis.
  """
  shape = tuple(int(d) for d in shape)
  _check_shape("<shape>", shape)
  lay = _layout(shape, torch_layout)
  return math.sqrt(lay.n_out / lay.n_in) / math.sqrt(lay.n_spatial)


def _check_tree(tree: Any, torch_layout: LayoutFn | None) -> tuple[list[Any], list[bool], Any]:
  """Validated leaves, their layout flags and the treedef."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  if not flat:
    raise ValueError("AGD: the parameter pytree has no array leaves")
  leaves, flags = [], []
  for path, x in flat:
    name = _path_str(path)
    _check_shape(name, jnp.shape(x))
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise ValueError(f"AGD: parameter '{name}' has non-floating dtype {jnp.result_type(x)}")
    leaves.append(x)
    flags.append(bool(torch_layout(name)) if torch_layout is not None else False)
  return leaves, flags, treedef


def _acc_dtype(leaves: list[Any]) -> Any:
  """Accumulation dtype: the leaves' common float type, at least float32."""
  return jnp.result_type(jnp.float32, *[jnp.result_type(x) for x in leaves])


def _slice_norms(g: jax.Array, axes: tuple[int, int], dtype: Any) -> jax.Array:
  """‖g_s‖_F of every kernel position, kept as size-1 ``axes`` (broadcasts against g)."""
  g = g.astype(dtype)
  return jnp.sqrt(jnp.sum(g * g, axis=axes, keepdims=True))


def _eta(svs: list[float], norms: list[jax.Array], dtype: Any) -> jax.Array:
  g_total = sum(sv * jnp.sum(n) for sv, n in zip(svs, norms)) / len(svs)
  g_total = jnp.asarray(g_total, dtype)
  return jnp.log(0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * g_total)))


def _svs_norms(leaves: list[Any], flags: list[bool], dtype: Any
               ) -> tuple[list[float], list[jax.Array]]:
  svs, norms = [], []
  for g, flag in zip(leaves, flags):
    shape = tuple(jnp.shape(g))
    svs.append(agd_singular_value(shape, flag))
    norms.append(_slice_norms(g, _layout(shape, flag).axes, dtype))
  return svs, norms


def agd_eta(grads: Any, *, torch_layout: LayoutFn | None = None) -> jax.Array:
  r"""AGD's step size :math:`\eta = \ln((1 + \sqrt{1 + 4G})/2)` for a gradient pytree.

  :math:`G = \frac1L\sum_p \mathrm{sv}(p)\sum_s\|\nabla p_s\|_F` over the ``L``
  leaves (layouts as in :func:`agd`). Returns a scalar of the gradients' dtype
  (at least float32). Pure ``jnp``: usable under ``jit``.
  """
  leaves, flags, _ = _check_tree(grads, torch_layout)
  dtype = _acc_dtype(leaves)
  return _eta(*_svs_norms(leaves, flags, dtype), dtype)


def agd(gain: float = 10.0, *, torch_layout: LayoutFn | None = None
        ) -> optax.GradientTransformation:
  r"""Automatic gradient descent (official port), as an optax transformation.

  Args:
    gain: the official ``gain`` (10 in every released script). Must be > 0.
    torch_layout: optional predicate on a leaf's path (``"head/kernel"``; dict keys,
      attribute names and sequence indices joined by ``/``); ``True`` means the leaf
      is stored in PyTorch layout ``(out, in, *spatial)``. Default: every leaf is in
      Flax layout ``(*spatial, in, out)``.

  Returns:
    ``optax.GradientTransformation``. ``init(params)`` checks every leaf (rank ≥ 2,
    floating, non-empty) and raises ``ValueError`` naming the first offending
    parameter path (e.g. ``params/Dense_0/bias``), like the official constructor,
    which rejects biases. ``update(grads, state, params=None)`` returns
    ``(updates, AGDState(eta))`` with, per leaf ``p`` and kernel position ``s``,

    .. math:: u_s = -\frac{\text{gain}}{L}\,\eta\,\mathrm{sv}(p)\,
              \frac{\nabla p_s}{\|\nabla p_s\|_F}\quad(0 \text{ if } \nabla p_s = 0),

    to be added with ``optax.apply_updates``. ``L`` is the number of leaves of
    the gradient tree (with ``optax.masked``/``multi_transform``: the leaves
    this transformation receives). ``params`` is not used. Updates keep each
    gradient's dtype; norms and η are computed in the state's dtype (the
    parameters' float type, at least float32).

  No learning rate, momentum, weight decay or schedule. The update is pure ``jnp``
  with no host synchronisation, so it runs under ``jit`` and, with replicated
  parameters and gradients, identically on every device under ``shard_map`` or
  a sharded ``jit``. The last η is ``state.eta`` (:func:`agd_eta_from_state`).
  Parameters must be initialised with :func:`agd_init` to follow the official recipe.
  """
  gain = float(gain)
  if not math.isfinite(gain) or gain <= 0:
    raise ValueError(f"gain: expected a finite number > 0, got {gain}")

  def init_fn(params: Any) -> AGDState:
    leaves, _, _ = _check_tree(params, torch_layout)
    return AGDState(eta=jnp.zeros((), _acc_dtype(leaves)))

  def update_fn(updates: Any, state: AGDState, params: Any = None) -> tuple[Any, AGDState]:
    del params
    leaves, flags, treedef = _check_tree(updates, torch_layout)
    dtype = state.eta.dtype
    svs, norms = _svs_norms(leaves, flags, dtype)
    eta = _eta(svs, norms, dtype)
    coef = -(gain / len(leaves)) * eta
    new = []
    for g, sv, n in zip(leaves, svs, norms):
      factor = jnp.where(n > 0, sv / jnp.where(n > 0, n, 1.0), 0.0)
      new.append((coef * factor * g.astype(dtype)).astype(g.dtype))
    return jax.tree_util.tree_unflatten(treedef, new), AGDState(eta=eta)

  return optax.GradientTransformation(init_fn, update_fn)


def agd_eta_from_state(opt_state: Any) -> jax.Array:
  """η of the last AGD step, found anywhere inside a (nested) optax state.

  Works for a bare :class:`AGDState` and for states of ``optax.chain``,
  ``optax.masked``, ``optax.multi_transform``, … Raises ``ValueError`` if the
  state holds no, or more than one, :class:`AGDState`.
  """
  found = [x for x in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, AGDState)) if isinstance(x, AGDState)]
  if len(found) != 1:
    raise ValueError(f"opt_state: expected exactly one AGDState, found {len(found)}")
  return found[0].eta


def _orthogonal_slices(a: jax.Array, rows: int, cols: int) -> jax.Array:
  """(Semi-)orthogonal ``(rows, cols)`` matrices from Gaussian ``a``, as torch's ``orthogonal_``.

  ``a`` has shape ``(n, max(rows, cols), min(rows, cols))`` (torch transposes a wide
  Gaussian to tall). ``Q, R = qr(a)``; ``Q *= sign(diag R)``; transposed back if
  ``rows < cols``. Orthonormal columns if ``rows ≥ cols``, orthonormal rows otherwise.
  (A zero diagonal entry of R, probability 0, keeps its column here; torch would zero it.)
  """
  q, r = jnp.linalg.qr(a, mode="reduced")
  d = jnp.diagonal(r, axis1=-2, axis2=-1)
  q = q * jnp.where(d < 0, -1.0, 1.0).astype(a.dtype)[..., None, :]
  return q if rows >= cols else jnp.swapaxes(q, -1, -2)


def agd_init(params: Any, key: jax.Array, *, torch_layout: LayoutFn | None = None) -> Any:
  r"""AGD's orthogonal initialisation (official ``AGD.init_weights``) of a Flax pytree.

  Every leaf is replaced by, for each kernel position ``s``,
  :math:`W_s = \mathrm{sv}(p)\,Q_s` with :math:`Q_s` an ``(out, in)``
  (semi-)orthogonal matrix drawn like ``torch.nn.init.orthogonal_`` (QR of a
  Gaussian matrix with the sign fix): :math:`Q_sQ_s^\top = I_{out}` if out ≤ in,
  :math:`Q_s^\top Q_s = I_{in}` if out ≥ in. In Flax layout ``(*spatial, in, out)``
  the stored slice is :math:`p[s] = W_s^\top`; in PyTorch layout (``torch_layout``,
  as in :func:`agd`) ``p[:, :, s] = W_s``. Slices are independent.

  Deterministic in ``key`` and the tree's structure, shapes and dtypes (one Gaussian
  vector, drawn in the leaves' widest float dtype, at least float32, is cut into
  the leaves in flatten order); shapes and dtypes are kept. Raises ``ValueError``
  naming the path of any rank < 2 leaf, as :func:`agd` does. The random stream
  differs from PyTorch's; the distribution is the same.
  """
  _, flags, _ = _check_tree(params, torch_layout)
  flat, treedef = jax.tree_util.tree_flatten(params)
  shapes = [tuple(jnp.shape(x)) for x in flat]
  sizes = [math.prod(s) for s in shapes]
  # One Gaussian draw for all leaves (each threefry draw costs ~0.5 s of XLA compile time
  # on CPU), cut per leaf in flatten order. The QRs then run as one small program per leaf
  # shape: many independent batched QRs in a single CPU program can deadlock XLA's
  # concurrency-optimised scheduler (seen with ResNet18's 20 kernels, jax 0.10.2).
  z = _gaussian(key, sum(sizes), _acc_dtype(flat))
  out, offset = [], 0
  for x, shape, size, flag in zip(flat, shapes, sizes, flags):
    out.append(_init_leaf(z[offset:offset + size], shape, jnp.result_type(x), flag))
    offset += size
  return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _gaussian(key: jax.Array, size: int, dtype) -> jax.Array:
  return jax.random.normal(key, (size,), dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init_leaf(z: jax.Array, shape: tuple[int, ...], dtype, flag: bool) -> jax.Array:
  """One leaf of :func:`agd_init` from its share ``z`` of the Gaussian draw."""
  lay = _layout(shape, flag)
  a = z.reshape(lay.n_spatial, max(lay.n_in, lay.n_out), min(lay.n_in, lay.n_out)).astype(dtype)
  w = _orthogonal_slices(a, lay.n_out, lay.n_in)  # (S, out, in)
  w = w * jnp.asarray(agd_singular_value(shape, flag), dtype)
  if flag:  # (out, in, *spatial)
    return jnp.moveaxis(w, 0, -1).reshape(shape)
  return jnp.swapaxes(w, -1, -2).reshape(shape)  # (*spatial, in, out)
