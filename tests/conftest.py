"""Test session set-up.

Runs before JAX initialises: 8 fake CPU devices for the sharding tests, a persistent
compilation cache for the session (shared with child processes), one BLAS/Eigen thread
per op (CI has 2 cores; oversubscribing them makes small LAPACK calls orders of magnitude
slower), XLA:CPU's LLVM back end at level 0 (compiling dominates the suite), and float64
enabled so that finite-difference checks can run in double precision. Float32 tests pass
float32 arrays explicitly.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
_LLVM_LEVEL_0 = "--xla_backend_optimization_level=0"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# XLA:CPU's LLVM back end at optimisation level 0 for the test session (and the child
# processes it starts): most of the suite's time is compiling many small programs, and level 0
# cut the whole suite from 588 s to 507 s on a 2-core box (BUILD_NOTES §6). XLA's own (HLO)
# passes, fusion included, still run; matmuls and LAPACK calls are library calls either way;
# without fast math LLVM keeps IEEE semantics, so results can differ from level 3's only at
# round-off (where level 3 fuses a multiply and an add), which every tolerance here allows;
# every bitwise comparison in the suite compares two runs compiled alike. The deviceless H100
# compile of tests/test_gpu_program.py is given the caller's flags without it.
# NC_JAX_TEST_FAST_CPU_COMPILE=0 runs the suite at XLA's default level (3).
if (os.environ.get("NC_JAX_TEST_FAST_CPU_COMPILE", "1") != "0"
    and "xla_backend_optimization_level" not in _flags):
  _flags += " " + _LLVM_LEVEL_0
  os.environ["NC_JAX_TEST_ADDED_XLA_FLAGS"] = _LLVM_LEVEL_0
os.environ["XLA_FLAGS"] = _flags.strip()
# One persistent compilation cache for the session (JAX's own, keyed on the program, the
# compile options and the backend), inherited by the child processes the fault tests start.
# Without it the same programs (the runner's smoke configuration, UFM's) are compiled again in
# every child process and after every module's jax.clear_caches(): the fault tests spent most
# of their time compiling (BUILD_NOTES §6). Every entry is cached (no minimum compile time).
# A directory the caller exported is used as it is and kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="nc_jax-tests-compilation-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import ctypes  # noqa: E402
import gc  # noqa: E402

import pytest  # noqa: E402


def _resident_mib() -> int:
  """This process's resident memory in MiB (Linux; -1 elsewhere)."""
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))
  except (OSError, StopIteration):
    return -1


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs(request):
  """Frees every module's compiled programs and returns the memory to the OS afterwards.

  Why: the whole suite runs in one process with 8 fake devices, and JAX keeps every compiled
  executable (and its per-device buffers) cached for the life of the process. Without this the
  resident set grew to ~6 GB by the end of the suite, and a CI run aborted in the XLA runtime
  (SIGABRT, exit 134) two thirds of the way through. Programs are only reused within a module,
  so clearing between modules costs no recompilation that mattered. ``malloc_trim`` hands the
  freed arenas back (glibc keeps them otherwise, and RSS would not fall).
  """
  yield
  jax.clear_caches()
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass
  if os.environ.get("NC_JAX_TEST_MEMORY_LOG"):
    with open(os.environ["NC_JAX_TEST_MEMORY_LOG"], "a") as f:
      f.write(f"{_resident_mib()} MiB after {request.module.__name__}\n")
