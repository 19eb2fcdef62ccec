r"""The classifier heads as Flax NNX modules: :class:`StandardHead`, :class:`FixedETFHead`,
:class:`ImplicitETFHead`.

Thin wrappers of the functional heads (:mod:`nc_jax.heads`), which remain the single
implementation: a module holds

* ``config``: the :class:`nc_jax.heads.HeadConfig` (static), built from the constructor's
  arguments and validated by it (errors name the argument);
* the trainable parameters as ``nnx.Param`` (the standard head's ``kernel`` ``(K, d)`` and,
  with ``bias=True``, ``bias`` ``(K,)``; the ETF heads have none);
* ``head_state``: a :class:`HeadStateVar` (an ``nnx.Variable``, not an ``nnx.Param``, so
  ``nnx.Optimizer(..., wrt=nnx.Param)`` and ``nnx.grad`` leave it alone) whose value is the
  :class:`nc_jax.heads.HeadState`: the fixed ETF, and for the implicit head the class-mean
  moving average, the previous frame :math:`P_{prev}` and the last training W and b;

and its call runs :func:`nc_jax.heads.normalise_features`, then
:func:`nc_jax.heads.train_logits` or :func:`nc_jax.heads.eval_logits`.

Mode. A head has the attribute ``deterministic`` (default ``False``: training), the one
``model.train()`` and ``model.eval()`` set on every submodule, as for ``nnx.Dropout``; a call
may override it with ``deterministic=``. Training mode needs the labels (implicit head) and
updates ``head_state``; evaluation mode reads it only: the implicit head uses the W and b of
the last training step, the fixed head the evaluation batch's mean in its bias (over the
``valid`` rows of a padded batch), the standard head its parameters.

Compilation. ``HeadState.initialised`` is static pytree metadata, so under ``nnx.jit`` the
implicit head's first training step (the feasibility solve that starts P) is a trace of its
own and every later step reuses a second one: a train step compiles twice, never again.

Gradients flow through the nearest ETF by its implicit VJP (``forward_only=True`` stops
them at P, the paper's ablation) and through the batch mean in the bias; the stored state
carries none.

Data parallelism: under ``nnx.jit`` (or ``jax.jit``) with the batch sharded over a mesh and
the model replicated, XLA computes the class sums and the batch mean over the global batch,
exactly as :mod:`nc_jax.train` does; inside ``jax.shard_map`` pass ``axis_name``.

After each optimiser update call :func:`renormalise` (the standard head's unit-norm rows,
the paper's cosine-classifier baseline; a no-op for the other heads). After restoring a
checkpoint into a fresh model call :func:`sync_initialised` (see ``docs/heads_nnx.md``).

Example::

  import jax, optax
  from flax import nnx
  from nc_jax.nnx import ImplicitETFHead, renormalise

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.body = nnx.Linear(32, 64, rngs=rngs)
      self.head = ImplicitETFHead(10, 64, tau=5.0, rngs=rngs)
    def __call__(self, x, labels=None):
      return self.head(nnx.relu(self.body(x)), labels)      # logits (n, 10)

  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, labels):
    def loss_fn(model):  # differentiates the nnx.Param only (argnum 0)
      logits = model(x, labels)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    renormalise(model)
    return loss
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx as fnnx

from nc_jax import _validation as v
from nc_jax import heads

__all__ = [
    "FixedETFHead",
    "Head",
    "HeadStateVar",
    "ImplicitETFHead",
    "StandardHead",
    "from_config",
    "renormalise",
    "sync_initialised",
    "unconverged_solves",
]

_COMMON = ("kind", "num_classes", "feature_dim", "tau")
_STANDARD_FIELDS = ("bias", "renormalise_rows")
_FIXED_FIELDS = ("rotation_seed",)
#: The implicit head's options beyond ``forward_only`` (those of :class:`HeadConfig` that
#: no other head uses: ``delta``, the solver method, ``factorisation``, ``alpha_min``).
_SOLVER_FIELDS = tuple(f.name for f in dataclasses.fields(heads.HeadConfig)
                       if f.name not in _COMMON + _STANDARD_FIELDS + _FIXED_FIELDS
                       + ("forward_only",))


class HeadStateVar(fnnx.Variable):
  """The non-trainable head state: its value is a :class:`nc_jax.heads.HeadState`.

  A variable type of its own, so that optimisers and gradients (``wrt=nnx.Param``) skip it
  and ``nnx.state(model, HeadStateVar)`` selects it.
  """


class Head(fnnx.Module):
  """Common base of the three heads (build them by their own constructors or
  :func:`from_config`).

  Attributes:
    config: the :class:`nc_jax.heads.HeadConfig`.
    dtype: the head's floating dtype: features are cast to it, parameters and state are
      stored in it.
    deterministic: ``False`` (training mode) or ``True`` (evaluation mode);
      ``model.train()`` / ``model.eval()`` set it.
    axis_name: the device axis inside ``jax.shard_map`` (``None`` under a sharded jit).
    head_state: :class:`HeadStateVar` holding the :class:`nc_jax.heads.HeadState`.
  """

  def __init__(self, config: heads.HeadConfig, *, dtype: Any = jnp.float32,
               deterministic: bool = False, axis_name: Hashable | None = None,
               rngs: fnnx.Rngs | None = None):
    if not isinstance(config, heads.HeadConfig):
      raise ValueError(f"config: expected a nc_jax.heads.HeadConfig, got {type(config).__name__}")
    dt = v.float_dtype("dtype", dtype)
    if not isinstance(deterministic, bool):
      raise ValueError(f"deterministic: expected a bool, got {deterministic!r}")
    if axis_name is not None:
      try:
        hash(axis_name)
      except TypeError as err:
        raise ValueError(f"axis_name: expected a hashable device axis name or None, got "
                         f"{axis_name!r}") from err
    if rngs is not None and not isinstance(rngs, fnnx.Rngs):
      raise ValueError(f"rngs: expected an nnx.Rngs, got {type(rngs).__name__}")
    if config.kind == "standard" and rngs is None:
      raise ValueError("rngs: the standard head draws its initial kernel; pass "
                       "rngs=nnx.Rngs(...)")
    key = rngs.params() if config.kind == "standard" else jax.random.PRNGKey(0)  # unused
    params, state = heads.init(config, key, dt)
    self.config = config
    self.dtype = dt
    self.deterministic = deterministic
    self.axis_name = axis_name
    if config.kind == "standard":
      self.kernel = fnnx.Param(params["kernel"])
      self.bias = fnnx.Param(params["bias"]) if config.bias else None
    self.head_state = HeadStateVar(state)

  # ------------------------------------------------------------------ forward

  def __call__(self, features: jax.Array, labels: jax.Array | None = None, *,
               valid: jax.Array | None = None, deterministic: bool | None = None) -> jax.Array:
    """Logits ``(n, K)`` of raw backbone features.

    Args:
      features: ``(n, d)`` floating backbone features, cast to :attr:`dtype` and
        τ-normalised here (:func:`nc_jax.heads.normalise_features`).
      labels: ``(n,)`` int class indices in ``[0, K)``; needed in training mode by the
        implicit head (its class means), ignored otherwise.
      valid: evaluation only: ``(n,)`` bool, the real rows of a padded batch (the fixed
        head's bias uses their mean).
      deterministic: overrides :attr:`deterministic` for this call (``True``: evaluation).

    Returns:
      ``(n, K)`` logits in :attr:`dtype`. In training mode ``head_state`` is updated (the
      implicit head's class means, frame, W and b; the other heads' state is constant).
    """
    det = self.deterministic if deterministic is None else deterministic
    h = self.normalise(features)
    n = h.shape[0]
    if labels is not None and tuple(jnp.shape(labels)) != (n,):
      raise ValueError(f"labels: expected shape ({n},) to match features {tuple(h.shape)}, "
                       f"got {tuple(jnp.shape(labels))}")
    state = self.head_state.get_value()
    params = self._params()
    if det:
      if valid is not None and tuple(jnp.shape(valid)) != (n,):
        raise ValueError(f"valid: expected a ({n},) bool mask to match features "
                         f"{tuple(h.shape)}, got shape {tuple(jnp.shape(valid))}")
      return heads.eval_logits(self.config, params, state, h, valid=valid,
                               axis_name=self.axis_name)
    if valid is not None:
      raise ValueError("valid: a padding mask is for evaluation mode (deterministic=True); "
                       "a training batch has no padding")
    if labels is None:
      if self.config.kind == "implicit":
        raise ValueError("labels: the implicit head needs the (n,) int labels in training "
                         "mode (its class means); call model.eval() or pass "
                         "deterministic=True to evaluate")
      labels = jnp.zeros((n,), jnp.int32)  # unused by the standard and fixed heads
    logits, new_state = heads.train_logits(self.config, params, state, h, labels,
                                           axis_name=self.axis_name)
    if new_state is not state:
      self.head_state.set_value(new_state)
    return logits

  def normalise(self, features: jax.Array) -> jax.Array:
    r"""``(n, d)`` features cast to :attr:`dtype` and scaled to norm τ (the head's input,
    e.g. for :func:`nc_jax.nc_metrics` with :meth:`classifier`)."""
    features = jnp.asarray(features)
    if features.ndim != 2 or features.shape[1] != self.config.feature_dim:
      raise ValueError(f"features: expected shape (n, {self.config.feature_dim}) (n rows of "
                       f"feature_dim={self.config.feature_dim}), got {tuple(features.shape)}")
    if not jnp.issubdtype(features.dtype, jnp.floating):
      raise ValueError(f"features: expected a floating array, got dtype {features.dtype}")
    return heads.head_features(self.config, features.astype(self.dtype))

  # ------------------------------------------------------------------ helpers

  def _params(self) -> dict:
    if self.config.kind != "standard":
      return {}
    params = {"kernel": self.kernel.get_value()}
    if self.bias is not None:
      params["bias"] = self.bias.get_value()
    return params

  def classifier(self, global_mean: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``(W (K, d), b (K,))`` that evaluation uses (:func:`nc_jax.heads.classifier`); the
    fixed head's bias needs the features' ``global_mean`` ``(d,)`` (else zero)."""
    return heads.classifier(self.config, self._params(), self.head_state.get_value(),
                            global_mean)

  def renormalise(self) -> None:
    """Standard head with ``renormalise_rows``: rescales the kernel's rows to unit norm
    (:func:`nc_jax.heads.renormalise`); call it after every optimiser update (jit-able).
    A no-op for the other heads."""
    if self.config.kind == "standard" and self.config.renormalise_rows:
      self.kernel.set_value(heads.renormalise(self.config, self._params())["kernel"])

  def unconverged_solves(self) -> jax.Array:
    """``()`` float32: 1 if the last training step's nearest-ETF solve did not certify
    convergence (:func:`nc_jax.heads.unconverged_solves`), else 0; jit-able."""
    return heads.unconverged_solves(self.head_state.get_value())

  def sync_initialised(self) -> None:
    """Re-derives the static ``initialised`` flag from the state's arrays
    (:func:`nc_jax.heads.sync_initialised`; one host read, not under jit): call it after
    ``nnx.update`` from a checkpoint restored into a fresh model's state."""
    self.head_state.set_value(heads.sync_initialised(self.head_state.get_value()))

  def set_view(self, deterministic: bool | None = None):
    """For ``nnx.view(model, deterministic=...)``.

    Args:
      deterministic: ``True`` for evaluation mode, ``False`` for training mode.
    """
    if deterministic is not None:
      self.deterministic = deterministic


def _check_options(cls_name: str, options: dict, allowed: tuple[str, ...]) -> None:
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise TypeError(f"{cls_name}() got unexpected keyword argument(s) {unknown}; its "
                    f"head options are: {', '.join(allowed) or 'none'}")


class StandardHead(Head):
  """The learned classifier: logits :math:`hW^T (+ b)` of τ-normalised features.

  Args:
    num_classes: K ≥ 2.
    feature_dim: d.
    tau: feature norm τ (paper: 5).
    bias: learn a bias ``(K,)`` (paper: no).
    renormalise_rows: :meth:`renormalise` rescales W's rows to unit norm (the paper's
      baseline); call it (or :func:`renormalise`) after each optimiser update.
    dtype: parameter, state and computation dtype (default float32).
    deterministic: start in evaluation mode.
    axis_name: device axis inside ``jax.shard_map``.
    rngs: ``nnx.Rngs``; the kernel is drawn from :math:`U(\\pm 1/\\sqrt d)` with
      ``rngs.params()``.

  Parameters: ``kernel`` ``(K, d)`` and, with ``bias``, ``bias`` ``(K,)``.
  """

  def __init__(self, num_classes: int, feature_dim: int, tau: float = 5.0, *,
               bias: bool = False, renormalise_rows: bool = True, dtype: Any = jnp.float32,
               deterministic: bool = False, axis_name: Hashable | None = None,
               rngs: fnnx.Rngs | None = None):
    config = heads.HeadConfig("standard", num_classes, feature_dim, tau=tau, bias=bias,
                              renormalise_rows=renormalise_rows)
    super().__init__(config, dtype=dtype, deterministic=deterministic, axis_name=axis_name,
                     rngs=rngs)


class FixedETFHead(Head):
  r"""A frozen simplex ETF, :math:`W = \sqrt{K/(K-1)}\,[M\;0]` (or a seeded rotation of
  it), with bias :math:`-W\,\mathrm{sg}(\mu_G)` from the current batch's mean, in training
  and evaluation alike.

  Args:
    num_classes: K ≥ 2.
    feature_dim: d ≥ K.
    tau: feature norm τ.
    rotation_seed: ``None``: the ETF in the first K coordinates; else the seed of a
      Haar-random rotation of it.
    dtype, deterministic, axis_name: as :class:`StandardHead`.
    rngs: accepted for uniformity, unused.
  """

  def __init__(self, num_classes: int, feature_dim: int, tau: float = 5.0, *,
               rotation_seed: int | None = None, dtype: Any = jnp.float32,
               deterministic: bool = False, axis_name: Hashable | None = None,
               rngs: fnnx.Rngs | None = None):
    config = heads.HeadConfig("fixed", num_classes, feature_dim, tau=tau,
                              rotation_seed=rotation_seed)
    super().__init__(config, dtype=dtype, deterministic=deterministic, axis_name=axis_name,
                     rngs=rngs)


class ImplicitETFHead(Head):
  r"""The paper's head: the nearest simplex ETF to the moving average of class means.

  Each training step updates the class-mean moving average (:mod:`nc_jax.class_means`),
  solves :math:`P = \mathrm{nearest\_etf}(\bar Y, P_{prev})` (the first step starts from the
  feasibility solve) and gives logits :math:`hW^T + b` with
  :math:`W = \sqrt{K/(K-1)}\,MP^T`, :math:`b = -W\mu_G`; gradients flow through P by the
  implicit VJP and through :math:`\mu_G`. Evaluation uses the last training W and b.

  Args:
    num_classes: K ≥ 2.
    feature_dim: d ≥ K.
    tau: feature norm τ (paper: 5).
    forward_only: stop the gradient at P (the paper's ablation "without DDN gradient").
    dtype, deterministic, axis_name: as :class:`StandardHead`.
    rngs: accepted for uniformity, unused.
    **solver_options: the remaining :class:`nc_jax.heads.HeadConfig` fields: ``delta``
      (proximal weight), ``solver`` (:func:`nc_jax.nearest_etf`'s method, ``"polar"`` or
      ``"rgd"``), ``factorisation`` (``"auto"``, ``"svd"``, ``"eigh"``, ``"qdwh"``,
      ``"newton_schulz"``) and ``alpha_min`` (moving-average floor). Their names are read
      from :class:`~nc_jax.heads.HeadConfig`; another keyword raises ``TypeError``.
  """

  def __init__(self, num_classes: int, feature_dim: int, tau: float = 5.0, *,
               forward_only: bool = False, dtype: Any = jnp.float32,
               deterministic: bool = False, axis_name: Hashable | None = None,
               rngs: fnnx.Rngs | None = None, **solver_options: Any):
    _check_options(type(self).__name__, solver_options, _SOLVER_FIELDS)
    config = heads.HeadConfig("implicit", num_classes, feature_dim, tau=tau,
                              forward_only=forward_only, **solver_options)
    super().__init__(config, dtype=dtype, deterministic=deterministic, axis_name=axis_name,
                     rngs=rngs)


_CLASSES = {"standard": (StandardHead, _STANDARD_FIELDS), "fixed": (FixedETFHead, _FIXED_FIELDS),
            "implicit": (ImplicitETFHead, ("forward_only",) + _SOLVER_FIELDS)}


def from_config(config: heads.HeadConfig, *, dtype: Any = jnp.float32,
                deterministic: bool = False, axis_name: Hashable | None = None,
                rngs: fnnx.Rngs | None = None) -> Head:
  """The head module of ``config.kind`` with ``config``'s settings (those that apply to the
  kind; the others have no effect and keep their defaults in ``head.config``)."""
  if not isinstance(config, heads.HeadConfig):
    raise ValueError(f"config: expected a nc_jax.heads.HeadConfig, got {type(config).__name__}")
  cls, fields = _CLASSES[config.kind]
  return cls(config.num_classes, config.feature_dim, config.tau,
             **{f: getattr(config, f) for f in fields}, dtype=dtype,
             deterministic=deterministic, axis_name=axis_name, rngs=rngs)


# --------------------------------------------------------------------------- #
# Whole-model helpers
# --------------------------------------------------------------------------- #


def _heads_of(model: Any) -> list[Head]:
  return [node for _, node in fnnx.iter_graph(model) if isinstance(node, Head)]


def renormalise(model: Any) -> None:
  """:meth:`Head.renormalise` on every head in ``model`` (any NNX graph node); call it
  after each optimiser update, inside the jitted step. No-op without a standard head."""
  for head in _heads_of(model):
    head.renormalise()


def unconverged_solves(model: Any) -> jax.Array:
  """``()`` float32: the number of heads in ``model`` whose last nearest-ETF solve did not
  certify convergence (:meth:`Head.unconverged_solves`); jit-able. Sum it over steps and
  check it where the loss is read (e.g. :func:`nc_jax.train.check_solves`)."""
  total = jnp.zeros((), jnp.float32)
  for head in _heads_of(model):
    total = total + head.unconverged_solves()
  return total


def sync_initialised(model: Any) -> None:
  """:meth:`Head.sync_initialised` on every head in ``model``: after ``nnx.update(model,
  restored)`` with a state restored into a fresh model's (abstract) state, whose static
  ``initialised`` flags are the fresh model's ``False``. One host read per head."""
  for head in _heads_of(model):
    head.sync_initialised()
