"""Test session set-up.

Runs before JAX initialises: 8 fake CPU devices for the sharding tests, one
BLAS/Eigen thread per op (CI has 2 cores; oversubscribing them makes small
LAPACK calls orders of magnitude slower), and float64 enabled so that
finite-difference checks can run in double precision. Float32 tests pass
float32 arrays explicitly.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)


