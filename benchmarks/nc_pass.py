r"""Benchmark of one neural-collapse evaluation pass at UFM sizes, with and without the rank.

Run from the repository root::

    python -m benchmarks.nc_pass                  # UFM-200 and UFM-1000 sizes, Markdown out
    python -m benchmarks.nc_pass --quick          # a smoke run (seconds)
    python -m benchmarks.nc_pass --sizes 100:512:100 --repeats 5 --json out.json

What is timed is one call of :func:`nc_jax.evaluate.nc_evaluate` on host features, as the
UFM runner (:mod:`experiments.ufm`) makes every ``--eval-every`` iterations: the head's
classifier, the two streamed metric passes and their float64 finalisation, with the numerical
rank (``numerical_rank=True``, the image runner's call: K float64 SVDs of the ``(n_c, d)``
class features) and without it (the UFM runner's call since it stopped computing a key it
never recorded). The features are ``N = K · n_c`` τ-normalised (τ = 5) float32 rows: class
centres drawn at random plus noise of the same scale, so that the metrics are those of a
partly collapsed model, not of a degenerate input. The head is a freshly initialised standard
head (its classifier is used as is). Each size first runs both calls once (compilation of the
streamed updates for its chunk shapes), then ``--repeats`` rounds of the two calls
alternating, the first call rotating, so that a shared machine's drifts hit both alike; a
cell is the median over the rounds.

BLAS threads are set to one unless exported (:func:`benchmarks.set_thread_defaults`). The
experiment runners leave them at the library's default; export ``OPENBLAS_NUM_THREADS`` and
``OMP_NUM_THREADS`` to time that setting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Sequence

from benchmarks import set_thread_defaults

set_thread_defaults()  # before JAX and its LAPACK are loaded

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _common as common  # noqa: E402
from nc_jax import heads  # noqa: E402
from nc_jax.evaluate import nc_evaluate  # noqa: E402

DEFAULT_SIZES = "200:512:100,1000:1024:100"
QUICK_SIZES = "10:32:20"


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
  """``"K:d:n_c,..."`` → ``[(K, d, n_c), ...]`` (classes, feature dimension, per class)."""
  sizes = []
  for item in text.split(","):
    parts = item.strip().split(":")
    try:
      k, d, n_c = (int(p) for p in parts)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"--sizes: expected K:d:n_per_class items, e.g. 200:512:100, got {item!r}") from None
    if k < 2 or d < k or n_c < 2:
      raise argparse.ArgumentTypeError(
          f"--sizes: expected K >= 2, d >= K and n_per_class >= 2, got {item!r}")
    sizes.append((k, d, n_c))
  return sizes


def make_case(k: int, d: int, n_c: int, seed: int = 0):
  """τ-normalised ``(K·n_c, d)`` float32 features, labels ``i mod K`` and a standard head."""
  rng = np.random.default_rng(seed)
  labels = np.arange(k * n_c, dtype=np.int32) % k
  h = rng.standard_normal((k, d))[labels] + rng.standard_normal((k * n_c, d))
  h = (5.0 * h / np.linalg.norm(h, axis=1, keepdims=True)).astype(np.float32)
  cfg = heads.HeadConfig("standard", num_classes=k, feature_dim=d, tau=5.0)
  params, state = heads.init(cfg, jax.random.PRNGKey(seed))
  return h, labels, cfg, params, state


def time_size(k: int, d: int, n_c: int, repeats: int) -> dict[str, Any]:
  """Median seconds of ``nc_evaluate`` with and without the numerical rank at one size."""
  h, y, cfg, params, state = make_case(k, d, n_c)
  variants = (True, False)
  for rank in variants:  # compile the streamed updates for this size's chunk shapes
    nc_evaluate(h, y, cfg, params, state, numerical_rank=rank)
  seconds: dict[bool, list[float]] = {rank: [] for rank in variants}
  for r in range(repeats):
    order = variants[r % 2:] + variants[:r % 2]
    for rank in order:
      t0 = time.perf_counter()
      nc_evaluate(h, y, cfg, params, state, numerical_rank=rank)
      seconds[rank].append(time.perf_counter() - t0)
  with_rank, without = (statistics.median(seconds[v]) for v in variants)
  return {"classes": k, "dim": d, "per_class": n_c, "samples": k * n_c,
          "with_rank_s": with_rank, "without_rank_s": without,
          "ratio": with_rank / without, "rounds": {"with_rank": seconds[True],
                                                   "without_rank": seconds[False]}}


def markdown(rows: Sequence[dict[str, Any]], env: dict[str, Any]) -> str:
  table = common.markdown_table(
      ["K", "d", "N", "with rank s", "without rank s", "with / without"],
      [[r["classes"], r["dim"], f"{r['samples']:,}", common.fmt_num(r["with_rank_s"]),
        common.fmt_num(r["without_rank_s"]), f"×{r['ratio']:.2f}"] for r in rows],
      right_align_from=0)
  return "\n".join(["## One NC evaluation pass (nc_evaluate), with and without the numerical "
                    "rank", "", *common.environment_lines(env), "", table, ""])


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.nc_pass", description=__doc__.split(
      "\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", type=parse_sizes, default=None,
                 help=f"K:d:n_per_class items (default {DEFAULT_SIZES}; --quick: "
                      f"{QUICK_SIZES})")
  p.add_argument("--repeats", type=int, default=3,
                 help="timed rounds per size (default: %(default)s; --quick: 1)")
  p.add_argument("--quick", action="store_true", help="a smoke run: tiny size, one round")
  p.add_argument("--json", help="also write the rows and the environment to this file")
  args = p.parse_args(argv)
  if args.repeats < 1:
    p.error(f"--repeats: expected at least 1, got {args.repeats}")
  sizes = args.sizes or parse_sizes(QUICK_SIZES if args.quick else DEFAULT_SIZES)
  repeats = 1 if args.quick else args.repeats
  env = common.environment()
  rows = [time_size(k, d, n_c, repeats) for k, d, n_c in sizes]
  print(markdown(rows, env))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"environment": env, "repeats": repeats, "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
