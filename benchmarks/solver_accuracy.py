r"""Float32 accuracy of every polar factorisation, forward and backward, against float64.

Run from the repository root::

    python -m benchmarks.solver_accuracy                       # default grid, Markdown
    python -m benchmarks.solver_accuracy --sizes 512x10 --deltas 1e-3 --seeds 3

Why. The matmul-only ``factorisation="newton_schulz"`` (``nc_jax.newton_schulz``) replaces
SVD/eigh by iterations whose rounding behaves differently; the conditioning of the
problem is :math:`\kappa(B) = \sigma_{max}(B)/\sigma_{min}(B) \approx 2/((K-1)\delta)` at
collapse, up to ~1e4 for the paper's settings and beyond for small δ, so a float32 solve
can at best be accurate to :math:`\sim\kappa\varepsilon`. This script measures where each
factorisation stands relative to that floor.

What is measured, per (d, K, δ, kind, seed): the problem is the solver's
:math:`B = c\bar YM + \delta P_{prev}` with unit-Frobenius centred Ȳ and either

* ``random``: Gaussian Ȳ and a Haar-random :math:`P_{prev}` (a far-from-training case:
  :math:`\sigma_{min}(B)` may fall well below δ), or
* ``training``: :math:`P_{prev}` the exact solution for a 1e-3-perturbed Ȳ (as between
  consecutive training steps; :math:`\sigma_{min}(B) \approx \delta`);

the float32 ``nearest_etf`` output P and the float32 gradient of :math:`\langle G, P\rangle`
(G a centred random cotangent, as a training loss gives) are compared with the float64
closed form (``nc_jax`` with x64, SVD path): "P err" = max-abs error, "grad err" =
relative Frobenius error. Also reported: κ(B), σ_min(B)/δ and the Newton–Schulz step
count (its fixed schedule + 1), and how many seeds' matmul-only solves did not certify
convergence (``nearest_etf`` then refuses to answer; shown as "n/a", never as a number).
Medians over seeds; the worst case is in the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from benchmarks import set_thread_defaults

set_thread_defaults()  # before JAX and its LAPACK are loaded

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # the float64 reference; the measured solves are float32

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _common as common  # noqa: E402
from benchmarks import solver as solver_benchmark  # noqa: E402
from nc_jax import feasibility_solution, nearest_etf, newton_schulz, normalise_means, solver  # noqa: E402
from nc_jax import stiefel  # noqa: E402

FACTORISATIONS = solver.FACTORISATIONS
DEFAULT_SIZES = ((512, 10), (512, 100), (2048, 1000))
DEFAULT_DELTAS = (1e-2, 1e-3, 1e-4, 1e-5)
KINDS = ("training", "random")


def make_problem(d: int, k: int, delta: float, kind: str, seed: int):
  """float64 (Ȳ, P_prev, G) for one case (module docstring)."""
  key_y, key_p, key_g = jax.random.split(jax.random.key(seed), 3)
  y = normalise_means(jax.random.normal(key_y, (d, k), jnp.float64))
  if kind == "random":
    prox = stiefel.random_point(key_p, d, k, jnp.float64)
  else:
    noise = jax.random.normal(key_p, (d, k), jnp.float64)
    y_prev = normalise_means(y + 1e-3 * noise / jnp.linalg.norm(noise))
    prox = nearest_etf(y_prev, feasibility_solution(y_prev), delta=delta)
  g = normalise_means(jax.random.normal(key_g, (d, k), jnp.float64))
  return y, prox, g


def measure(d: int, k: int, delta: float, kind: str, seed: int) -> dict:
  y, prox, g = make_problem(d, k, delta, kind, seed)

  def grad(y, prox, g, factorisation):
    return jax.grad(lambda a: jnp.vdot(g, nearest_etf(a, prox, delta=delta,
                                                      factorisation=factorisation)))(y)

  want_p = np.asarray(nearest_etf(y, prox, delta=delta))
  want_g = np.asarray(grad(y, prox, g, "svd"))
  sv = np.linalg.svd(np.asarray(solver.procrustes_target(y, prox, delta)), compute_uv=False)
  row = {"d": d, "K": k, "delta": delta, "kind": kind, "seed": seed,
         "kappa": float(sv[0] / sv[-1]), "sigma_min_over_delta": float(sv[-1] / delta)}
  y32, prox32, g32 = (a.astype(jnp.float32) for a in (y, prox, g))
  for f in FACTORISATIONS:
    try:
      p, info = nearest_etf(y32, prox32, delta=delta, factorisation=f, return_info=True)
    except ValueError as e:  # a matmul-only solve that did not converge refuses to answer
      row[f] = {"p_err": float("nan"), "grad_err": float("nan"), "iterations": -1,
                "converged": False, "error": str(e).splitlines()[0]}
      continue
    gr = np.asarray(grad(y32, prox32, g32, f), np.float64)
    row[f] = {"p_err": float(np.abs(np.asarray(p, np.float64) - want_p).max()),
              "grad_err": float(np.linalg.norm(gr - want_g) / np.linalg.norm(want_g)),
              "iterations": int(info.iterations), "converged": bool(info.converged)}
  bound = solver.newton_schulz_bound(delta, k)
  row["ns_schedule"] = len(newton_schulz.schedule(bound, jnp.float32))
  return row


def summarise(rows: list[dict]) -> list[dict]:
  """Median over seeds per (d, K, δ, kind)."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["d"], r["K"], r["delta"], r["kind"]), []).append(r)
  out = []
  for (d, k, delta, kind), rs in groups.items():
    med = lambda f: float(np.median([f(r) for r in rs]))
    s = {"d": d, "K": k, "delta": delta, "kind": kind, "seeds": len(rs),
         "kappa": med(lambda r: r["kappa"]),
         "sigma_min_over_delta": min(r["sigma_min_over_delta"] for r in rs),
         "ns_iterations": max(r["newton_schulz"]["iterations"] for r in rs),
         "ns_schedule": rs[0]["ns_schedule"]}
    s["ns_unconverged"] = sum(not r["newton_schulz"]["converged"] for r in rs)
    for f in FACTORISATIONS:
      s[f] = {"p_err": med(lambda r: r[f]["p_err"]), "grad_err": med(lambda r: r[f]["grad_err"])}
    out.append(s)
  return out


def to_markdown(summary: list[dict], env: dict) -> str:
  head = ("| d | K | δ | P_prev | κ(B) | min σ_min/δ | "
          + " | ".join(f"{f} P err / grad err" for f in FACTORISATIONS)
          + " | NS steps (schedule+1) |")
  lines = [*common.environment_lines(env), "", head,
           "|" + "---|" * (6 + len(FACTORISATIONS) + 1)]
  for s in summary:
    err = lambda x: f"{x:.1e}" if np.isfinite(x) else "n/a"
    cells = [f"{err(s[f]['p_err'])} / {err(s[f]['grad_err'])}" for f in FACTORISATIONS]
    lines.append(f"| {s['d']} | {s['K']} | {s['delta']:g} | {s['kind']} | {s['kappa']:.2g} | "
                 f"{s['sigma_min_over_delta']:.2f} | " + " | ".join(cells)
                 + f" | {s['ns_iterations']} ({s['ns_schedule']}+1)"
                 + (f", {s['ns_unconverged']} unconverged" if s["ns_unconverged"] else "") + " |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.solver_accuracy",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", type=solver_benchmark.parse_sizes,
                      default=DEFAULT_SIZES, help="comma-separated DxK (default: "
                      + ",".join(f"{d}x{k}" for d, k in DEFAULT_SIZES) + ")")
  parser.add_argument("--deltas", default=",".join(f"{x:g}" for x in DEFAULT_DELTAS),
                      help="comma-separated δ values")
  parser.add_argument("--kinds", type=common.comma_choices(KINDS, "kind"), default=KINDS,
                      help=f"comma-separated subset of {','.join(KINDS)} (default: both)")
  parser.add_argument("--seeds", type=int, default=3, help="seeds per case (default 3)")
  parser.add_argument("--json", help="also write every row and the summary to this path")
  args = parser.parse_args(argv)
  deltas = [float(x) for x in args.deltas.split(",")]
  kinds = args.kinds
  rows = []
  for d, k in args.sizes:
    for delta in deltas:
      for kind in kinds:
        for seed in range(args.seeds):
          rows.append(measure(d, k, delta, kind, seed))
          print(f"# {d}x{k} δ={delta:g} {kind} seed {seed}: κ={rows[-1]['kappa']:.2g}",
                file=sys.stderr, flush=True)
  summary = summarise(rows)
  env = common.environment()
  text = to_markdown(summary, env)
  if args.json:
    with open(args.json, "w") as fh:
      json.dump({"environment": env, "rows": rows, "summary": summary}, fh, indent=1)
  print(text)
  return text


if __name__ == "__main__":
  main()
