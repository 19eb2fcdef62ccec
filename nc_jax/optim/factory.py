r"""Optimiser and learning-rate-schedule factories (PyTorch semantics of the official code).

The official ``make_optimiser``/``make_scheduler`` (``nc/models/model_structure.py``,
commit 00cdf29; docs/method.md §10.1) offer SGD (momentum 0.9), Adam, AdamW, AGD,
and step / multistep / OneCycle decay. Every released script uses AGD; the
scheduler factory is never called. This module reproduces their update rules
as optax transformations.

Update rules (``g`` gradient, ``p`` parameter, ``λ`` weight decay, ``μ``
momentum, ``α_t`` the schedule's value at step ``t = 0, 1, …``):

* ``'sgd'`` (``torch.optim.SGD``, dampening 0): ``g ← g + λp`` (coupled),
  ``b ← μb + g`` (``b₀ = 0``), ``d = g + μb`` if Nesterov else ``b``,
  ``p ← p − α_t d``.
* ``'adam'`` (``torch.optim.Adam``, coupled L2): ``g ← g + λp``, then
  ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``,
  ``p ← p − α_t m̂/(√v̂ + ε)`` with bias-corrected ``m̂, v̂``.
* ``'adamw'`` (``torch.optim.AdamW``, decoupled):
  ``p ← p − α_t (m̂/(√v̂ + ε) + λp)``.
* ``'agd'``: :func:`nc_jax.optim.agd` (no learning rate, momentum, weight
  decay or schedule). Initialise the parameters with :func:`nc_jax.optim.agd_init`.

Schedules (:func:`make_schedule`) map the optimiser step count to a learning
rate; units are optimiser steps (the official code steps its schedulers per
epoch; pass epoch-based numbers multiplied by the steps per epoch).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import optax

from nc_jax.optim.agd import agd

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "make_optimizer",
    "make_schedule",
]

#: Names accepted by :func:`make_optimizer` (case-insensitive).
OPTIMIZERS = ("sgd", "adam", "adamw", "agd")
#: Names accepted by :func:`make_schedule` (case-insensitive).
SCHEDULES = ("constant", "step", "multistep", "cosine", "onecycle")


# ---------------------------------------------------------------------------
# Argument checks.


def _real(name: str, x: Any, *, lo: float | None = None, hi: float | None = None,
          lo_open: bool = False, hi_open: bool = False) -> float:
  """``x`` as a finite float in the given interval, else ``ValueError`` naming ``name``."""
  if isinstance(x, bool) or not isinstance(x, numbers.Real):
    raise ValueError(f"{name}: expected a real number, got {x!r}")
  x = float(x)
  lo_ok = lo is None or (x > lo if lo_open else x >= lo)
  hi_ok = hi is None or (x < hi if hi_open else x <= hi)
  if not math.isfinite(x) or not lo_ok or not hi_ok:
    lb = "-inf" if lo is None else f"{lo}"
    ub = "inf" if hi is None else f"{hi}"
    interval = f"{'(' if lo_open or lo is None else '['}{lb}, {ub}{')' if hi_open or hi is None else ']'}"
    raise ValueError(f"{name}: expected a finite number in {interval}, got {x}")
  return x


def _int(name: str, x: Any, *, lo: int) -> int:
  if isinstance(x, bool) or not isinstance(x, numbers.Integral):
    raise ValueError(f"{name}: expected an integer >= {lo}, got {x!r}")
  x = int(x)
  if x < lo:
    raise ValueError(f"{name}: expected an integer >= {lo}, got {x}")
  return x


def _choice(name: str, x: Any, valid: Sequence[str]) -> str:
  if not isinstance(x, str) or x.lower() not in valid:
    raise ValueError(f"{name}: unknown value {x!r}; valid: {', '.join(valid)}")
  return x.lower()


# ---------------------------------------------------------------------------
# Schedules.


def _float_count(count: Any) -> jnp.ndarray:
  return jnp.asarray(count).astype(jnp.result_type(float))


def _onecycle(total: int, max_lr: float, div_factor: float, final_div_factor: float,
              pct_start: float, three_phase: bool) -> optax.Schedule:
  """``torch.optim.lr_scheduler.OneCycleLR`` (cosine annealing), step-for-step."""
  initial = max_lr / div_factor
  final = initial / final_div_factor
  if three_phase:
    phases = [(float(pct_start * total) - 1, initial, max_lr),
              (float(2 * pct_start * total) - 2, max_lr, initial),
              (total - 1.0, initial, final)]
  else:
    phases = [(float(pct_start * total) - 1, initial, max_lr),
              (total - 1.0, max_lr, final)]

  def cos_anneal(start: float, end: float, pct: jnp.ndarray) -> jnp.ndarray:
    return end + (start - end) / 2.0 * (jnp.cos(math.pi * pct) + 1.0)

  def schedule(count: Any) -> jnp.ndarray:
    t = jnp.clip(_float_count(count), 0.0, total - 1.0)
    # Evaluate the phases last to first, so that the first phase whose end_step ≥ t
    # wins (torch: ``if step_num <= end_step or i == last``).
    starts = [0.0] + [p[0] for p in phases[:-1]]
    lr = None
    for (end, a, b), start in reversed(list(zip(phases, starts))):
      val = cos_anneal(a, b, (t - start) / (end - start))
      lr = val if lr is None else jnp.where(t <= end, val, lr)
    return lr

  return schedule


def make_schedule(name: str, base_lr: float, total_steps: int | None = None,
                  warmup_steps: int = 0, *, step_size: int | None = None, gamma: float = 0.1,
                  milestones: Sequence[int] | None = None, min_lr: float = 0.0,
                  max_lr: float = 0.25, div_factor: float = 25.0,
                  final_div_factor: float = 1e4, pct_start: float = 0.3,
                  three_phase: bool = True, warmup_init_lr: float = 0.0) -> optax.Schedule:
  r"""Learning-rate schedule ``count ↦ lr`` (an ``optax.Schedule``, pure ``jnp``).

  With ``W = warmup_steps`` and ``T = total_steps − W`` (the main schedule's
  length), the value at step ``t`` is

  * warm-up, ``t < W``: ``warmup_init_lr + (f(0) − warmup_init_lr)·t/W`` (linear
    from ``warmup_init_lr`` to the main schedule's first value, reached at ``t = W``);
  * afterwards ``f(t − W)``: the main schedule **restarts its count after the
    warm-up** (milestones, step sizes and lengths are counted from the end of the
    warm-up, as the official OneCycle, built over ``epochs − warmup_epochs``).

  Main schedules ``f(s)``:

  * ``'constant'``: ``base_lr``.
  * ``'step'`` (``StepLR``): ``base_lr·gamma^⌊s/step_size⌋``; ``step_size`` required.
  * ``'multistep'`` (``MultiStepLR``): ``base_lr·gamma^{#\{m ∈ milestones: m ≤ s\}}``;
    ``milestones`` strictly increasing positive integers.
  * ``'cosine'`` (``CosineAnnealingLR`` without restarts):
    ``min_lr + (base_lr − min_lr)(1 + cos(π·min(s, T)/T))/2``; needs ``total_steps``.
  * ``'onecycle'`` (``OneCycleLR``, cosine annealing, as the official factory:
    ``three_phase=True``, ``pct_start=0.3``, ``max_lr=0.25``, ``div_factor=25``,
    ``final_div_factor=1e4``): ``initial = max_lr/div_factor``,
    ``final = initial/final_div_factor``; three phases initial→max_lr over
    ``[0, pct·T − 1]``, max_lr→initial over ``[pct·T − 1, 2·pct·T − 2]``,
    initial→final over ``[2·pct·T − 2, T − 1]``, each
    ``end + (start − end)(1 + cos(π·frac))/2`` (two phases initial→max→final if
    ``three_phase=False``). Steps ≥ T − 1 stay at ``final`` (torch raises there).
    **``base_lr`` is ignored**, as PyTorch's OneCycleLR overrides the optimiser's
    rate; the peak is ``max_lr``. Momentum is not cycled (torch's
    ``cycle_momentum`` is not reproduced). Needs ``total_steps`` with
    ``pct_start·T > 1``.

  Raises ``ValueError`` naming the argument for an unknown ``name`` (listing the
  valid ones) and for bad numbers: negative rates, ``gamma ≤ 0``,
  ``warmup_steps ≥ total_steps``, a missing ``step_size``/``milestones``/
  ``total_steps``, ``pct_start`` outside (0, 0.5] (three-phase) or (0, 1).
  """
  name = _choice("name", name, SCHEDULES)
  base_lr = _real("base_lr", base_lr, lo=0.0)
  warmup_steps = _int("warmup_steps", warmup_steps, lo=0)
  warmup_init_lr = _real("warmup_init_lr", warmup_init_lr, lo=0.0)
  if total_steps is not None:
    total_steps = _int("total_steps", total_steps, lo=1)
    if warmup_steps >= total_steps:
      raise ValueError(f"warmup_steps: expected < total_steps = {total_steps}, got {warmup_steps}")
  main_len = None if total_steps is None else total_steps - warmup_steps

  def need_total() -> int:
    if main_len is None:
      raise ValueError(f"total_steps: required for schedule {name!r}")
    return main_len

  if name == "constant":
    def main(count: Any) -> jnp.ndarray:
      return jnp.full(jnp.shape(count), base_lr, jnp.result_type(float))
  elif name == "step":
    if step_size is None:
      raise ValueError("step_size: required for schedule 'step'")
    step_size = _int("step_size", step_size, lo=1)
    gamma = _real("gamma", gamma, lo=0.0, lo_open=True)

    def main(count: Any) -> jnp.ndarray:
      k = jnp.asarray(count) // step_size
      return base_lr * jnp.power(gamma, k.astype(jnp.result_type(float)))
  elif name == "multistep":
    if milestones is None:
      raise ValueError("milestones: required for schedule 'multistep'")
    ms = [_int(f"milestones[{i}]", m, lo=1) for i, m in enumerate(milestones)]
    if not ms or any(b <= a for a, b in zip(ms, ms[1:])):
      raise ValueError(f"milestones: expected a non-empty strictly increasing list, got {ms}")
    gamma = _real("gamma", gamma, lo=0.0, lo_open=True)

    def main(count: Any) -> jnp.ndarray:
      c = jnp.asarray(count)
      k = sum((c >= m).astype(jnp.result_type(float)) for m in ms)
      return base_lr * jnp.power(gamma, k)
  elif name == "cosine":
    length = need_total()
    min_lr = _real("min_lr", min_lr, lo=0.0)

    def main(count: Any) -> jnp.ndarray:
      s = jnp.clip(_float_count(count), 0.0, length)
      return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * s / length))
  else:  # onecycle
    length = need_total()
    max_lr = _real("max_lr", max_lr, lo=0.0, lo_open=True)
    div_factor = _real("div_factor", div_factor, lo=0.0, lo_open=True)
    final_div_factor = _real("final_div_factor", final_div_factor, lo=0.0, lo_open=True)
    if three_phase:
      pct_start = _real("pct_start", pct_start, lo=0.0, hi=0.5, lo_open=True)
    else:
      pct_start = _real("pct_start", pct_start, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    if not pct_start * length > 1:
      raise ValueError(
          f"total_steps: 'onecycle' needs pct_start·(total_steps − warmup_steps) > 1, got "
          f"{pct_start}·{length}")
    main = _onecycle(length, max_lr, div_factor, final_div_factor, pct_start, bool(three_phase))

  if warmup_steps == 0:
    return main

  def schedule(count: Any) -> jnp.ndarray:
    c = jnp.asarray(count)
    target = main(jnp.zeros_like(c))
    ramp = warmup_init_lr + (target - warmup_init_lr) * (_float_count(c) / warmup_steps)
    return jnp.where(c < warmup_steps, ramp, main(jnp.maximum(c - warmup_steps, 0)))

  return schedule


# ---------------------------------------------------------------------------
# Optimisers.


def make_optimizer(name: str, *, learning_rate: float | None = None,
                   momentum: float | None = None, nesterov: bool = False,
                   weight_decay: float | None = None,
                   schedule: str | Callable[[Any], Any] | None = "constant",
                   total_steps: int | None = None, warmup_steps: int = 0,
                   schedule_kwargs: Mapping[str, Any] | None = None,
                   b1: float | None = None, b2: float | None = None, eps: float | None = None,
                   gain: float | None = None,
                   torch_layout: Callable[[str], bool] | None = None
                   ) -> optax.GradientTransformation:
  r"""Optimiser by name: ``'sgd'``, ``'adam'``, ``'adamw'`` or ``'agd'`` (case-insensitive).

  Update rules: module docstring. Arguments (``None`` = unset):

  * ``learning_rate`` — base rate ``≥ 0`` of the schedule; required for sgd/adam/adamw
    unless ``schedule`` is ``'onecycle'`` (peak ``max_lr``) or a callable.
  * ``momentum`` — sgd only, in [0, 1); unset → 0.9 (the official ``make_optimiser``).
  * ``nesterov`` — sgd only; needs ``momentum > 0`` (as torch).
  * ``weight_decay`` — ``≥ 0``, unset → 0: coupled (added to the gradient) for sgd and
    adam, decoupled for adamw (the official argparse default was 5e-4; pass it).
  * ``schedule`` — a :data:`SCHEDULES` name, built by :func:`make_schedule` with
    ``base_lr=learning_rate``, ``total_steps``, ``warmup_steps`` and
    ``**schedule_kwargs``; or any ``optax.Schedule`` (then ``warmup_steps`` and
    ``schedule_kwargs`` must be unset).
  * ``b1, b2, eps`` — adam/adamw only; unset → 0.9, 0.999, 1e-8 (the official values).
  * ``gain`` — agd only; unset → 10 (the official value).
  * ``torch_layout`` — agd only: path predicate marking leaves stored as
    ``(out, in, ...)`` (:func:`nc_jax.optim.agd`).

  **AGD** (decision): AGD sets its own step size, so ``learning_rate``, a
  non-zero ``momentum`` or ``weight_decay``, ``nesterov=True``, a schedule other
  than ``'constant'``/``None``, a non-zero ``warmup_steps`` or any
  ``schedule_kwargs`` raise ``ValueError`` naming the argument rather than being
  silently ignored; ``total_steps`` is ignored. Generally, any argument that the
  chosen optimiser does not use must be left unset or neutral, else ``ValueError``.
  Unknown names raise ``ValueError`` listing :data:`OPTIMIZERS`.
  """
  name = _choice("name", name, OPTIMIZERS)
  schedule_kwargs = dict(schedule_kwargs or {})
  warmup_steps = _int("warmup_steps", warmup_steps, lo=0)
  if not isinstance(nesterov, bool):
    raise ValueError(f"nesterov: expected a bool, got {nesterov!r}")

  def unused(arg: str, value: Any, neutral: tuple[Any, ...] = (None,)) -> None:
    if not any(value is n or (n is not None and not isinstance(value, bool) and value == n)
               for n in neutral):
      raise ValueError(f"{arg}: not used by optimiser {name!r}; leave it unset (got {value!r})")

  if name == "agd":
    for arg, value, neutral in (("learning_rate", learning_rate, (None,)),
                                ("momentum", momentum, (None, 0)),
                                ("nesterov", nesterov, (False,)),
                                ("weight_decay", weight_decay, (None, 0)),
                                ("schedule", schedule, (None, "constant")),
                                ("warmup_steps", warmup_steps, (0,)),
                                ("b1", b1, (None,)), ("b2", b2, (None,)), ("eps", eps, (None,))):
      unused(arg, value, neutral)
    if schedule_kwargs:
      raise ValueError(f"schedule_kwargs: not used by optimiser 'agd' (got {schedule_kwargs})")
    return agd(10.0 if gain is None else _real("gain", gain, lo=0.0, lo_open=True),
               torch_layout=torch_layout)

  unused("gain", gain)
  unused("torch_layout", torch_layout)
  weight_decay = 0.0 if weight_decay is None else _real("weight_decay", weight_decay, lo=0.0)

  if callable(schedule):
    if warmup_steps or schedule_kwargs:
      raise ValueError("warmup_steps/schedule_kwargs: not used with a callable schedule")
    if learning_rate is not None:
      raise ValueError("learning_rate: not used with a callable schedule; leave it unset")
    lr_fn = schedule
  else:
    sched_name = _choice("schedule", "constant" if schedule is None else schedule, SCHEDULES)
    if learning_rate is None:
      if sched_name != "onecycle":
        raise ValueError(f"learning_rate: required for optimiser {name!r}")
      learning_rate = 0.0  # ignored by 'onecycle'
    learning_rate = _real("learning_rate", learning_rate, lo=0.0)
    lr_fn = make_schedule(sched_name, learning_rate, total_steps, warmup_steps,
                          **schedule_kwargs)

  if name == "sgd":
    for arg, value in (("b1", b1), ("b2", b2), ("eps", eps)):
      unused(arg, value)
    momentum = 0.9 if momentum is None else _real("momentum", momentum, lo=0.0, hi=1.0,
                                                  hi_open=True)
    if nesterov and momentum == 0:
      raise ValueError("nesterov: Nesterov momentum requires momentum > 0")
    parts = []
    if weight_decay > 0:
      parts.append(optax.add_decayed_weights(weight_decay))
    if momentum > 0:
      parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    parts.append(optax.scale_by_learning_rate(lr_fn))
    return optax.chain(*parts)

  # adam / adamw
  unused("momentum", momentum)
  unused("nesterov", nesterov, (False,))
  b1 = 0.9 if b1 is None else _real("b1", b1, lo=0.0, hi=1.0, hi_open=True)
  b2 = 0.999 if b2 is None else _real("b2", b2, lo=0.0, hi=1.0, hi_open=True)
  eps = 1e-8 if eps is None else _real("eps", eps, lo=0.0, lo_open=True)
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  decay = [optax.add_decayed_weights(weight_decay)] if weight_decay > 0 else []
  if name == "adam":
    return optax.chain(*decay, adam, optax.scale_by_learning_rate(lr_fn))
  return optax.chain(adam, *decay, optax.scale_by_learning_rate(lr_fn))
