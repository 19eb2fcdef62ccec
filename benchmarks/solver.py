r"""Benchmark of the nearest-ETF layer: time and memory, forward and forward+backward.

Run from the repository root::

    python -m benchmarks.solver                  # default sizes, Markdown to stdout
    python -m benchmarks.solver --quick          # tiny sizes, smoke run (seconds)
    python -m benchmarks.solver --sizes 512x100 --variants polar-svd,dense-ddn --json out.json

What is measured (docs/method.md §3, §6). The layer maps unit-Frobenius centred
class means :math:`\bar Y` (d×K) and the previous solution :math:`P_{prev}` to
:math:`P^\star = \mathrm{polar}(c\bar YM + \delta P_{prev})`. Training calls it once
per step, forward and backward, so that is what is timed, in float32 with
``Precision.HIGHEST`` (the library's default), at (d, K) = (512, 10) and
(512, 100) (ResNet18 on CIFAR10/100), (2048, 100) and (2048, 1000) (ResNet50 on
CIFAR100/ImageNet). Variants:

* ``polar-svd``, ``polar-eigh``, ``polar-qdwh``: ``nearest_etf(method="polar")``
  with that factorisation; backward = the closed-form Lyapunov VJP (one K×K eigh).
* ``polar-ns``: ``factorisation="newton_schulz"``, matrix products only in both
  directions (scaled Newton–Schulz forward, block-sign Lyapunov backward), a fixed
  schedule: no loop, no conditional.
* ``polar-auto``: the default ``factorisation="auto"``, chosen inside the compiled
  program for the platform it runs on (``polar-ns`` on GPUs; on CPU see
  ``nc_jax.solver.AUTO_FACTORISATION``).
* ``naive-gram``: a reference, not a library path: eigh of BᵀB, P = BVΣ⁻¹Vᵀ (eigenvalues
  floored at eps·λ_max), no refinement, with the library's implicit backward
  (:func:`nc_jax.polar_vjp`). The fastest way to a polar factor on a CPU and inaccurate
  (~κ²ε: 2e-4 at (512, 10)); the CPU path ``polar-eigh`` is measured against it.
* ``rgd-warm``: ``nearest_etf(method="rgd")``, Riemannian gradient descent
  warm-started as in training: ``prox`` is the exact solution for a slightly
  different :math:`\bar Y_1` (:math:`\bar Y_0` plus a 1e-3-relative random
  perturbation, re-normalised), as between consecutive training steps. Its
  iteration count is reported (QDWH's and Newton–Schulz's too).
* ``dense-ddn``: the official baseline, polar-svd forward followed by
  :func:`nc_jax.reference_ddn.dense_ddn_vjp`, the transcription of the official
  dense DDN backward (O(dK⁵) time, O(dK³ + K⁴) memory). Its constraint constant is
  built once outside the timed region, as the official layer builds it at
  construction; everything else is timed. It runs only where K ≤ 100 and the
  estimate 2·4·(dK³ + 2·T·dK + K⁴) bytes (einsum tensor, A and t with
  T = K(K+1)/2 rows, constant terms; float32; ×2 for temporaries) is below a
  budget, by default 40 % of the accelerator's memory limit or, on CPU, of the
  available RAM; otherwise the table says ``n/a (needs X GiB …)``.

Every variant sees the same inputs :math:`(\bar Y_0, P_{prev})` and the same
fixed random cotangent :math:`G`, centred over classes (G·1 = 0) like a
training cotangent: the loss sees P only through :math:`W \propto MP^T`. Forward = ``nearest_etf(Y, prox)``;
forward+backward = ``jax.value_and_grad(Y ↦ ⟨G, nearest_etf(Y, prox)⟩)`` (for
``dense-ddn``: ⟨G, P⟩ and the DDN gradient), each one ``jax.jit``-compiled
ahead of time, so compile time never enters a timing. One warm-up call, then
N timed calls, each ended by ``jax.block_until_ready``; the table gives the
median. N is adaptive (about 2 s of calls per measurement, 1–50 calls) unless
``--repeats`` fixes it.

Memory. "compiled MiB" is XLA's static estimate of the forward+backward
executable (temp + argument + output − aliased bytes; ``memory_analysis()``),
available on every backend: the portable number. "device peak MiB" is the
allocator's ``peak_bytes_in_use`` minus the ``bytes_in_use`` before the
measurement, where ``device.memory_stats()`` exists (GPU/TPU). That peak
cannot be reset, so the ``dense-ddn`` runs (the largest) go last, and a value
is marked "≤" when the measurement did not set a new high-water mark (then it
is only an upper bound).

Accuracy check. "P / PM max err" and "grad rel. err" compare each variant's
float32 output with an untimed float64 NumPy closed form (SVD polar factor and
the polar VJP of docs/method.md §6.1) at the same inputs: a fast variant must also
be a correct one (the dense DDN and the Lyapunov VJP agree to float32 rounding).
PM = P·M is the part the classifier W depends on; P also has the column
direction P·1/√K, pinned only by δ, whose float32 error is ~eps·σ_max(B)/δ.

Threads. :func:`benchmarks.set_thread_defaults` runs before JAX is imported and
sets one BLAS thread (unless the environment sets another count): XLA's own
thread pool already uses every core, and multi-threaded LAPACK inside it
oversubscribed a 2-core CPU by orders of magnitude on some calls (see its
docstring). The header reports the effective settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Sequence

from benchmarks import set_thread_defaults

set_thread_defaults()  # before JAX and its LAPACK are loaded

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _common as common  # noqa: E402
from nc_jax import feasibility_solution, nearest_etf, normalise_means, polar_vjp  # noqa: E402
from nc_jax._linalg import centre_columns, mm, mtm  # noqa: E402
from nc_jax.reference_ddn import constraint_constant, dense_ddn_vjp  # noqa: E402
from nc_jax.solver import DEFAULT_DELTA  # noqa: E402

DELTA = DEFAULT_DELTA
DTYPE = jnp.float32
PERTURBATION = 1e-3          # relative change of Ȳ between the warm start and the solve
DEFAULT_SIZES = ((512, 10), (512, 100), (2048, 100), (2048, 1000))
QUICK_SIZES = ((16, 4), (64, 10))
DDN = "dense-ddn"
DDN_MAX_CLASSES = 100
DDN_BUDGET_FRACTION = 0.4
# nearest_etf keyword arguments of each variant's forward (dense-ddn: polar-svd).
VARIANTS: dict[str, dict[str, str]] = {
    "polar-svd": {"method": "polar", "factorisation": "svd"},
    "polar-eigh": {"method": "polar", "factorisation": "eigh"},
    "polar-qdwh": {"method": "polar", "factorisation": "qdwh"},
    "polar-ns": {"method": "polar", "factorisation": "newton_schulz"},
    "polar-auto": {"method": "polar", "factorisation": "auto"},
    "naive-gram": {},  # benchmark-local reference (_naive_gram)
    "rgd-warm": {"method": "rgd"},
    DDN: {"method": "polar", "factorisation": "svd"},
}
ITERATIVE = ("polar-qdwh", "polar-ns", "polar-auto", "rgd-warm")


# --------------------------------------------------------------------------- #
# Inputs and the functions under test
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Inputs:
  """Ȳ₀ (unit-Frobenius, centred), warm-start P_prev, cotangent G, float64 reference."""
  y: jax.Array
  prox: jax.Array
  g: jax.Array
  reference_p: np.ndarray     # float64 solution P*
  reference_grad: np.ndarray  # float64 ∂⟨G, P*⟩/∂Ȳ

  @property
  def size(self) -> tuple[int, int]:
    return tuple(self.y.shape)


def make_inputs(d: int, k: int, seed: int) -> Inputs:
  """Random class means and a training-like warm start (module docstring)."""
  key_y, key_e, key_g = jax.random.split(jax.random.key(seed), 3)
  y = normalise_means(jax.random.normal(key_y, (d, k), DTYPE))
  noise = jax.random.normal(key_e, (d, k), DTYPE)
  y_prev = normalise_means(y + PERTURBATION * noise / jnp.linalg.norm(noise))  # ‖y‖ = 1
  # The exact solution at the previous step (first-step rule: feasibility start).
  prox = nearest_etf(y_prev, feasibility_solution(y_prev), delta=DELTA)
  # Training-like cotangent: the loss sees P only through W ∝ M·Pᵀ, so ∂L/∂P = (…)·M.
  g = normalise_means(jax.random.normal(key_g, (d, k), DTYPE))
  return Inputs(y, prox, g, *reference_solution(*(np.asarray(a, np.float64) for a in (y, prox, g))))


def reference_solution(y: np.ndarray, prox: np.ndarray, g: np.ndarray):
  """Float64 NumPy closed form P* and its gradient (docs/method.md §3, §6.1), untimed.

  B = cȲM + δP_prev = UΣVᵀ, P* = UVᵀ; with X = UᵀGV and Ω_ij = (X_ij − X_ji)/(σ_i + σ_j):
  ∂L/∂B = UΩVᵀ + (G − UUᵀG)VΣ⁻¹Vᵀ and ∂L/∂Ȳ = c·(∂L/∂B)·M. Independent of the
  library's code, so "grad rel. err" measures each variant's float32 accuracy.
  """
  k = y.shape[1]
  c = 2.0 / np.sqrt(k - 1.0)
  u, s, vt = np.linalg.svd(c * _centre(y) + DELTA * prox, full_matrices=False)
  x = u.T @ g @ vt.T
  omega = (x - x.T) / (s[:, None] + s[None, :])
  grad_b = u @ omega @ vt + (g - u @ (u.T @ g)) @ (vt.T / s) @ vt
  return u @ vt, c * _centre(grad_b)


def _centre(x: np.ndarray) -> np.ndarray:
  """X·M (subtract each row's mean over the K columns)."""
  return x - x.mean(axis=1, keepdims=True)


@jax.custom_vjp
def _naive_gram(y, prox):
  return _naive_gram_fwd(y, prox)[0]


def _naive_gram_fwd(y, prox):
  c = 2.0 / jnp.sqrt(jnp.asarray(y.shape[-1] - 1.0, y.dtype))
  b = c * centre_columns(y) + DELTA * prox
  lam, vecs = jnp.linalg.eigh(mtm(b, b))
  sig = jnp.sqrt(jnp.maximum(lam, jnp.finfo(b.dtype).eps * lam[-1]))
  p = mm(b, mm(vecs / sig, vecs.T))
  return p, (p, b, c)


def _naive_gram_bwd(residuals, g):
  p, b, c = residuals
  return c * centre_columns(polar_vjp(p, b, g)), jnp.zeros_like(p)


_naive_gram.defvjp(_naive_gram_fwd, _naive_gram_bwd)


def forward_fn(variant: str) -> Callable[..., jax.Array]:
  """(Y, prox) ↦ P for one variant."""
  if variant == "naive-gram":
    return _naive_gram
  kwargs = VARIANTS[variant]

  def forward(y, prox):
    return nearest_etf(y, prox, delta=DELTA, **kwargs)

  return forward


def fwd_bwd_fn(variant: str) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """(Y, prox, G[, constant]) ↦ (⟨G, P⟩, ∂⟨G, P⟩/∂Y) for one variant."""
  forward = forward_fn(variant)
  if variant == DDN:
    def ddn(y, prox, g, constant):
      p = forward(y, prox)
      return jnp.vdot(g, p), dense_ddn_vjp(y, prox, p, g, DELTA, constant)
    return ddn
  return jax.value_and_grad(lambda y, prox, g: jnp.vdot(g, forward(y, prox)))


def solver_iterations(variant: str, inputs: Inputs) -> int | None:
  """RGD/QDWH iteration count at the benchmark inputs (untimed), else ``None``."""
  if variant not in ITERATIVE:
    return None
  _, info = nearest_etf(inputs.y, inputs.prox, delta=DELTA, return_info=True,
                        **VARIANTS[variant])
  return int(info.iterations)


def ddn_memory_estimate_bytes(d: int, k: int) -> float:
  """Float32 bytes of the dense DDN backward: 2 × 4 × (dK³ + 2·T·dK + K⁴), T = K(K+1)/2."""
  t = k * (k + 1) // 2
  return 2.0 * 4.0 * (d * k**3 + 2.0 * t * d * k + k**4)


def ddn_skip_reason(d: int, k: int, budget_bytes: float | None) -> str | None:
  """Why the dense DDN cannot run at (d, K), or ``None`` if it fits."""
  need = ddn_memory_estimate_bytes(d, k)
  if k > DDN_MAX_CLASSES:
    return f"n/a (K > {DDN_MAX_CLASSES}; needs {_gib(need)})"
  if budget_bytes is not None and need > budget_bytes:
    return f"n/a (needs {_gib(need)} > {_gib(budget_bytes)} budget)"
  return None


# --------------------------------------------------------------------------- #
# Measurement
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Measurement:
  """Timing and memory of one compiled function."""
  timing: common.Timing
  compile_s: float
  compiled_bytes: int | None
  device_peak: common.DevicePeak | None

  def as_json(self) -> dict[str, Any]:
    peak = self.device_peak
    return {
        "median_ms": 1e3 * self.timing.median_s,
        "min_ms": 1e3 * self.timing.min_s,
        "repeats": self.timing.repeats,
        "samples_ms": [1e3 * s for s in self.timing.samples],
        "compile_s": self.compile_s,
        "compiled_bytes": self.compiled_bytes,
        "device_peak_bytes": None if peak is None else peak.bytes,
        "device_peak_exact": None if peak is None else peak.exact,
    }


def measure(fn: Callable[..., Any], args: Sequence[Any],
            policy: common.RepeatPolicy) -> tuple[Measurement, Any]:
  """Compile ahead of time, then warm-up + timed calls under a device-peak tracker."""
  compiled = common.compile_jit(fn, *args)
  with common.DevicePeakTracker() as peak:
    timing, out = common.time_calls(compiled.call, args, policy)
  return Measurement(timing, compiled.compile_s, compiled.memory_bytes, peak.result), out


@dataclasses.dataclass
class Result:
  """One (size, variant) row."""
  d: int
  k: int
  variant: str
  forward: Measurement | None = None
  fwd_bwd: Measurement | None = None
  iterations: int | None = None
  p_max_err: float | None = None      # max |P − P*_float64| of the forward output
  pm_max_err: float | None = None     # max |(P − P*_float64)·M|, the part W depends on
  grad_rel_err: float | None = None   # ‖∇ − ∇_float64‖ / ‖∇_float64‖ of fwd+bwd
  skipped: str | None = None
  ddn_ratio: float | None = None  # dense-ddn fwd+bwd time / this variant's

  def as_json(self) -> dict[str, Any]:
    return {
        "d": self.d, "K": self.k, "variant": self.variant, "skipped": self.skipped,
        "forward": self.forward and self.forward.as_json(),
        "forward_backward": self.fwd_bwd and self.fwd_bwd.as_json(),
        "iterations": self.iterations,
        "p_max_abs_err_vs_float64": self.p_max_err,
        "pm_max_abs_err_vs_float64": self.pm_max_err,
        "grad_rel_err_vs_float64": self.grad_rel_err,
        "ddn_ratio_fwd_bwd": self.ddn_ratio,
        "ddn_memory_estimate_bytes": (ddn_memory_estimate_bytes(self.d, self.k)
                                      if self.variant == DDN else None),
    }


def benchmark_variant(variant: str, inputs: Inputs, policy: common.RepeatPolicy,
                      ddn_budget_bytes: float | None) -> Result:
  """Forward and forward+backward measurements of one variant at one size."""
  d, k = inputs.size
  result = Result(d, k, variant)
  extra = ()
  if variant == DDN:
    result.skipped = ddn_skip_reason(d, k, ddn_budget_bytes)
    if result.skipped:
      return result
    extra = (jax.block_until_ready(constraint_constant(k, DTYPE)),)  # layer construction
  result.forward, p = measure(forward_fn(variant), (inputs.y, inputs.prox), policy)
  result.fwd_bwd, (_, grad) = measure(fwd_bwd_fn(variant),
                                      (inputs.y, inputs.prox, inputs.g, *extra), policy)
  p_err = np.asarray(p, np.float64) - inputs.reference_p
  result.p_max_err = float(np.max(np.abs(p_err)))
  result.pm_max_err = float(np.max(np.abs(_centre(p_err))))
  ref = inputs.reference_grad
  result.grad_rel_err = float(np.linalg.norm(np.asarray(grad, np.float64) - ref)
                              / np.linalg.norm(ref))
  result.iterations = solver_iterations(variant, inputs)
  return result


def run_benchmarks(sizes: Sequence[tuple[int, int]], variants: Sequence[str],
                   policy: common.RepeatPolicy, ddn_budget_bytes: float | None,
                   seed: int = 0, on_result=None) -> list[Result]:
  """All (size, variant) results in table order; dense-ddn is executed last (device peak).

  ``on_result(results_so_far)`` is called after each measurement (partial JSON, so a run
  stopped by a time limit keeps what it measured).
  """
  inputs = {}
  schedule = [(s, v) for s in sizes for v in variants if v != DDN]
  schedule += [(s, DDN) for s in sizes if DDN in variants]
  done = {}
  for size, variant in schedule:
    if size not in inputs:
      inputs[size] = make_inputs(*size, seed=seed)
    result = benchmark_variant(variant, inputs[size], policy, ddn_budget_bytes)
    _log(result)
    done[size, variant] = result
    if on_result is not None:
      on_result(list(done.values()))
  results = [done[s, v] for s in sizes for v in variants]
  for r in results:
    ddn = done.get(((r.d, r.k), DDN))
    if ddn is not None and ddn.fwd_bwd is not None and r.fwd_bwd is not None:
      r.ddn_ratio = ddn.fwd_bwd.timing.median_s / r.fwd_bwd.timing.median_s
  return results


def _log(r: Result) -> None:
  if r.skipped:
    msg = r.skipped
  else:
    msg = (f"fwd {_ms(r.forward)} ms, fwd+bwd {_ms(r.fwd_bwd)} ms "
           f"(compile {r.forward.compile_s:.1f}+{r.fwd_bwd.compile_s:.1f} s)")
  print(f"[{r.d}x{r.k}] {r.variant}: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #


def _gib(nbytes: float) -> str:
  gib = nbytes / common.GIB
  return f"{gib:,.0f} GiB" if gib >= 100 else f"{gib:.1f} GiB"


_num = common.fmt_num


def _ms(m: Measurement | None) -> str:
  return "–" if m is None else _num(1e3 * m.timing.median_s)


_mib = common.fmt_mib


def _device_peak(m: Measurement | None) -> str:
  if m is None or m.device_peak is None:
    return "–"
  return ("" if m.device_peak.exact else "≤ ") + _mib(m.device_peak.bytes)


TABLE_HEADERS = ("d", "K", "variant", "fwd ms", "fwd+bwd ms", "repeats", "compiled MiB",
                 "device peak MiB", "dense-ddn / variant", "iterations",
                 "P / PM max err", "grad rel. err")


def table_row(r: Result) -> list[str]:
  if r.skipped:
    return [str(r.d), str(r.k), r.variant, "n/a", r.skipped] + ["–"] * 7
  ratio = "–" if r.ddn_ratio is None else f"{_num(r.ddn_ratio)}×"
  return [
      str(r.d), str(r.k), r.variant, _ms(r.forward), _ms(r.fwd_bwd),
      f"{r.forward.timing.repeats}/{r.fwd_bwd.timing.repeats}",
      _mib(r.fwd_bwd.compiled_bytes), _device_peak(r.fwd_bwd), ratio,
      "–" if r.iterations is None else str(r.iterations),
      f"{r.p_max_err:.0e} / {r.pm_max_err:.0e}", f"{r.grad_rel_err:.1e}",
  ]


def report(env: dict[str, Any], settings: dict[str, Any], results: Sequence[Result]) -> str:
  """The Markdown report: header, table, legend."""
  lines = ["# nearest-ETF layer benchmark (`benchmarks/solver.py`)", ""]
  lines += common.environment_lines(env)
  lines += [f"- settings: float32, HIGHEST precision, δ = {DELTA}, warm-start perturbation "
            f"{PERTURBATION} (relative), seed {settings['seed']}, repeats "
            f"{settings['repeats_policy']}, dense-ddn budget {settings['ddn_budget']}", ""]
  lines.append(common.markdown_table(TABLE_HEADERS, [table_row(r) for r in results],
                                     right_align_from=3))
  lines += [
      "",
      "Times: median wall-clock ms over the timed calls after one warm-up (compile excluded); "
      "repeats = timed calls fwd/fwd+bwd. compiled MiB: XLA memory analysis of the fwd+bwd "
      "executable (temp + arguments + outputs; for dense-ddn the arguments include the "
      "constraint constant). device peak MiB: allocator peak above the memory live before "
      "the fwd+bwd calls ('≤': upper bound, not a new high-water mark; '–': no device "
      "statistics, e.g. CPU). dense-ddn / variant: ratio of fwd+bwd medians. iterations: "
      "RGD (warm-started) or QDWH iterations. P / PM max err: max|P − P*| and "
      "max|(P − P*)M| (the part W = √(K/(K−1))·M·Pᵀ depends on) of the forward output; "
      "grad rel. err: ‖∇ − ∇*‖/‖∇*‖ of the fwd+bwd gradient; (P*, ∇*) from a float64 NumPy "
      "closed form at the same inputs.",
  ]
  return "\n".join(lines)


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
  """``"512x10,2048x100"`` → ((512, 10), (2048, 100)); requires d ≥ K ≥ 2."""
  sizes = []
  for item in text.split(","):
    try:
      d, k = (int(x) for x in item.lower().strip().split("x"))
    except ValueError:
      raise argparse.ArgumentTypeError(f"bad size {item!r}: expected DxK, e.g. 512x10") from None
    if not d >= k >= 2:
      raise argparse.ArgumentTypeError(f"bad size {item!r}: need d >= K >= 2")
    sizes.append((d, k))
  return tuple(sizes)


parse_variants = common.comma_choices(tuple(VARIANTS), "variant")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.solver",
      description="Time and memory of the nearest-ETF layer (forward, forward+backward).")
  parser.add_argument("--sizes", type=parse_sizes, default=None,
                      help="comma-separated DxK (default: 512x10,512x100,2048x100,2048x1000; "
                           "--quick: 16x4,64x10)")
  parser.add_argument("--variants", type=parse_variants, default=tuple(VARIANTS),
                      help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed calls per measurement (default: adaptive, ~2 s, 1-50)")
  parser.add_argument("--json", metavar="PATH", default=None,
                      help="also write machine-readable results to PATH")
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes and few repeats: a smoke run in seconds")
  parser.add_argument("--ddn-budget-fraction", type=float, default=DDN_BUDGET_FRACTION,
                      help="dense-ddn memory budget as a fraction of the device memory limit "
                           "(GPU/TPU) or of available host RAM (CPU); default 0.4")
  parser.add_argument("--ddn-budget-gib", type=float, default=None,
                      help="dense-ddn memory budget in GiB (overrides the fraction)")
  parser.add_argument("--seed", type=int, default=0)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
  if args.quick:
    policy = common.RepeatPolicy(args.repeats, target_s=0.05, max_repeats=3)
  else:
    policy = common.RepeatPolicy(args.repeats)
  if args.ddn_budget_gib is not None:
    budget, budget_of = args.ddn_budget_gib * common.GIB, "--ddn-budget-gib"
  else:
    budget, budget_of = common.memory_budget_bytes(args.ddn_budget_fraction)
    budget_of = f"{args.ddn_budget_fraction:.0%} of {budget_of}"
  env = common.environment()
  settings = {
      "sizes": [list(s) for s in sizes], "variants": list(args.variants), "seed": args.seed,
      "dtype": "float32", "delta": DELTA, "perturbation": PERTURBATION,
      "repeats_policy": (f"fixed {policy.repeats}" if policy.repeats is not None else
                         f"adaptive (~{policy.target_s:g} s, 1-{policy.max_repeats})"),
      "ddn_budget": "unknown" if budget is None else f"{_gib(budget)} ({budget_of})",
      "ddn_budget_bytes": budget,
  }
  def write_json(results, complete):
    if args.json:
      tmp = args.json + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"environment": env, "settings": settings, "complete": complete,
                   "results": [r.as_json() for r in results]}, f, indent=2)
        f.write("\n")
      os.replace(tmp, args.json)

  results = run_benchmarks(sizes, args.variants, policy, budget, seed=args.seed,
                           on_result=lambda partial: write_json(partial, False))
  print(report(env, settings, results))
  write_json(results, True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
