"""One BLAS thread for the command-line programs, unless the caller exported another count.

Imports nothing but ``os``: :func:`set_blas_defaults` has to run before JAX (and the LAPACK
and BLAS libraries it loads) is imported, because those libraries read the variables once,
when they load. The runners (``python -m experiments.<name>``) and the benchmarks
(``python -m benchmarks.<name>``) call it at the top of the module, only when run as a
program, so importing them from a notebook or a test changes nothing.

Why one thread. XLA's CPU backend already runs its own intra-op thread pool on every core,
and JAX's CPU ``svd``/``eigh``/``qr`` (the implicit head's nearest-ETF solve, the host-side NC
metrics) call LAPACK from inside it. A multi-threaded BLAS then oversubscribes the cores: on a
2-core machine (jax 0.10.2, OpenBLAS from SciPy) two BLAS threads made a 512×100 QR take
~1.3 s instead of 0.6 ms on some calls, a 2048×1000 SVD ~1.2 s instead of 0.32 s, and a
40-iteration implicit UFM-100 run 16.2 s instead of 10.0 s (BUILD_NOTES §5, §9). XLA's own
matmuls are unaffected, and GPU steps do not use the host BLAS. The thread count changes
float32 results at rounding level only, so it is recorded with every run segment
(``environment.jsonl``, :meth:`experiments.run_folder.RunFolder.append_environment`) but
does not stop a resume.
"""

from __future__ import annotations

import os

# Thread-count variables read by the BLAS/LAPACK libraries that JAX's CPU backend and NumPy
# may call into (OpenBLAS, OpenMP builds, MKL).
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def set_blas_defaults(blas_threads: int = 1) -> dict[str, str]:
  """Sets each of :data:`BLAS_THREAD_VARIABLES` to ``blas_threads`` unless already set.

  Call before importing JAX or NumPy; a variable the caller exported wins.

  Args:
    blas_threads: the default thread count, a positive integer.

  Returns:
    The effective value of each variable.

  Raises:
    ValueError: ``blas_threads`` is not a positive integer.
  """
  if isinstance(blas_threads, bool) or not isinstance(blas_threads, int) or blas_threads < 1:
    raise ValueError(f"blas_threads: expected a positive integer, got {blas_threads!r}")
  for name in BLAS_THREAD_VARIABLES:
    os.environ.setdefault(name, str(blas_threads))
  return {name: os.environ[name] for name in BLAS_THREAD_VARIABLES}


def blas_threads_now() -> dict[str, str | None]:
  """The current value of each of :data:`BLAS_THREAD_VARIABLES` (``None`` where unset)."""
  return {name: os.environ.get(name) for name in BLAS_THREAD_VARIABLES}
