"""Benchmarks for nc_jax (run from the repository root as ``python -m benchmarks.<name>``).

This package imports nothing heavy: :func:`set_thread_defaults` (one BLAS thread unless
exported; why: :mod:`experiments.threads`) must run before JAX and the LAPACK it loads are
imported.
"""

from __future__ import annotations

# The benchmarks and the experiment runners share one thread policy (os-only imports).
from experiments.threads import BLAS_THREAD_VARIABLES  # noqa: F401 (re-exported)
from experiments.threads import set_blas_defaults as set_thread_defaults  # noqa: F401
from experiments.run_folder import cpu_model  # noqa: F401 (os/platform only)
