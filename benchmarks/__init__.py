"""Benchmarks for nc_jax (run from the repository root as ``python -m benchmarks.<name>``).

This package imports nothing heavy: :func:`set_thread_defaults` must run before
JAX (and the LAPACK it loads) is imported, so it lives here and uses ``os`` only.
"""

from __future__ import annotations

import os
import platform

# Thread-count variables read by the BLAS/LAPACK libraries that JAX's CPU
# backend may call into (OpenBLAS, OpenMP builds, MKL).
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def set_thread_defaults(blas_threads: int = 1) -> dict[str, str]:
  """Sets the BLAS thread counts unless the caller already set them; call before importing JAX.

  Why one BLAS thread. XLA's CPU backend already runs its own intra-op thread
  pool on every core, and JAX's CPU ``svd``/``eigh``/``qr`` call LAPACK from
  inside it. With a multi-threaded BLAS the two pools oversubscribe the cores:
  on a 2-core machine (jax 0.10.2, OpenBLAS from SciPy) two BLAS threads made a
  512×100 QR take ~1.3 s instead of 0.6 ms on some calls, and a 2048×1000 SVD
  ~1.2 s instead of 0.32 s, with large call-to-call variance; XLA's own matmuls
  were unaffected. One BLAS thread was the fastest and the most stable at every
  size tried. GPU runs do not use host BLAS in the timed code, so the setting
  is harmless there. Override by exporting the variables before the run.

  Returns:
    The effective values of :data:`BLAS_THREAD_VARIABLES`.
  """
  for name in BLAS_THREAD_VARIABLES:
    os.environ.setdefault(name, str(int(blas_threads)))
  return {name: os.environ[name] for name in BLAS_THREAD_VARIABLES}


def cpu_model() -> str:
  """The host CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
