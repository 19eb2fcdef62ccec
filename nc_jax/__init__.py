"""nc_jax: guiding neural collapse towards the nearest simplex ETF, in JAX.

Core API:

* :func:`nearest_etf` — exact nearest-ETF solver (closed form or Riemannian
  gradient descent) with an implicit-differentiation VJP.
* :func:`normalise_means` — class means to solver input (centre, normalise).
* :mod:`nc_jax.geometry`, :mod:`nc_jax.stiefel` — ETF and Stiefel geometry.
* :mod:`nc_jax.newton_schulz` — matmul-only polar factor and Lyapunov solve (the
  ``factorisation="newton_schulz"`` path).
* :mod:`nc_jax.class_means` — the paper's moving average of class means.
* :mod:`nc_jax.metrics` — neural-collapse metrics, in memory and streaming.

Training engine: :mod:`nc_jax.models` (Flax ResNet/VGG/MLP backbones),
:mod:`nc_jax.heads` (standard, fixed-ETF and implicit-ETF classifiers; as Flax NNX
modules in :mod:`nc_jax.nnx`),
:mod:`nc_jax.optim` (AGD and the Optax factory), :mod:`nc_jax.data` (datasets,
augmentation, batching), :mod:`nc_jax.train` (train state and sharded steps),
:mod:`nc_jax.pipeline` (a run's data, device-resident or streaming, one interface),
:mod:`nc_jax.loop` (epochs, evaluation, resume), :mod:`nc_jax.checkpoint`,
:mod:`nc_jax.evaluate` (NC metrics of a model's features), :mod:`nc_jax.config` (a validated
run description).
"""

# Submodules (``nc_jax.class_means`` is the module; its function of the same name is
# ``nc_jax.class_means.class_means``).
from nc_jax import class_means, geometry, metrics, newton_schulz, stiefel
from nc_jax import (checkpoint, config, data, evaluate, heads, loop, models, nnx, optim,
                    pipeline, train)
from nc_jax.geometry import (centring_matrix, etf_distance, nearest_etf_closed_form, random_etf,
                             simplex_etf)
from nc_jax.metrics import ce_lower_bound, nc_metrics, nc_metrics_streaming
from nc_jax.solver import SolverInfo, feasibility_solution, nearest_etf, normalise_means, polar_vjp

__version__ = "0.1.0"

__all__ = [
    "SolverInfo", "ce_lower_bound", "centring_matrix", "checkpoint", "class_means", "config",
    "data", "etf_distance", "evaluate", "feasibility_solution", "geometry", "heads", "loop",
    "metrics", "models", "newton_schulz", "nnx", "optim", "pipeline", "train", "nc_metrics",
    "nc_metrics_streaming",
    "nearest_etf", "nearest_etf_closed_form", "normalise_means", "polar_vjp", "random_etf",
    "simplex_etf", "stiefel",
]
