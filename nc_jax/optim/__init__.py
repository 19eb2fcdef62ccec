"""Optimisers for training the backbone (docs/method.md §10.1).

* :func:`agd`, :func:`agd_init` — automatic gradient descent (Bernstein et al.
  2023) and its orthogonal initialisation, as the official code uses them
  (gain 10; every released script trains with it).
* :func:`make_optimizer`, :func:`make_schedule` — SGD / Adam / AdamW / AGD and
  constant / step / multistep / cosine / OneCycle schedules with linear warm-up,
  with PyTorch semantics.
"""

from nc_jax.optim.agd import (AGDState, agd, agd_eta, agd_eta_from_state, agd_init,
                              agd_singular_value)
from nc_jax.optim.factory import OPTIMIZERS, SCHEDULES, make_optimizer, make_schedule

__all__ = [
    "AGDState", "OPTIMIZERS", "SCHEDULES", "agd", "agd_eta", "agd_eta_from_state", "agd_init",
    "agd_singular_value", "make_optimizer", "make_schedule",
]
