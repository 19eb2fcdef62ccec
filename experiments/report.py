"""Multi-seed report for the image experiments: tables, CSV and figures from run folders.

Reads the run folders written by the image experiment runner,
``<experiment>/<method>/seed-<n>/`` with ``config.json``, ``metrics.jsonl`` (one
JSON object per finished epoch), and optionally ``margins.npy`` (per-sample
train cosine margins at the end of training) and ``done.json`` (present iff
the run finished). Unfinished runs are aggregated too, and listed as such.
Seed folders without ``metrics.jsonl`` are skipped with a warning.

For each experiment folder it writes (into the folder itself, or ``--out``):

* ``report.md``: configuration (dataset, model, optimiser, batch size, epochs,
  seeds, machine, versions), then three tables, each statistic as
  "median [min, max]" and "mean ± std" over seeds: top-1 accuracy at chosen
  epochs (train = running mean over the epoch's augmented batches, and test);
  final neural-collapse metrics (the last NC epoch of each run, train and test
  NC passes); convergence (epochs and wall seconds to 100 % train top-1 and to
  train NC1 below 1e-1, 1e-2, 1e-3, with the number of seeds that got there
  and "not reached (k of n)"); under the final-NC and the convergence tables,
  the tests between methods (below); last, the figures (unless ``--no-plot``).
* ``report.csv``: the same numbers in long format, one row per
  (table, method, metric, split, epoch), then one row per test (below).
* ``metrics.png``: metrics against epoch, methods overlaid (median over seeds,
  min–max band); ``margins.png``: the sorted per-sample cosine margin at the
  end of training against normalised sample rank; with runs on a class-imbalanced
  training set (``--imbalance``), ``per_class.png``: test top-1 and train/test NC1 per
  class (minority classes shaded), also as Markdown tables and ``per_class`` CSV rows.

Tests between methods (:mod:`experiments.significance` has the details and the
reasons). For each convergence criterion (epochs to it) and each final metric
(test top-1 at the last epoch; the final train and test NC metrics), every
pair in :func:`comparison_pairs` (each method against :data:`BASELINE`
``standard``, and :data:`CLAIM_PAIRS`: ``implicit`` against ``fixed`` and
``implicit-fo``, the paper's claims, and against ``fixed-dotreg``) gets

* a **location** test: two-sided exact permutation test (all C(n1 + n2, n1)
  relabellings of the seeds) on Gehan scores, i.e. the Mann–Whitney rank-sum
  test with ties at mid-ranks, extended to right-censoring. With 3–5 seeds
  per method no asymptotic distribution can be trusted, an exact permutation
  test needs none, and ranks make it robust to one odd seed and indifferent to
  the scale (epochs, NC1 in decades). Its floor is reported: the smallest
  attainable p is 2 / C(n1 + n2, n1) without ties (0.0079 for 5 vs 5, 0.029 for
  4 vs 4, 0.1 for 3 vs 3: with 3 seeds nothing is significant at 0.05, so
  "n.s." there is no evidence of no effect).
  **Censoring**: a run that never meets a criterion is right-censored at the
  last epoch the criterion was checked (its last record with the key), known
  only to be later than that: it ranks above every epoch at or before it, is
  tied with the other censored runs, and is undecided against later epochs
  (Gehan). With the usual common epoch budget this is "not reached" = +∞, tied
  beyond every observed epoch; the test is exact if censoring does not depend
  on the method (an unfinished run, censored early in one method only, makes
  it approximate). The convergence table shows "not reached (k of n)".
* a **spread** test: Brown–Forsythe (Levene's W on absolute deviations from
  each method's median — robust where the seeds are skewed), with the p-value
  from an exact permutation of the pooled deviations rather than the F(1, N−2)
  reference, which assumes normal deviations (that p-value, equal to
  ``scipy.stats.levene(center="median")``'s, is in the CSV as ``p_approx``).
  Convergence spreads use the runs that reached the criterion (≥ 2 per method).

The Markdown shows, under the final-NC and convergence tables, a location and
a spread table (rows: quantities; columns: pairs; first row: seeds and the
smallest attainable p per pair); each cell is the uncorrected p, the
direction (``<``: the first method lower / faster / less spread) and ``*``
when significant at :data:`ALPHA` = 0.05 after **Holm's correction over the
comparisons made on that quantity** (one row: the pairs), else ``n.s.``. Holm
per quantity, not per table: each row answers one question (does the ordering
of the methods hold for this quantity), and the quantities of a table are
strongly correlated (NC1 train/test, the thresholds), so a table-wide
correction would be needlessly blind with 5 seeds (30 convergence tests:
30 × 0.0079 > 0.05).
In the CSV the test rows have ``table`` = ``test_location`` / ``test_spread``,
``method`` = the first method, ``n``/``total`` its seeds in the test / runs, the
statistics columns empty, and the columns appended after ``total``
(:data:`TEST_COLUMNS`; earlier columns unchanged, empty in the other rows):
``vs``, ``n_vs`` (the second method and its seeds), ``censored``,
``censored_vs`` (runs that never met the criterion: censored values in the
location test, left out of the spread test), ``test``, ``statistic`` (sum of
the first method's Gehan scores; Brown–Forsythe W), ``direction``, ``p``,
``p_min`` (this test's floor, given its ties), ``p_holm``, ``p_approx``.

Run: ``python -m experiments.report runs/fashion_mnist`` or e.g.
``python -m experiments.report runs/cifar10 runs/cifar100 --epochs 50,100,200 --out reports``
(with several folders and ``--out``, each report goes to ``<out>/<folder name>/``).
The Markdown is printed unless ``--quiet``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import pathlib
import sys
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from experiments import significance
from nc_jax.config import METHOD_VARIANTS, METHODS

#: NC metrics of the final-NC table (``top1`` there is the un-augmented NC-pass accuracy).
NC_KEYS = ("top1", "nc1", "nc2_etf", "nc2_equinorm_w", "wh_equinorm", "nc3", "ncc_mismatch",
           "avg_cosine_margin", "numerical_rank", "w_etf_ref_dist", "h_etf_ref_dist",
           # Class-imbalanced training sets only (nc_jax.evaluate.IMBALANCE_KEYS); a metric
           # that no run recorded is left out of the Markdown tables.
           "nc1_majority", "nc1_minority", "top1_majority", "top1_minority", "minority_cosine",
           "minority_collapse")
NC1_THRESHOLDS = (1e-1, 1e-2, 1e-3)
#: Per-class lists of the NC passes on class-imbalanced training sets
#: (``nc_<split>_<key>``, :mod:`nc_jax.evaluate`): ``(key, split, label, format)``.
PER_CLASS = (("top1_per_class", "test", "test top-1 (%)", "acc"),
             ("nc1_per_class", "train", "train NC1", "sci"),
             ("nc1_per_class", "test", "test NC1", "sci"))
# The running-mean accuracy is a float average of per-batch percentages: allow rounding.
FULL_TOP1 = 100.0 - 1e-6
#: The tests' CSV columns, appended after the statistics' (empty in the statistics' rows).
TEST_COLUMNS = ("vs", "n_vs", "censored", "censored_vs", "test", "statistic", "direction", "p",
                "p_min", "p_holm", "p_approx")
CSV_COLUMNS = ("table", "method", "metric", "split", "epoch", "n", "median", "min", "max", "mean",
               "std", "total") + TEST_COLUMNS
#: Every other method is compared with this one.
BASELINE = "standard"
#: Further ``(method, other)`` comparisons: the paper's claims that the implicit ETF converges
#: faster than the fixed ETF, the forward-only variant lying in between; and, on imbalanced
#: data, the implicit ETF against the fixed ETF with the dot-regression loss (Yang et al.).
CLAIM_PAIRS = (("implicit", "fixed"), ("implicit", "implicit-fo"), ("implicit", "fixed-dotreg"))
#: Significance level of the ``*`` / ``n.s.`` marks (after Holm's correction per quantity).
ALPHA = 0.05
EXPECTED = "<dir>/<method>/seed-<n>/metrics.jsonl"
#: (key, title, y scale) of the panels of ``metrics.png``.
PANELS = (
    ("train_top1", "train top-1 (%, running mean over batches)", "linear"),
    ("test_top1", "test top-1 (%)", "linear"),
    ("train_loss", "train loss", "log"),
    ("nc_train_nc1", "NC1 (train)", "log"),
    ("nc_test_nc1", "NC1 (test)", "log"),
    ("nc_train_nc2_etf", "NC2: distance to ETF (train)", "log"),
    ("nc_train_nc3", "NC3 (train)", "log"),
    ("nc_train_wh_equinorm", "WH-equinorm (train)", "log"),
    ("nc_train_avg_cosine_margin", "average cosine margin (train)", "linear"),
    # Class-imbalanced training sets only (left out where no run recorded them).
    ("nc_test_top1_minority", "test top-1, minority classes (%)", "linear"),
    ("nc_train_minority_collapse", "minority collapse |cos + 1/(K−1)| (classifier)", "log"),
)


@dataclasses.dataclass
class Run:
  """One run folder: its config, per-epoch records, end-of-training margins and done marker."""
  method: str
  seed: int
  path: pathlib.Path
  config: dict
  records: list[dict]
  margins: np.ndarray | None = None
  done: dict | None = None

  @property
  def finished(self) -> bool:
    return self.done is not None

  @property
  def last_epoch(self) -> int:
    return int(self.records[-1]["epoch"]) if self.records else 0

  @property
  def planned_epochs(self) -> int | None:
    """Epochs the run was configured for (``done.json``, else ``train_config.epochs``)."""
    for source in (self.done or {}, _train_config(self.config), self.config):
      if isinstance(source.get("epochs"), int):
        return source["epochs"]
    return None

  def record(self, epoch: int) -> dict | None:
    for rec in self.records:
      if rec["epoch"] == epoch:
        return rec
    return None


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #


def _warn_stderr(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr)


def _train_config(config: dict) -> dict:
  tc = config.get("train_config")
  return tc if isinstance(tc, dict) else {}


def colour(method: str) -> str | None:
  """The method's colour in every figure (:data:`nc_jax.config.METHOD_VARIANTS`); ``None``
  (matplotlib's cycle) for a method outside the table."""
  variant = METHOD_VARIANTS.get(method)
  return variant.colour if variant else None


def method_order(method: str) -> tuple:
  """Sort key: the paper's methods in their usual order, then others alphabetically."""
  return (METHODS.index(method), "") if method in METHODS else (len(METHODS), method)


def _read_json(path: pathlib.Path, warn: Callable[[str], None]) -> dict | None:
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError) as err:
    warn(f"{path}: unreadable ({err}); ignored")
    return None
  if not isinstance(value, dict):
    warn(f"{path}: expected a JSON object; ignored")
    return None
  return value


def read_records(path: pathlib.Path, warn: Callable[[str], None] = _warn_stderr) -> list[dict]:
  """The per-epoch records of a ``metrics.jsonl``, sorted by epoch.

  Bad lines (e.g. a half-written last line of a running job) are skipped with a
  warning. A resumed run may log an epoch twice; the later record wins.
  """
  by_epoch: dict[int, dict] = {}
  for i, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except ValueError:
      warn(f"{path}:{i}: not JSON; line skipped")
      continue
    if not isinstance(rec, dict) or not isinstance(rec.get("epoch"), int):
      warn(f"{path}:{i}: expected an object with an integer 'epoch'; line skipped")
      continue
    by_epoch[rec["epoch"]] = rec
  return [by_epoch[e] for e in sorted(by_epoch)]


def load_run(folder: pathlib.Path, method: str,
             warn: Callable[[str], None] = _warn_stderr) -> Run | None:
  """One ``<method>/seed-<n>`` folder, or ``None`` (with a warning) if it holds no run."""
  metrics = folder / "metrics.jsonl"
  if not metrics.is_file():
    warn(f"{folder}: no metrics.jsonl; skipped")
    return None
  config = (_read_json(folder / "config.json", warn) if (folder / "config.json").exists()
            else None) or {}
  try:
    seed = int(folder.name[len("seed-"):])
  except ValueError:
    if not isinstance(config.get("seed"), int):
      warn(f"{folder}: cannot tell the seed (folder name or config.json 'seed'); skipped")
      return None
    seed = config["seed"]
  margins = None
  if (folder / "margins.npy").exists():
    try:
      margins = np.asarray(np.load(folder / "margins.npy"), dtype=np.float64).reshape(-1)
    except (OSError, ValueError) as err:
      warn(f"{folder / 'margins.npy'}: unreadable ({err}); ignored")
  done = _read_json(folder / "done.json", warn) if (folder / "done.json").exists() else None
  return Run(method=method, seed=seed, path=folder, config=config,
             records=read_records(metrics, warn), margins=margins, done=done)


def load_runs(folder: str | pathlib.Path,
              warn: Callable[[str], None] = _warn_stderr) -> dict[str, list[Run]]:
  """All runs under ``folder``: ``{method: [Run, ...]}``, methods in report order, seeds sorted.

  Only ``<folder>/<method>/seed-*`` directories are looked at, so reports,
  figures and other files in the experiment folder are ignored.
  """
  folder = pathlib.Path(folder)
  runs: dict[str, list[Run]] = {}
  for method_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
    for seed_dir in sorted(p for p in method_dir.glob("seed-*") if p.is_dir()):
      run = load_run(seed_dir, method_dir.name, warn)
      if run is not None:
        runs.setdefault(method_dir.name, []).append(run)
  return {m: sorted(runs[m], key=lambda r: r.seed) for m in sorted(runs, key=method_order)}


# --------------------------------------------------------------------------- #
# Statistics and tables
# --------------------------------------------------------------------------- #


def _value(v: Any) -> float | None:
  """A finite-or-infinite number as float; ``None`` for missing, NaN and non-numbers."""
  if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
    return None
  v = float(v)
  return None if math.isnan(v) else v


def stats(values: Iterable[Any]) -> dict[str, float | int | None]:
  """``n, median, min, max, mean, std`` of the values, ignoring ``None`` and NaN.

  ``std`` is the sample standard deviation (ddof=1), 0 for one value; with no
  values every statistic is ``None``.
  """
  xs = [x for x in map(_value, values) if x is not None]
  if not xs:
    return dict(n=0, median=None, min=None, max=None, mean=None, std=None)
  a = np.asarray(xs, dtype=np.float64)
  return dict(n=len(xs), median=float(np.median(a)), min=float(a.min()), max=float(a.max()),
              mean=float(a.mean()), std=float(a.std(ddof=1)) if len(xs) > 1 else 0.0)


def first_reach(records: Sequence[dict], key: str,
                predicate: Callable[[float], bool]) -> tuple[int, float | None] | None:
  """``(epoch, elapsed seconds)`` of the first record whose ``key`` satisfies ``predicate``.

  Records without the key, or with NaN, are passed over; ``None`` if never reached.
  """
  for rec in records:
    v = _value(rec.get(key))
    if v is not None and predicate(v):
      return rec["epoch"], _value(rec.get("elapsed"))
  return None


def default_epochs(runs: dict[str, list[Run]]) -> list[int]:
  """The last epoch and up to 3 evenly spaced earlier ones (e.g. 50, 100, 150, 200) that exist."""
  present = {rec["epoch"] for rs in runs.values() for r in rs for rec in r.records}
  if not present:
    return []
  last = max(present)
  return sorted({e for e in ((last * i + 2) // 4 for i in range(1, 5)) if e in present})


def convergence_criteria() -> list[tuple[str, str, str, Callable[[float], bool]]]:
  """``(name, label, key, predicate)`` of the convergence table's rows."""
  # 99.9 % as well as 100 %: on a small training set one stubborn example decides the latter.
  out = [("train_top1_99.9", "train top-1 ≥ 99.9 % (running mean)", "train_top1",
          lambda v: v >= 99.9),
         ("train_top1_100", "train top-1 = 100 % (running mean)", "train_top1",
          lambda v: v >= FULL_TOP1),
         ("nc_train_top1_100", "train top-1 = 100 % (NC pass, un-augmented)", "nc_train_top1",
          lambda v: v >= FULL_TOP1)]
  for t in NC1_THRESHOLDS:
    out.append((f"nc1_below_{t:.0e}", f"train NC1 < {t:.0e}", "nc_train_nc1",
                lambda v, t=t: v < t))
  return out


def _last_nc_record(run: Run, split: str) -> dict | None:
  prefix = f"nc_{split}_"
  for rec in reversed(run.records):
    if any(k.startswith(prefix) for k in rec):
      return rec
  return None


def _row(table: str, method: str, metric: str, split: str, epoch: Any, values: list,
         total: int) -> dict:
  return dict(table=table, method=method, metric=metric, split=split, epoch=epoch,
              **stats(values), total=total, **dict.fromkeys(TEST_COLUMNS))


def _final_runs(rs: Sequence[Run]) -> list[Run]:
  """The runs whose last records are final states: the finished ones, or all if none finished."""
  return [r for r in rs if r.finished] or list(rs)


def final_nc_values(rs: Sequence[Run], key: str, split: str) -> list[tuple[int, float]]:
  """``(epoch, value)`` of ``nc_<split>_<key>`` at each final run's last NC epoch (NaN left out)."""
  last = [_last_nc_record(r, split) for r in _final_runs(rs)]
  got = [(rec["epoch"], _value(rec.get(f"nc_{split}_{key}"))) for rec in last if rec is not None]
  return [(e, v) for e, v in got if v is not None]


def final_per_class(rs: Sequence[Run], key: str, split: str) -> list[tuple[int, np.ndarray]]:
  """``(epoch, values (K,))`` of the list ``nc_<split>_<key>`` at each final run's last NC
  epoch (runs without it left out; NaN entries kept, :func:`stats` skips them)."""
  out = []
  for rec in (_last_nc_record(r, split) for r in _final_runs(rs)):
    values = None if rec is None else rec.get(f"nc_{split}_{key}")
    if isinstance(values, list) and values:
      out.append((rec["epoch"], np.asarray([np.nan if v is None else v for v in values],
                                           dtype=np.float64)))
  return out


def per_class_metric(key: str, c: int) -> str:
  """The ``metric`` of class ``c``'s row: ``top1_per_class`` → ``top1_class_<c>``."""
  return f"{key.removesuffix('_per_class')}_class_{c}"


def _epoch_cell(epochs: Iterable[int]) -> Any:
  es = sorted(set(epochs))
  return "" if not es else es[0] if len(es) == 1 else f"{es[0]}-{es[-1]}"


def last_epoch_values(rs: Sequence[Run], key: str) -> list[float]:
  """``key`` in each final run's last record that has it (NaN there: left out)."""
  out = []
  for r in _final_runs(rs):
    rec = next((rec for rec in reversed(r.records) if key in rec), None)
    if rec is not None and _value(rec[key]) is not None:
      out.append(_value(rec[key]))
  return out


def time_to(run: Run, key: str, predicate: Callable[[float], bool]) -> tuple[int, bool] | None:
  """``(epoch, censored)``: the first epoch meeting the criterion, ``False``; else the run is
  right-censored at the last epoch the criterion was checked (the last record with a value of
  ``key``), ``True``; ``None`` if it was never checked."""
  hit = first_reach(run.records, key, predicate)
  if hit is not None:
    return hit[0], False
  checked = [rec["epoch"] for rec in run.records if _value(rec.get(key)) is not None]
  return (checked[-1], True) if checked else None


def comparison_pairs(methods: Iterable[str]) -> list[tuple[str, str]]:
  """The ``(method, other)`` pairs tested among ``methods``: each against :data:`BASELINE`,
  then :data:`CLAIM_PAIRS`, those present only."""
  methods = list(methods)
  pairs = [(m, BASELINE) for m in methods if BASELINE in methods and m != BASELINE]
  return pairs + [p for p in CLAIM_PAIRS if p[0] in methods and p[1] in methods
                  and p not in pairs]


def tested_quantities() -> list[tuple[str, str, str, str]]:
  """``(family, metric, split, label)`` of the tested quantities (rows of the tests tables)."""
  out = [("convergence", f"epochs_to_{name}", "train", label)
         for name, label, _, _ in convergence_criteria()]
  out.append(("final", "top1_last_epoch", "test", "test top-1, last epoch"))
  out += [("final", key, split, f"{split} {key}") for key in NC_KEYS
          for split in ("train", "test")]
  return out


def _sample(rs: Sequence[Run], metric: str, split: str) -> tuple[list[float], list[bool]]:
  """One method's values of a tested quantity and their censoring flags."""
  if metric.startswith("epochs_to_"):
    _, _, key, predicate = next(c for c in convergence_criteria()
                                if f"epochs_to_{c[0]}" == metric)
    times = [t for t in (time_to(r, key, predicate) for r in rs) if t is not None]
    return [float(e) for e, _ in times], [c for _, c in times]
  if metric == "top1_last_epoch":
    values = last_epoch_values(rs, f"{split}_top1")
  else:
    values = [v for _, v in final_nc_values(rs, metric, split)]
  return values, [False] * len(values)


#: The ``test`` names of the two tests (the rows of tables ``test_location`` / ``test_spread``).
LOCATION_TEST = "permutation, Gehan scores (Mann-Whitney), two-sided"
SPREAD_TEST = "Brown-Forsythe, permutation of the deviations"


def pair_tests(samples: dict[str, tuple[Sequence[float], Sequence[bool]]],
               pairs: Sequence[tuple[str, str]]) -> dict[str, list[dict]]:
  """The tests of one quantity between pairs of methods across seeds.

  Location: the exact two-sided permutation test on Gehan scores
  (:func:`experiments.significance.location_test`; the Mann–Whitney test, with censored
  values tied above everything at or before them). Spread: the Brown–Forsythe test
  (:func:`experiments.significance.spread_test`) on the uncensored values only, at least two
  per method. Holm's correction (:func:`experiments.significance.holm`) is over the pairs of
  each test, i.e. the comparisons made on this quantity.

  Args:
    samples: per method, its seeds' values and their censoring flags (``True``: the value
      is a lower bound, e.g. the last epoch checked for a criterion never met).
    pairs: the ``(method, vs)`` pairs to test, e.g. :func:`comparison_pairs`.

  Returns:
    ``{"test_location": rows, "test_spread": rows}``, one row per pair, in order, with keys
    ``method``, ``n`` and the :data:`TEST_COLUMNS`; ``n``/``n_vs`` are the seeds tested,
    ``censored``/``censored_vs`` the censored ones of all seeds; ``test``, ``statistic``,
    ``direction``, ``p``, ``p_min``, ``p_approx`` and ``p_holm`` are ``None`` where a group is
    too small (location: no value; spread: fewer than two uncensored values).
  """
  out: dict[str, list[dict]] = {"test_location": [], "test_spread": []}
  for a, b in pairs:
    (xa, ca), (xb, cb) = (tuple(map(list, samples[m])) for m in (a, b))
    base = dict.fromkeys(TEST_COLUMNS)
    base.update(method=a, vs=b, censored=sum(ca), censored_vs=sum(cb))
    location, spread = dict(base, n=len(xa), n_vs=len(xb)), dict(base)
    results = [(location, LOCATION_TEST,
                significance.location_test(xa, xb, ca, cb) if xa and xb else None)]
    ya = [v for v, c in zip(xa, ca) if not c]
    yb = [v for v, c in zip(xb, cb) if not c]
    spread.update(n=len(ya), n_vs=len(yb))
    results.append((spread, SPREAD_TEST, significance.spread_test(ya, yb)
                    if len(ya) >= 2 and len(yb) >= 2 else None))
    for row, name, result in results:
      if result is not None:
        row.update(test=name if result.exact else f"{name} (Monte Carlo)",
                   statistic=result.statistic, direction=result.direction, p=result.p,
                   p_min=result.p_min, p_approx=result.p_approx)
    out["test_location"].append(location)
    out["test_spread"].append(spread)
  for family in out.values():
    for row, adjusted in zip(family, significance.holm([r["p"] for r in family])):
      row["p_holm"] = adjusted
  return out


def comparison_rows(runs: dict[str, list[Run]]) -> list[dict]:
  """The tests' rows (tables ``test_location``, ``test_spread``; see the module docstring).

  One row per (test, quantity of :func:`tested_quantities`, pair of
  :func:`comparison_pairs`), made by :func:`pair_tests`: ``p`` ``None`` when a group is too
  small; ``p_holm``: Holm over the pairs tested on the same quantity.
  """
  pairs = comparison_pairs(runs)
  rows: list[dict] = []
  for _, metric, split, _ in tested_quantities():
    samples = {m: _sample(runs[m], metric, split) for pair in pairs for m in pair}
    for table, tested in pair_tests(samples, pairs).items():
      rows += [{**_row(table, t["method"], metric, split, "", [], len(runs[t["method"]])), **t}
               for t in tested]
  return rows


def report_tables(runs: dict[str, list[Run]], epochs: Sequence[int]) -> list[dict]:
  """All table rows (dicts with the :data:`CSV_COLUMNS` keys).

  Tables: ``top1`` (``train_top1``/``test_top1`` at each chosen epoch; runs
  without that epoch are left out, so ``n`` < ``total``), ``final_nc`` (each
  finished run's last NC epoch — unfinished runs count only if no run of the method
  finished; ``epoch`` is that epoch, or ``"a-b"`` when seeds differ), ``per_class``
  (runs on class-imbalanced training sets: each :data:`PER_CLASS` list at the same epochs,
  a row per class, ``metric`` from :func:`per_class_metric`)
  and ``convergence`` (``epochs_to_*``/``seconds_to_*``; ``n`` = seeds that got
  there, ``epoch`` empty); then the tests' rows (:func:`comparison_rows`).
  """
  rows: list[dict] = []
  for method, rs in runs.items():
    for epoch in epochs:
      recs = [r.record(epoch) or {} for r in rs]
      for split in ("train", "test"):
        rows.append(_row("top1", method, "top1", split, epoch,
                         [rec.get(f"{split}_top1") for rec in recs], len(rs)))
  for method, rs in runs.items():
    # An unfinished run's last NC epoch is not a final state: only finished runs count when
    # the method has any (n shows how many).
    for split in ("train", "test"):
      for key in NC_KEYS:
        got = final_nc_values(rs, key, split)
        rows.append(_row("final_nc", method, key, split, _epoch_cell(e for e, _ in got),
                         [v for _, v in got], len(rs)))
  for method, rs in runs.items():
    for key, split, _, _ in PER_CLASS:
      got = final_per_class(rs, key, split)
      epoch = _epoch_cell(e for e, _ in got)
      for c in range(max((v.size for _, v in got), default=0)):
        rows.append(_row("per_class", method, per_class_metric(key, c), split, epoch,
                         [v[c] for _, v in got if c < v.size], len(rs)))
  for method, rs in runs.items():
    for name, _, key, predicate in convergence_criteria():
      hits = [first_reach(r.records, key, predicate) for r in rs]
      rows.append(_row("convergence", method, f"epochs_to_{name}", "train", "",
                       [h[0] for h in hits if h], len(rs)))
      rows.append(_row("convergence", method, f"seconds_to_{name}", "train", "",
                       [h[1] for h in hits if h], len(rs)))
  return rows + comparison_rows(runs)


# --------------------------------------------------------------------------- #
# Markdown and CSV
# --------------------------------------------------------------------------- #


def _fmt(v: float | None, kind: str) -> str:
  if v is None:
    return "–"
  return {"acc": f"{v:.2f}", "sci": f"{v:.2e}", "num": f"{v:.4f}", "epoch": f"{v:g}",
          "sec": f"{v:.1f}"}[kind]


def _median_range(row: dict, kind: str) -> str:
  if not row["n"]:
    return "–"
  return f"{_fmt(row['median'], kind)} [{_fmt(row['min'], kind)}, {_fmt(row['max'], kind)}]"


def _mean_std(row: dict, kind: str) -> str:
  return "–" if not row["n"] else f"{_fmt(row['mean'], kind)} ± {_fmt(row['std'], kind)}"


def _cells(row: dict, kind: str) -> list[str]:
  """``n/total``, median [range] and mean ± std of one split's row."""
  return [f"{row['n']}/{row['total']}", _median_range(row, kind), _mean_std(row, kind)]


def _table(head: list[str], body: list[list[str]]) -> list[str]:
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
  return lines + ["| " + " | ".join(r) + " |" for r in body]


def _fmt_p(p: float) -> str:
  return f"{p:.2g}"


def _test_cell(row: dict, header: tuple[int, int]) -> str:
  """``"0.0079 < *"``: uncorrected p, direction, ``*`` (Holm-adjusted p < ALPHA) or ``n.s.``;
  the seeds ``(n1 v n2)`` when fewer than in the table's first row; for a location test with
  censored values, ``(c1/c2 not reached)``."""
  if row["p"] is None:
    return "–"
  mark = "*" if row["p_holm"] < ALPHA else "n.s."
  seeds = "" if (row["n"], row["n_vs"]) == header else f" ({row['n']} v {row['n_vs']})"
  censored = ""
  if row["table"] == "test_location" and (row["censored"] or row["censored_vs"]):
    censored = f" ({row['censored']}/{row['censored_vs']} not reached)"
  return f"{_fmt_p(row['p'])} {row['direction']} {mark}{seeds}{censored}"


def tests_table(rows: list[dict], table: str,
                quantities: Sequence[tuple[str, str, str]]) -> list[str]:
  """A Markdown tests table: a row per ``(metric, split, label)`` of ``quantities``, a column
  per pair of ``rows`` (those of ``table``, ``"test_location"``/``"test_spread"``, as
  :func:`pair_tests` makes them, with ``table``, ``metric`` and ``split``); first row the
  seeds and the smallest attainable p per pair (the smallest ``p_min`` of its tests). A
  quantity with no test made (every cell ``–``) is left out."""
  found = {(r["method"], r["vs"], r["metric"], r["split"]): r for r in rows
           if r["table"] == table}
  pairs = list(dict.fromkeys((r["method"], r["vs"]) for r in rows if r["table"] == table))
  headers, first = [], ["seeds; smallest p"]
  for a, b in pairs:
    tested = [r for r in (found.get((a, b, m, s)) for m, s, _ in quantities)
              if r is not None and r["p"] is not None]
    header = ((max(r["n"] for r in tested), max(r["n_vs"] for r in tested)) if tested
              else (0, 0))
    headers.append(header)
    first.append(f"{header[0]} v {header[1]}; "
                 f"{_fmt_p(min(r['p_min'] for r in tested))}" if tested else "–")
  body = [first]
  for metric, split, label in quantities:
    cells = [_test_cell(found[(a, b, metric, split)], h) for (a, b), h in zip(pairs, headers)]
    if any(c != "–" for c in cells):       # quantities no run recorded: CSV only
      body.append([label, *cells])
  return _table(["quantity", *(f"{a} vs {b}" for a, b in pairs)], body)


def _tests_section(rows: list[dict], family: str) -> list[str]:
  """Location and spread tables of ``family`` (``final``/``convergence``), with legends."""
  if not any(r["table"] == "test_location" for r in rows):
    if family == "convergence":            # said once, under the final-metrics table
      return []
    return ["", "No tests between methods: none of the compared pairs (each method against "
            f"`{BASELINE}`; " + "; ".join(f"`{a}` against `{b}`" for a, b in CLAIM_PAIRS)
            + ") is present."]
  if family == "convergence":
    what = "epochs to each criterion"
    direction = "the first method reaches the criterion earlier / later"
    censoring = (" A run that never met the criterion is right-censored at the last epoch it "
                 "was checked: later than every epoch at or before that, tied with the other "
                 "non-reaching runs (Gehan; with a common epoch budget: \"not reached\" = +∞); "
                 "exact if censoring does not depend on the method.")
    spread_runs = " Only the runs that reached the criterion (at least 2 per method)."
    not_reached = " (c1/c2 not reached): seeds of each method that never met the criterion."
  else:
    what = "final metrics (finished runs, as in the table above)"
    direction = "the first method's values tend lower / higher"
    censoring = ""
    spread_runs = ""
    not_reached = ""
  quantities = [(m, s, label) for f, m, s, label in tested_quantities() if f == family]
  return [
      "", f"### Tests between methods: {what}", "", "Location:", "",
      *tests_table(rows, "test_location", quantities),
      "", "Two-sided exact permutation test over all C(n1+n2, n1) relabellings of the two "
      "methods' seeds, on Gehan scores (the Mann–Whitney rank-sum test, ties at mid-ranks)."
      f"{censoring} Cell: uncorrected p; < / >: {direction} (=: same ranks); * if p < "
      f"{ALPHA:g} after Holm's correction over the row's comparisons, else n.s.; (n1 v n2): "
      f"seeds tested, when fewer than in the first row.{not_reached} First row: seeds per "
      "method and the "
      "smallest attainable p (2/C(n1+n2, n1) without ties: 0.0079 for 5 v 5, 0.1 for 3 v 3, "
      "where nothing can be significant and n.s. is no evidence of no effect). Per test in "
      "report.csv: p, Holm-adjusted p_holm, floor p_min. Rows no run recorded are left out.",
      "", "Spread:", "",
      *tests_table(rows, "test_spread", quantities),
      "", "Brown–Forsythe test of equal spread (Levene's W on absolute deviations from each "
      "method's median, as scipy.stats.levene(center=\"median\")), p by exact permutation of "
      "the pooled deviations (the F(1, N−2) p-value, which assumes normal deviations, is "
      f"p_approx in report.csv).{spread_runs} < / >: the first method's seeds spread less / "
      "more (mean absolute deviation). Cells and first row as for location."]


def _distinct(values: Iterable[Any]) -> list[str]:
  out: list[str] = []
  for v in values:
    if v is not None and str(v) not in out:
      out.append(str(v))
  return out


def unfinished(runs: dict[str, list[Run]]) -> list[str]:
  """``"implicit seed 4 (epoch 37/200)"`` for each run without ``done.json``."""
  out = []
  for method, rs in runs.items():
    for r in rs:
      if not r.finished:
        planned = r.planned_epochs
        out.append(f"{method} seed {r.seed} (epoch {r.last_epoch}/"
                   f"{planned if planned is not None else '?'})")
  return out


def _imbalance(runs: dict[str, list[Run]], classes: int) -> tuple[str, list[int]]:
  """A sentence on the runs' training-set imbalance, and the minority class ids of
  ``classes`` classes (``[]`` for a balanced set or settings that differ between runs)."""
  settings = {(str(c.get("imbalance", "none")), c.get("imbalance_ratio"),
               c.get("minority_fraction", 0.5))
              for c in (_train_config(r.config) for rs in runs.values() for r in rs)}
  if len(settings) != 1:
    return ("The runs' training-set imbalance differs: "
            + "; ".join(f"{p} {r} {f}" for p, r, f in sorted(settings, key=str)) + ".", [])
  profile, ratio, fraction = settings.pop()
  if profile == "none":
    return "Balanced training set.", []
  from nc_jax.data import imbalance    # numpy only; the report needs no jax otherwise
  minority = list(imbalance.minority_classes(classes, fraction))
  sizes = ("sizes falling exponentially from class 0 to class "
           f"{classes - 1}" if profile == "longtail" else
           f"classes {minority[0]}–{minority[-1]} reduced")
  return (f"Training set: `{profile}` imbalance, ratio {ratio:g} (largest / smallest class; "
          f"{sizes}); minority classes (m): {minority[0]}–{minority[-1]}.", minority)


def _per_class_section(runs: dict[str, list[Run]], rows: list[dict]) -> list[str]:
  """The per-class tables (:data:`PER_CLASS`, medians over seeds), if any run recorded them."""
  found = {(r["method"], r["metric"], r["split"]): r for r in rows if r["table"] == "per_class"}
  if not found:
    return []
  classes = 1 + max(int(metric.rsplit("_", 1)[1]) for _, metric, _ in found)
  sentence, minority = _imbalance(runs, classes)
  lines = ["", "## Per class (last NC epoch of each run)", "", sentence]
  for key, split, label, kind in PER_CLASS:
    body = []
    for method in runs:
      cells = [found.get((method, per_class_metric(key, c), split)) for c in range(classes)]
      if any(cell and cell["n"] for cell in cells):
        n = max(cell["n"] for cell in cells if cell)
        body.append([method, str(n), *(_fmt(cell["median"], kind) if cell else "–"
                                       for cell in cells)])
    if body:
      head = ["method", "n", *(f"{c} m" if c in minority else str(c) for c in range(classes))]
      lines += ["", f"{label}, median over seeds, per class:", "", *_table(head, body)]
  lines += ["", "Each class's median over the runs of the final-metrics table (n seeds: the "
            "finished runs, or all if none of a method finished) at their last NC epoch; "
            "ranges and means per class in report.csv (table `per_class`). The majority / "
            "minority averages and the minority-collapse measure are in the final-metrics "
            "table above."]
  return lines


#: Captions of the figures in ``report.md`` (file stem → caption).
FIGURES = {"metrics": "Metrics against epoch (median over seeds, min–max band)",
           "margins": "Per-sample train cosine margin at the end of training, sorted",
           "per_class": "Per class at the last NC epoch (minority classes shaded)"}


def render_markdown(folder: str | pathlib.Path, runs: dict[str, list[Run]], rows: list[dict],
                    warnings: Sequence[str] = (),
                    figures: Sequence[pathlib.Path] = ()) -> str:
  """The report as Markdown: configuration, then the top-1, final-NC and convergence tables,
  then the ``figures`` (written beside ``report.md``; linked by file name)."""
  all_runs = [r for rs in runs.values() for r in rs]
  name = ", ".join(_distinct(r.config.get("experiment") for r in all_runs))
  name = name or pathlib.Path(folder).resolve().name

  def config_values(key: str) -> str:
    vals = _distinct(_train_config(r.config).get(key, r.config.get(key)) for r in all_runs)
    return ", ".join(vals) if vals else "?"

  lines = [f"# Report: {name}", "", f"Runs from `{folder}`.", ""]
  lines.append(f"- dataset: {config_values('dataset')}; model: {config_values('model')}; "
               f"optimizer: {config_values('optimizer')}; batch size: "
               f"{config_values('batch_size')}; epochs: {config_values('epochs')}")
  # What else makes these runs differ from the paper's recipe (only when recorded).
  extra = [(k, config_values(k)) for k in ("stem", "width", "augment", "source", "tau")]
  options = [(k, ", ".join(_distinct(r.config.get("options", {}).get(k) for r in all_runs)))
             for k in ("train_examples", "test_examples", "nc_every")]
  details = [f"{k}: {v}" for k, v in extra + options if v and v not in ("?", "None")]
  if details:
    lines.append("- " + "; ".join(details))
  for method, rs in runs.items():
    done = sum(r.finished for r in rs)
    lines.append(f"- {method}: seeds {', '.join(str(r.seed) for r in rs)} "
                 f"({len(rs)} runs, {done} finished)")
  machines = _distinct(r.config.get("machine") for r in all_runs)
  lines.append(f"- machine: {'; '.join(machines) if machines else '?'}")
  versions: dict[str, list[str]] = {}
  for r in all_runs:
    vs = r.config.get("versions")
    for pkg, v in (vs.items() if isinstance(vs, dict) else ()):
      versions.setdefault(pkg, [])
      if str(v) not in versions[pkg]:
        versions[pkg].append(str(v))
  lines.append("- versions: " + ("; ".join(f"{p} {', '.join(v)}" for p, v in versions.items())
                                 if versions else "?"))
  if unfinished(runs):
    lines.append(f"- unfinished: {'; '.join(unfinished(runs))}")
  for w in warnings:
    lines.append(f"- skipped/ignored: {w}")

  def find(table, method, metric, split, epoch=None):
    for row in rows:
      if (row["table"], row["method"], row["metric"], row["split"]) == (table, method, metric,
                                                                        split):
        if epoch is None or row["epoch"] == epoch:
          return row
    raise KeyError((table, method, metric, split, epoch))

  lines += ["", "## Top-1 accuracy (%) at chosen epochs", ""]
  epochs = sorted({row["epoch"] for row in rows if row["table"] == "top1"})
  body = []
  for method in runs:
    for epoch in epochs:
      tr, te = (find("top1", method, "top1", s, epoch) for s in ("train", "test"))
      body.append([method, str(epoch), *_cells(tr, "acc"), *_cells(te, "acc")])
  lines += _table(["method", "epoch", "n", "train median [min, max]", "train mean ± std", "n",
                   "test median [min, max]", "test mean ± std"], body)
  lines += ["", "Train top-1 is the running mean over the epoch's training batches (augmented "
            "unless --no-augment; `train_top1`); test top-1 is `test_top1`. n: seeds with that "
            "epoch / seeds."]

  lines += ["", "## Final neural-collapse metrics (last NC epoch of each run)", ""]
  body = []
  for key in NC_KEYS:
    kind = "sci" if key.startswith("nc1") else "acc" if key.startswith("top1") else "num"
    if not any(find("final_nc", m, key, s)["n"] for m in runs for s in ("train", "test")):
      continue  # recorded by no run (e.g. the imbalance metrics of a balanced experiment)
    for method in runs:
      tr, te = (find("final_nc", method, key, s) for s in ("train", "test"))
      body.append([key, method, str(tr["epoch"] or te["epoch"] or "–"), *_cells(tr, kind),
                   *_cells(te, kind)])
  lines += _table(["metric", "method", "epoch", "n", "train median [min, max]",
                   "train mean ± std", "n", "test median [min, max]", "test mean ± std"], body)
  lines += ["", "From the NC passes over the un-augmented train and test splits (`nc_train_*`, "
            "`nc_test_*`); top1 there is the NC pass's accuracy (%). NaN values are left out "
            "of n."]
  lines += _tests_section(rows, "final")
  lines += _per_class_section(runs, rows)

  lines += ["", "## Convergence (first epoch reaching the criterion)", ""]
  body = []
  for method in runs:
    for name_, label, _, _ in convergence_criteria():
      ep = find("convergence", method, f"epochs_to_{name_}", "train")
      sec = find("convergence", method, f"seconds_to_{name_}", "train")
      missed = ep["total"] - ep["n"]
      body.append([method, label, f"{ep['n']}/{ep['total']}", _median_range(ep, "epoch"),
                   _median_range(sec, "sec"),
                   f"not reached ({missed} of {ep['total']})" if missed else "–"])
  lines += _table(["method", "criterion", "reached", "epoch median [min, max]",
                   "seconds median [min, max]", "not reached"], body)
  lines += ["", "Medians over the seeds that reached the criterion (reached: k/n seeds; "
            "'–': none). Seconds are `elapsed` (train + eval wall time since the run started). "
            "NC-pass criteria are only checked on NC epochs. The tests below count the runs "
            "that did not reach a criterion as censored, not as missing."]
  lines += _tests_section(rows, "convergence")
  if figures:
    lines += ["", "## Figures"]
    for path in figures:
      caption = FIGURES.get(path.stem, path.stem)
      lines += ["", f"{caption}:", "", f"![{caption}]({path.name})"]
  return "\n".join(lines) + "\n"


def write_markdown(path: str | pathlib.Path, text: str) -> pathlib.Path:
  path = pathlib.Path(path)
  path.write_text(text)
  return path


def write_csv(path: str | pathlib.Path, rows: Sequence[dict]) -> pathlib.Path:
  """The rows in long format (:data:`CSV_COLUMNS`); missing statistics are empty cells."""
  path = pathlib.Path(path)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    for row in rows:
      # repr keeps full float precision; None (no values) becomes an empty cell.
      writer.writerow(["" if row[c] is None else repr(row[c]) if isinstance(row[c], float)
                       else row[c] for c in CSV_COLUMNS])
  return path


# --------------------------------------------------------------------------- #
# Figures
# --------------------------------------------------------------------------- #


def _save(fig, path: str | pathlib.Path, suptitle: str | None = None) -> pathlib.Path:
  """Lays out, writes (100 dpi) and closes a figure; returns its path."""
  import matplotlib.pyplot as plt
  if suptitle:
    fig.suptitle(suptitle)
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def epoch_series(runs: Sequence[Run], key: str) -> tuple[np.ndarray, ...]:
  """``(epochs, median, min, max)`` of ``key`` over the seeds that have it at each epoch."""
  by_epoch: dict[int, list[float]] = {}
  for r in runs:
    for rec in r.records:
      v = _value(rec.get(key))
      if v is not None:
        by_epoch.setdefault(rec["epoch"], []).append(v)
  es = sorted(by_epoch)
  rows = [stats(by_epoch[e]) for e in es]
  return (np.asarray(es, dtype=np.float64), *(np.asarray([s[k] for s in rows], dtype=np.float64)
                                              for k in ("median", "min", "max")))


def _title(runs: dict[str, list[Run]], folder: str | pathlib.Path) -> str:
  all_runs = [r for rs in runs.values() for r in rs]
  name = ", ".join(_distinct(r.config.get("experiment") for r in all_runs))
  bits = [", ".join(_distinct(_train_config(r.config).get(k) for r in all_runs))
          for k in ("dataset", "model", "optimizer")]
  # The experiment is often named after its dataset: say it once.
  return " · ".join(_distinct(b for b in [name or pathlib.Path(folder).resolve().name, *bits]
                              if b))


def plot_metrics(runs: dict[str, list[Run]], path: str | pathlib.Path,
                 title: str = "") -> pathlib.Path | None:
  """Grid of metric-vs-epoch panels (:data:`PANELS`), methods overlaid, median and min–max band.

  Statistics are per epoch over the seeds that have the key there (NaN left out).
  On log panels non-positive medians and band edges are masked (an exact ETF has
  NC2 = 0). Panels with no data are left out; returns ``None`` (and writes
  nothing) if none has any.
  """
  series = {}
  for key, _, scale in PANELS:
    per_method = {}
    for method, rs in runs.items():
      x, med, lo, hi = epoch_series(rs, key)
      if scale == "log":
        med, lo, hi = (np.where(a > 0, a, np.nan) for a in (med, lo, hi))
      if np.isfinite(med).any():
        per_method[method] = (x, med, lo, hi)
    if per_method:
      series[key] = per_method
  if not series:
    return None
  seed_counts = {method: len(rs) for method, rs in runs.items()}
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator

  panels = [p for p in PANELS if p[0] in series]
  ncols = min(3, len(panels))
  nrows = -(-len(panels) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.8 * nrows), squeeze=False)
  for ax, (key, label, scale) in zip(axes.flat, panels):
    for method, (x, med, lo, hi) in series[key].items():
      c = colour(method)
      # Markers: NC metrics exist every few epochs only, and a single point needs one.
      ax.plot(x, med, color=c, label=method, marker="." if len(x) < 40 else None)
      band = np.isfinite(lo) & np.isfinite(hi)
      if band.any():
        ax.fill_between(x, np.where(band, lo, 0), np.where(band, hi, 0), where=band, color=c,
                        alpha=0.2, linewidth=0)
    ax.set_yscale(scale)
    ax.set_title(label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(panels):]:
    ax.set_visible(False)
  axes.flat[0].legend()
  seeds = sorted({n for n in seed_counts.values()}) if seed_counts else []
  what = ("one seed" if seeds == [1] else
          f"median over {'/'.join(map(str, seeds))} seeds, min–max band")
  return _save(fig, path, f"{title} ({what})" if title else what)


def margin_curves(runs: Sequence[Run], points: int = 1000) -> tuple[np.ndarray, ...] | None:
  """``(rank, median, min, max)``: sorted margins against normalised rank 0..1, over seeds.

  Runs may have different N, so each is resampled as its empirical quantile
  function on a common grid; ``None`` if no run has margins.
  """
  ms = [m[~np.isnan(m)] for m in (r.margins for r in runs) if m is not None]
  ms = [m for m in ms if m.size]
  if not ms:
    return None
  grid = np.linspace(0.0, 1.0, min(points, max(m.size for m in ms)))
  curves = np.stack([np.quantile(m, grid) for m in ms])
  return grid, np.median(curves, 0), curves.min(0), curves.max(0)


def plot_margins(runs: dict[str, list[Run]], path: str | pathlib.Path,
                 title: str = "") -> pathlib.Path | None:
  """Per-sample cosine margin at the end of training, sorted, methods overlaid.

  Returns ``None`` (and writes nothing) if no run has ``margins.npy``.
  """
  curves = {m: c for m, rs in runs.items() if (c := margin_curves(rs)) is not None}
  if not curves:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for method, (x, med, lo, hi) in curves.items():
    c = colour(method)
    n = sum(r.margins is not None for r in runs[method])
    ax.plot(x, med, color=c, label=f"{method} ({n} seeds)")
    ax.fill_between(x, lo, hi, color=c, alpha=0.2, linewidth=0)
  ax.axhline(0.0, color="k", lw=0.8)
  ax.set_xlabel("normalised sample rank")
  ax.set_ylabel("cosine margin")
  ax.set_title(f"{title}\nper-sample train cosine margin, end of training" if title else
               "per-sample train cosine margin, end of training")
  ax.grid(alpha=0.3)
  ax.legend()
  return _save(fig, path)


def plot_per_class(runs: dict[str, list[Run]], path: str | pathlib.Path,
                   title: str = "") -> pathlib.Path | None:
  """Per-class panels (:data:`PER_CLASS`) at the last NC epoch against the class id, methods
  overlaid (median over the final runs, min–max band), minority classes shaded.

  Returns ``None`` (and writes nothing) if no run recorded per-class lists (balanced sets).
  """
  series = {}
  for key, split, label, kind in PER_CLASS:
    per_method = {}
    for method, rs in runs.items():
      got = [v for _, v in final_per_class(rs, key, split)]
      if got and len({v.size for v in got}) == 1:
        a = np.stack(got)
        if kind == "sci":
          a = np.where(a > 0, a, np.nan)
        if np.isfinite(a).any():
          # The tables' statistics (NaN skipped); a class with no value in any seed: a gap.
          columns = [stats(a[:, c]) for c in range(a.shape[1])]
          per_method[method] = (*(np.asarray([np.nan if col[k] is None else col[k]
                                              for col in columns])
                                  for k in ("median", "min", "max")), len(got))
    if per_method:
      series[(key, split)] = (label, kind, per_method)
  if not series:
    return None
  classes = max(m[0].size for _, _, pm in series.values() for m in pm.values())
  _, minority = _imbalance(runs, classes)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.8), squeeze=False)
  for ax, (label, kind, per_method) in zip(axes.flat, series.values()):
    for c in minority:
      ax.axvspan(c - 0.5, c + 0.5, color="0.9", linewidth=0)
    for method, (med, lo, hi, n) in per_method.items():
      x = np.arange(med.size)
      col = colour(method)
      ax.plot(x, med, color=col, marker=".", label=f"{method} ({n} seed{'s' * (n != 1)})")
      ax.fill_between(x, lo, hi, color=col, alpha=0.2, linewidth=0)
    ax.set_yscale("log" if kind == "sci" else "linear")
    ax.set_title(label)
    ax.set_xlabel("class" + (" (shaded: minority)" if minority else ""))
    ax.set_xticks(range(classes))
    ax.grid(alpha=0.3)
  axes.flat[0].legend()
  what = "per class, last NC epoch: median over seeds, min–max band"
  return _save(fig, path, f"{title} ({what})" if title else what)


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def parse_epochs(text: str) -> list[int]:
  """``"10,50,200"`` → ``[10, 50, 200]`` (sorted, unique); positive integers only."""
  try:
    epochs = [int(part) for part in text.split(",")]
  except ValueError:
    epochs = []
  if not epochs or any(e < 1 for e in epochs):
    raise ValueError(f"--epochs: expected a comma list of positive integers, got {text!r}")
  return sorted(set(epochs))


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m experiments.report", allow_abbrev=False,
      description="Multi-seed tables, CSV and figures from image-experiment run folders "
                  f"({EXPECTED}).")
  p.add_argument("folders", nargs="+", metavar="FOLDER", help="experiment folder(s)")
  p.add_argument("--epochs", help="epochs of the top-1 table, e.g. 10,50,200 (default: the "
                                  "last epoch and up to 3 evenly spaced earlier ones)")
  p.add_argument("--out", help="output folder (default: each experiment folder; with several "
                               "folders, <out>/<folder name>/)")
  p.add_argument("--quiet", action="store_true", help="do not print the Markdown")
  p.add_argument("--no-plot", action="store_true", help="tables only, no figures")
  return p


def report(folder: str | pathlib.Path, out: str | pathlib.Path, epochs: Sequence[int] | None,
           runs: dict[str, list[Run]], warnings: Sequence[str] = (), plot: bool = True) -> dict:
  """Writes one experiment's report into ``out``; returns its runs, rows, Markdown and paths."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  epochs = list(epochs) if epochs else default_epochs(runs)
  rows = report_tables(runs, epochs)
  paths = {}
  if plot:        # first, so that report.md links the figures this call wrote
    title = _title(runs, folder)
    for name, fn in (("metrics", plot_metrics), ("margins", plot_margins),
                     ("per_class", plot_per_class)):
      path = fn(runs, out / f"{name}.png", title)
      if path is not None:
        paths[name] = path
  text = render_markdown(folder, runs, rows, warnings, figures=list(paths.values()))
  paths |= {"markdown": write_markdown(out / "report.md", text),
            "csv": write_csv(out / "report.csv", rows)}
  return {"runs": runs, "epochs": epochs, "rows": rows, "markdown": text, "paths": paths,
          "warnings": list(warnings)}


def _is_ufm(folder: pathlib.Path) -> bool:
  """Whether ``folder`` holds UFM runs: their records are keyed by ``iteration``."""
  for path in folder.glob("*/seed-*/metrics.jsonl"):
    with open(path) as f:
      first = f.readline()
    try:
      record = json.loads(first)
    except json.JSONDecodeError:
      continue
    return isinstance(record, dict) and "iteration" in record and "epoch" not in record
  return False


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
  """Runs the command; returns ``{folder: report(...) result}``."""
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    epochs = parse_epochs(args.epochs) if args.epochs is not None else None
  except ValueError as err:
    parser.error(str(err))
  folders = [pathlib.Path(f) for f in args.folders]
  names = [f.resolve().name for f in folders]
  if args.out and len(folders) > 1 and len(set(names)) < len(names):
    parser.error(f"--out: the experiment folders' names clash ({', '.join(names)}); "
                 "report them one at a time")
  # Load everything first, so that a bad folder fails before anything is written.
  loaded = []
  for folder in folders:
    if not folder.is_dir():
      parser.error(f"{folder}: no such folder (expected run folders {EXPECTED})")
    if _is_ufm(folder):
      parser.error(f"{folder}: UFM run folders (records per iteration, not per epoch); "
                   f"python -m experiments.ufm prints their summary and draws their figure "
                   f"(ufm.png in that folder); this report is for the image experiments")
    warnings: list[str] = []
    runs = load_runs(folder, warn=lambda w: (warnings.append(w), _warn_stderr(w)))
    if not runs:
      parser.error(f"{folder}: no runs found (expected {EXPECTED})")
    loaded.append((folder, runs, warnings))
  results = {}
  for (folder, runs, warnings), name in zip(loaded, names):
    out = (folder if not args.out else pathlib.Path(args.out) if len(folders) == 1
           else pathlib.Path(args.out) / name)
    result = report(folder, out, epochs, runs, warnings, plot=not args.no_plot)
    if not args.quiet:
      print(result["markdown"])
    for path in result["paths"].values():
      print(f"wrote {path}")
    results[str(folder)] = result
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
