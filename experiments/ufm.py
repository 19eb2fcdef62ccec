"""Unconstrained features model (UFM): the paper's synthetic experiment, and nc_jax's default job.

The backbone is replaced by free features: N vectors :math:`h_i \\in \\mathbb R^d`
(parameters, τ-normalised like the network features), K balanced classes. Every
method trains them full batch for 2000 iterations (paper) through its
classifier head (:mod:`nc_jax.heads`): ``standard`` (learned cosine classifier),
``fixed`` (fixed simplex ETF), ``implicit`` (the paper's nearest-ETF layer) and
``implicit-fo`` (its forward-only ablation). Neural-collapse metrics are
logged every ``--eval-every`` iterations.

Presets (``--preset``): ``ufm10`` is the paper's UFM-10 (K = 10, N = 1000,
d = 512); ``ufm100``, ``ufm200``, ``ufm1000`` keep 100 features per class (the
paper does not give N for them; K = 1000 uses d = 1024 since the ETF needs
d ≥ K). The optimiser and step size are not in the paper: the default is Adam
(lr 0.01), which is insensitive to the 1/N scale of per-feature gradients under
a mean loss; SGD (``--optimizer sgd --lr ...``) and feature weight decay
(``--feature-decay``) are flags (see BUILD_NOTES.md).

Checkpoints every ``--checkpoint-every`` iterations and on SIGINT/SIGTERM; the same command
continues an interrupted run (same settings) from its newest intact checkpoint.

Writes ``<out>/<method>/seed-<n>/{config.json, metrics.jsonl, environment.jsonl, margins.npy}``
(``environment.jsonl``: one line per start or resume, see
:meth:`experiments.run_folder.RunFolder.append_environment`), a
six-panel figure ``<out>/ufm.png`` (CE loss with its lower bound, average cosine
margin, per-sample cosine margin at the end, NC1, NC3, WH-equinorm; methods
overlaid) and prints a summary: iterations to 100 % accuracy and NC1 thresholds and the
final metrics, medians over seeds, and with several seeds the tests between methods of the
image report (exact permutation tests on Gehan scores, "not reached" censored;
Brown–Forsythe for spread; Holm), also written to ``<out>/summary.md`` and
``<out>/tests.csv``.

Run: ``python -m experiments.ufm`` (3 methods × 5 seeds, about three minutes on 2 CPU
cores), or e.g.
``python -m experiments.ufm --preset ufm100 --methods implicit,implicit-fo --seeds 1-3``.
"""

from __future__ import annotations

if __name__ == "__main__":  # run as a program: one BLAS thread unless exported
  from experiments import threads  # (before JAX loads LAPACK; why: experiments.threads)
  threads.set_blas_defaults()

import argparse
import csv
import dataclasses
import os
import pathlib
import shutil
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import report, run_folder
from experiments.cli import exit_with_message, parse_methods, parse_seeds
from nc_jax import checkpoint, heads, metrics, train
from nc_jax.config import METHOD_VARIANTS
from nc_jax.evaluate import nc_evaluate

PRESETS = {
    "ufm10": dict(classes=10, samples_per_class=100, dim=512),
    "ufm100": dict(classes=100, samples_per_class=100, dim=512),
    "ufm200": dict(classes=200, samples_per_class=100, dim=512),
    "ufm1000": dict(classes=1000, samples_per_class=100, dim=1024),
}
NC1_THRESHOLDS = (1e-1, 1e-2, 1e-3, 1e-4)
# The UFM trains with cross-entropy (its figure plots the loss against the CE lower bound), so
# it offers the methods that use it: all but the dot-regression baseline.
METHODS = tuple(m for m, v in METHOD_VARIANTS.items() if v.loss == "cross_entropy")


@dataclasses.dataclass(frozen=True)
class UFMConfig:
  preset: str = "ufm10"
  classes: int = 10
  samples_per_class: int = 100
  dim: int = 512
  methods: tuple[str, ...] = ("standard", "fixed", "implicit")
  seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
  iterations: int = 2000
  optimizer: str = "adam"
  lr: float = 0.01
  momentum: float = 0.9
  feature_decay: float = 0.0
  tau: float = 5.0
  eval_every: int = 20
  checkpoint_every: int = 200
  out: str = "runs/ufm"
  quiet: bool = False
  plot: bool = True
  overwrite: bool = False


# Fields of UFMConfig that do not change what a run computes (the rest must match to reuse a
# finished run).
NOT_RUN_DEFINING = ("methods", "seeds", "out", "quiet", "plot", "overwrite", "checkpoint_every")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m experiments.ufm",
                              description="Unconstrained features model (paper's UFM figures).")
  p.add_argument("--preset", choices=sorted(PRESETS), default="ufm10",
                 help="K, N/K and d of the paper's UFM-10/100/200/1000 (default: %(default)s)")
  p.add_argument("--classes", type=int, help="K (overrides the preset)")
  p.add_argument("--samples-per-class", type=int, help="N/K (overrides the preset)")
  p.add_argument("--dim", type=int, help="feature dimension d (overrides the preset)")
  p.add_argument("--methods", default="standard,fixed,implicit",
                 help=f"comma list of {', '.join(METHODS)} (default: %(default)s)")
  p.add_argument("--seeds", default="1-5",
                 help="N, A-B or a comma list (default 1-5: the paper reports 5 seeds)")
  p.add_argument("--iterations", type=int, default=2000,
                 help="full-batch training iterations (default: %(default)s, the paper's)")
  p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                 help="optimiser of features and classifier (default: %(default)s)")
  p.add_argument("--lr", type=float, default=None, help="learning rate (unset: 0.01 for adam, 100 for sgd)")
  p.add_argument("--momentum", type=float, default=0.9,
                 help="sgd momentum (default: %(default)s)")
  p.add_argument("--feature-decay", type=float, default=0.0,
                 help="weight decay on the free features (default: %(default)s; the official "
                      "--sep_decay rate: 1e-4)")
  p.add_argument("--tau", type=float, default=5.0,
                 help="feature norm τ (default: %(default)s)")
  p.add_argument("--eval-every", type=int, default=20,
                 help="NC metrics every N iterations (default: %(default)s)")
  p.add_argument("--checkpoint-every", type=int, default=200,
                 help="checkpoint every N iterations, 0: only when interrupted (default: "
                      "%(default)s); SIGINT/SIGTERM checkpoint and stop, and an "
                      "interrupted run continues from its newest checkpoint when the same "
                      "command runs again")
  p.add_argument("--out", default="runs/ufm",
                 help="runs go to <out>/<method>/seed-<n> (default: %(default)s)")
  p.add_argument("--quiet", action="store_true", help="no per-interval progress lines")
  p.add_argument("--no-plot", action="store_true", help="no figure")
  p.add_argument("--overwrite", action="store_true",
                 help="run again seeds that finished earlier (default: reuse them)")
  return p


def config_from_args(argv: Sequence[str] | None = None) -> UFMConfig:
  parser = build_parser()
  args = parser.parse_args(argv)
  preset = PRESETS[args.preset]
  try:
    methods = parse_methods(args.methods, METHODS)
    seeds = parse_seeds(args.seeds)
  except ValueError as err:
    parser.error(str(err))
  cfg = UFMConfig(
      preset=args.preset, classes=args.classes or preset["classes"],
      samples_per_class=args.samples_per_class or preset["samples_per_class"],
      dim=args.dim or preset["dim"], methods=methods, seeds=seeds, iterations=args.iterations,
      optimizer=args.optimizer,
      lr=args.lr if args.lr is not None else (0.01 if args.optimizer == "adam" else 100.0),
      momentum=args.momentum, feature_decay=args.feature_decay, tau=args.tau,
      eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, out=args.out,
      quiet=args.quiet, plot=not args.no_plot,
      overwrite=args.overwrite)
  for name in ("classes", "samples_per_class", "dim", "iterations", "eval_every"):
    if getattr(cfg, name) < 1:
      parser.error(f"--{name.replace('_', '-')}: expected a positive integer, got "
                   f"{getattr(cfg, name)}")
  if cfg.checkpoint_every < 0:
    parser.error(f"--checkpoint-every: expected a non-negative integer, got "
                 f"{cfg.checkpoint_every}")
  if cfg.classes < 2:
    parser.error(f"--classes: expected K >= 2, got {cfg.classes}")
  if cfg.dim < cfg.classes and set(methods) - {"standard"}:
    parser.error(f"--dim: the ETF methods need d >= K, got d={cfg.dim}, K={cfg.classes}")
  if not cfg.lr > 0 or not cfg.tau > 0 or cfg.feature_decay < 0:
    parser.error("--lr and --tau must be positive and --feature-decay non-negative")
  return cfg


# --------------------------------------------------------------------------- #
# One run
# --------------------------------------------------------------------------- #


class Interrupted(RuntimeError):
  """SIGINT/SIGTERM stopped a run; its state was checkpointed (the message says where)."""


def run_one(cfg: UFMConfig, method: str, seed: int, log=print,
            checkpointer: checkpoint.Checkpointer | None = None,
            on_start: Callable[[int], None] | None = None) -> dict:
  """Trains one method with one seed; returns ``{"history": [...], "margins": ndarray}``.

  With a ``checkpointer`` it continues from the newest intact checkpoint there (if any) and
  saves every ``cfg.checkpoint_every`` iterations and when SIGINT/SIGTERM arrives (then
  raises :class:`Interrupted`). ``on_start(iteration)`` is called once, after any restore and
  before the first step, with the iteration the run continues from (0 from the beginning).
  A checkpoint holds the features, classifier, optimiser and
  head states, the unconverged-solve count and the records so far, so a resumed run's
  records equal the uninterrupted run's (bitwise on CPU), wall-clock seconds aside.
  """


  k, n, d = cfg.classes, cfg.classes * cfg.samples_per_class, cfg.dim
  variant = METHOD_VARIANTS[method]
  head_cfg = heads.HeadConfig(variant.head, num_classes=k, feature_dim=d, tau=cfg.tau,
                              **variant.head_options())
  key_h, key_head = jax.random.split(jax.random.PRNGKey(seed))
  labels = jnp.arange(n, dtype=jnp.int32) % k
  params = {"features": jax.random.normal(key_h, (n, d), jnp.float32)}
  head_params, head_state = heads.init(head_cfg, key_head)
  params["head"] = head_params
  if cfg.optimizer == "adam":
    tx = optax.adam(cfg.lr)
  else:
    tx = optax.sgd(cfg.lr, momentum=cfg.momentum)
  if cfg.feature_decay:
    decay = optax.masked(optax.add_decayed_weights(cfg.feature_decay),
                         {"features": True, "head": jax.tree.map(lambda _: False, head_params)})
    tx = optax.chain(decay, tx)
  opt_state = tx.init(params)
  unconverged = jnp.zeros((), jnp.float32)
  history, start, seconds_before = [], 0, 0.0
  if checkpointer is not None and checkpointer.has_checkpoint():
    template = {"params": params, "opt_state": opt_state, "head_state": head_state,
                "unconverged": unconverged}
    restored, position = checkpointer.restore(template)
    if position.get("iteration") != checkpointer.restored_step:
      raise ValueError(f"{checkpointer.directory}: checkpoint {checkpointer.restored_step} "
                       f"records iteration {position.get('iteration')!r}; delete the folder "
                       f"or run with --overwrite")
    params, opt_state = restored["params"], restored["opt_state"]
    head_state, unconverged = restored["head_state"], restored["unconverged"]
    history, start = position["records"], position["iteration"]
    seconds_before = position["seconds"]
    log(f"  {method:>11} seed {seed}: resuming at iteration {start}")

  # The labels are an argument, not a closed-over constant: as a constant, XLA folds the
  # loss gradient's one-hot scatter into an (N, K) constant while compiling (measured: 5 s
  # more for UFM-1000, and "slow constant folding" errors in the log).
  @jax.jit
  def step(params, opt_state, head_state, labels):
    def objective(p):
      h = heads.head_features(head_cfg, p["features"])
      logits, new_head = heads.train_logits(head_cfg, p["head"], head_state, h, labels)
      return heads.loss("cross_entropy", logits, labels), new_head

    (loss, new_head), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params = {**params, "head": heads.renormalise(head_cfg, params["head"])}
    return params, opt_state, new_head, loss, heads.unconverged_solves(new_head)

  def evaluate(it, loss):
    h = np.asarray(heads.head_features(head_cfg, params["features"]))
    # Only METRIC_KEYS are recorded, so the numerical rank is skipped: its K float64 SVDs
    # made the pass 1.45-1.76 times as long at UFM-200 and UFM-1000 (BUILD_NOTES §9).
    m = nc_evaluate(h, np.asarray(labels), head_cfg, params["head"], head_state,
                    numerical_rank=False)
    record = {"iteration": it, "loss": float(loss)}
    record.update({key: m[key] for key in metrics.METRIC_KEYS})
    return record, m["cosine_margins"]

  def save(it):
    state = {"params": params, "opt_state": opt_state, "head_state": head_state,
             "unconverged": unconverged}
    checkpointer.save(it, state, {"iteration": it, "records": history,
                                  "seconds": seconds_before + time.perf_counter() - t0})
    checkpointer.wait()  # on disk before the run goes on (or the process exits)

  if on_start is not None:
    on_start(start)
  t0 = time.perf_counter()
  margins = None
  with checkpoint.StopRequest() as stop:
    for it in range(start + 1, cfg.iterations + 1):
      params, opt_state, head_state, loss, bad = step(params, opt_state, head_state,
                                                      labels)
      unconverged = unconverged + bad  # on device; read with the metrics
      if it == 1 or it % cfg.eval_every == 0 or it == cfg.iterations:
        train.check_solves(unconverged)  # a failed matmul-only solve stops the run here
        record, margins = evaluate(it, loss)
        record["seconds"] = seconds_before + time.perf_counter() - t0
        history.append(record)
        if not cfg.quiet and (it == 1 or it % (cfg.eval_every * 25) == 0
                              or it == cfg.iterations):
          eta = (record["seconds"] - seconds_before) / (it - start) * (cfg.iterations - it)
          log(f"  {method:>11} seed {seed} it {it:5d}/{cfg.iterations}: loss "
              f"{record['loss']:.4f} NC1 {record['nc1']:.2e} NC3 {record['nc3']:.3f} top1 "
              f"{record['top1']:.1f}%  ({record['seconds']:.0f} s, ETA {eta:.0f} s)")
      if it == cfg.iterations:
        break  # finished: the caller saves the records
      if stop.requested:
        if checkpointer is None:
          raise Interrupted(f"{method} seed {seed}: stopped ({stop.signal_name}) at iteration "
                            f"{it}; not checkpointed")
        save(it)
        raise Interrupted(f"{method} seed {seed}: stopped ({stop.signal_name}) at iteration "
                          f"{it}, checkpointed in {checkpointer.directory}; run the same "
                          f"command again to continue")
      if checkpointer is not None and cfg.checkpoint_every and it % cfg.checkpoint_every == 0:
        save(it)
  return {"history": history, "margins": np.asarray(margins)}


# --------------------------------------------------------------------------- #
# Records, summary, figure
# --------------------------------------------------------------------------- #


def run_dir(cfg: UFMConfig, method: str, seed: int) -> pathlib.Path:
  return pathlib.Path(cfg.out) / method / f"seed-{seed}"


def run_config(cfg: UFMConfig, method: str, seed: int) -> dict:
  """What one run computes: the fields that define it, the method and the seed."""
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_RUN_DEFINING} | {
      "method": method, "seed": seed}


def save_run(run: run_folder.RunFolder, config: dict, result: dict) -> None:
  """Config, records and margins, then ``done.json`` last (a run without it is not finished)."""
  run.path.mkdir(parents=True, exist_ok=True)
  run_folder.write_json(run.config_path, config)
  run.write_records(result["history"])
  tmp = run.margins_path.with_name("margins.tmp.npy")
  np.save(tmp, result["margins"])
  tmp.replace(run.margins_path)
  run.mark_done({"iterations": config["iterations"]})


def _check_config(run: run_folder.RunFolder, config: dict, what: str) -> None:
  """Raises ValueError listing each difference between ``config`` and the saved one."""
  saved = run_folder.read_json(run.config_path)
  diff = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in config.items()
          if saved.get(k) != v]
  if diff:
    raise ValueError(f"{run.path}: {what} with a different configuration ("
                     + "; ".join(diff) + "); use --overwrite or another --out")


def load_finished(run: run_folder.RunFolder, config: dict) -> dict | None:
  """A finished run's result if ``run`` finished with this ``config``, else ``None``.

  Raises:
    ValueError: it finished with another configuration (listed): reusing it would mix runs.
  """
  if not run.done_path.exists():
    return None
  _check_config(run, config, "finished")
  return {"history": run.read_records(), "margins": np.load(run.margins_path)}


def prepare_unfinished(run: run_folder.RunFolder, config: dict, overwrite: bool
                       ) -> checkpoint.Checkpointer:
  """Readies an unfinished run's folder and returns its checkpointer.

  A run with checkpoints continues only with the configuration it started with (its
  ``config.json``, written before the first iteration); ``overwrite`` discards them.

  Raises:
    ValueError: checkpoints of another configuration, or without a ``config.json``.
  """
  if run.done_path.exists():
    run.done_path.unlink()  # being redone: not finished until saved again
  if overwrite and run.checkpoint_dir.exists():
    shutil.rmtree(run.checkpoint_dir)
  if checkpoint.has_checkpoint(run.checkpoint_dir):
    if not run.config_path.exists():
      raise ValueError(f"{run.path}: has checkpoints but no config.json to check the "
                       f"configuration against; use --overwrite")
    _check_config(run, config, "was checkpointed")
  else:
    run.path.mkdir(parents=True, exist_ok=True)
    run_folder.write_json(run.config_path, config)
  return checkpoint.Checkpointer(run.checkpoint_dir, keep=2)


def first_iteration(history: list[dict], key: str, predicate) -> int | None:
  for record in history:
    if predicate(record[key]):
      return record["iteration"]
  return None


def summary(cfg: UFMConfig, results: dict[str, list[dict]]) -> str:
  """Iterations to NC1 thresholds and 100 % accuracy, and final metrics (median over seeds)."""

  bound = metrics.ce_lower_bound(cfg.classes, cfg.tau)
  lines = [f"UFM (K={cfg.classes}, N={cfg.classes * cfg.samples_per_class}, d={cfg.dim}, "
           f"{cfg.iterations} iterations, {cfg.optimizer} lr={cfg.lr}, tau={cfg.tau}); "
           f"seeds {', '.join(map(str, cfg.seeds))}; medians over seeds. CE lower bound "
           f"{bound:.4f}."]
  head = (["method", "it: top1=100%"] + [f"it: NC1<{t:g}" for t in NC1_THRESHOLDS] +
          ["loss", "NC1", "NC3", "WH-eq", "avg cos margin"])
  rows = []
  for method, runs in results.items():
    def med(values):
      values = [v for v in values if v is not None]
      if len(values) < len(runs):
        return "–" if not values else f"{np.median(values):.0f}*"
      return f"{np.median(values):.0f}"
    row = [method, med([first_iteration(r["history"], "top1", lambda v: v >= 100.0)
                        for r in runs])]
    for t in NC1_THRESHOLDS:
      row.append(med([first_iteration(r["history"], "nc1", lambda v, t=t: v < t) for r in runs]))
    finals = [r["history"][-1] for r in runs]
    for key, fmt in (("loss", ".4f"), ("nc1", ".2e"), ("nc3", ".4f"), ("wh_equinorm", ".4f"),
                     ("avg_cosine_margin", ".4f")):
      row.append(format(float(np.median([f[key] for f in finals])), fmt))
    rows.append(row)
  widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
  fmt_row = lambda r: "  ".join(str(x).rjust(w) for x, w in zip(r, widths))
  lines += [fmt_row(head), fmt_row(["-" * w for w in widths])] + [fmt_row(r) for r in rows]
  lines.append("('–': not reached; '*': median over the seeds that reached it.)")
  return "\n".join(lines)


#: The final metrics tested between methods (lower is better for all but the margin).
TESTED_FINALS = ("loss", "nc1", "nc3", "wh_equinorm", "avg_cosine_margin")


def tested_quantities() -> list[tuple[str, str, Callable[[list[dict]], tuple[float, bool]]]]:
  """``(name, label, value)`` of the quantities tested between methods; ``value(history)``
  gives ``(value, censored)``: iterations to a criterion (censored at the last recorded
  iteration when never reached) or a final metric (never censored)."""
  def reach(key, predicate):
    def value(history):
      it = first_iteration(history, key, predicate)
      return (float(history[-1]["iteration"]), True) if it is None else (float(it), False)
    return value
  out = [("iterations_to_top1_100", "iterations to train top-1 = 100 %",
          reach("top1", lambda v: v >= 100.0))]
  out += [(f"iterations_to_nc1_below_{t:.0e}", f"iterations to NC1 < {t:g}",
           reach("nc1", lambda v, t=t: v < t)) for t in NC1_THRESHOLDS]
  out += [(f"final_{k}", f"final {k}", lambda h, k=k: (float(h[-1][k]), False))
          for k in TESTED_FINALS]
  return out


def comparison_rows(results: dict[str, list[dict]]) -> list[dict]:
  """Tests between methods across seeds, made as the image report makes them
  (:func:`experiments.report.pair_tests`): for each quantity of :func:`tested_quantities` and
  each pair of :func:`experiments.report.comparison_pairs`, the exact two-sided permutation
  test on Gehan scores (censored Mann–Whitney; table ``test_location``) and the
  Brown–Forsythe spread test on the uncensored values (``test_spread``, at least two per
  method), with Holm's correction over the pairs tested on the same quantity.

  Returns:
    rows with the keys of :data:`TESTS_CSV_COLUMNS` (``metric``: the quantity's name;
    ``split``: always ``"train"``, the UFM has no other); ``p`` is ``None`` where a group is
    too small.
  """
  pairs = report.comparison_pairs(results)
  rows = []
  for name, _, value in tested_quantities():
    samples = {}
    for method, runs in results.items():
      got = [value(r["history"]) for r in runs]           # (value, censored) per seed
      samples[method] = ([v for v, _ in got], [c for _, c in got])
    for table, tested in report.pair_tests(samples, pairs).items():
      rows += [dict(table=table, metric=name, split="train", **t) for t in tested]
  return rows


def tests_markdown(rows: list[dict]) -> str:
  """The location and spread tables of :func:`comparison_rows` in Markdown, in the image
  report's format (:func:`experiments.report.tests_table`): a cell is the uncorrected p, the
  direction (``<``: the first method lower, e.g. fewer iterations) and ``*`` if Holm's p <
  0.05, else ``n.s.``, then the seeds of each method that never reached a criterion; the
  first row gives the seeds and the smallest attainable p."""
  quantities = [(name, "train", label) for name, label, _ in tested_quantities()]
  return "\n".join([
      "Location (exact permutation test on Gehan scores, i.e. censored Mann–Whitney; "
      "two-sided):", "", *report.tests_table(rows, "test_location", quantities), "",
      "Spread (Brown–Forsythe, permutation p; the runs that reached a criterion):", "",
      *report.tests_table(rows, "test_spread", quantities)])


#: The columns of ``tests.csv``.
TESTS_CSV_COLUMNS = ("table", "method", "metric", "split", "n") + report.TEST_COLUMNS


def write_tests_csv(path: pathlib.Path, rows: list[dict]) -> None:
  """The rows of :func:`comparison_rows` as CSV (written atomically; ``None``: empty cell)."""
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=TESTS_CSV_COLUMNS)
    writer.writeheader()
    writer.writerows({k: r[k] for k in TESTS_CSV_COLUMNS} for r in rows)
  tmp.replace(path)


def plot(cfg: UFMConfig, results: dict[str, list[dict]], path: pathlib.Path) -> None:
  """Six panels, methods overlaid (median over seeds, min–max band)."""
  import matplotlib  # the [experiments] extra: only needed to plot
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  # (record key, title, y label, scale); None: the per-sample margins at the end.
  panels = [("loss", "CE loss", "cross-entropy (train)", "log"),
            ("avg_cosine_margin", "average cosine margin", "mean cosine margin", "linear"),
            (None, "per-sample cosine margin (end)", "cosine margin", "linear"),
            ("nc1", "NC1", "tr(Σ_W Σ_B⁺)/K", "log"),
            ("nc3", "NC3", "‖W/‖W‖ − M/‖M‖‖²", "log"),
            ("wh_equinorm", "WH-equinorm", "std/mean of ‖w_k‖, ‖μ_k‖", "log")]
  fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
  for ax, (key, title, ylabel, scale) in zip(axes.flat, panels):
    for method, runs in results.items():
      c = METHOD_VARIANTS[method].colour
      if key is None:
        curves = np.stack([np.sort(r["margins"]) for r in runs])
        # Rank over 0..1 (as the image report's margin figure): raw ranks up to 10⁵ crowd the
        # axis, and the fraction of samples below a margin is what one reads off.
        x = np.linspace(0.0, 1.0, curves.shape[1])
        xlabel = "normalised sample rank"
      else:
        x = np.array([rec["iteration"] for rec in runs[0]["history"]])
        curves = np.stack([[rec[key] for rec in r["history"]] for r in runs])
        xlabel = "iteration"
      ax.plot(x, np.median(curves, 0), color=c, label=method)
      if len(runs) > 1:
        ax.fill_between(x, curves.min(0), curves.max(0), color=c, alpha=0.2)
    if key == "loss":
      ax.axhline(metrics.ce_lower_bound(cfg.classes, cfg.tau), color="k", ls="--", lw=1,
                 label="CE lower bound")
    ax.set_yscale(scale)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  axes.flat[0].legend()
  n = sorted({len(runs) for runs in results.values()})
  fig.suptitle(f"UFM-{cfg.classes}: N={cfg.classes * cfg.samples_per_class}, d={cfg.dim}, "
               f"{cfg.optimizer} lr={cfg.lr}, tau={cfg.tau}, seeds {list(cfg.seeds)}")
  fig.text(0.5, 0.005, ("one seed per method" if n == [1] else
                        f"lines: median over {'/'.join(map(str, n))} seeds; bands: min–max"),
           ha="center", fontsize=9)
  fig.tight_layout(rect=(0, 0.02, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict]]:
  cfg = config_from_args(argv)
  command = " ".join(["python -m experiments.ufm"]
                     + list(sys.argv[1:] if argv is None else argv))
  os.makedirs(cfg.out, exist_ok=True)
  results: dict[str, list[dict]] = {}
  for method in cfg.methods:
    for seed in cfg.seeds:
      run = run_folder.RunFolder(run_dir(cfg, method, seed))
      config = run_config(cfg, method, seed)
      with run.lock():  # one writer per run folder (run_folder.RunLocked otherwise)
        result = None if cfg.overwrite else load_finished(run, config)
        if result is not None:
          if not cfg.quiet:
            print(f"{method} seed {seed}: finished earlier, reused ({run.path})", flush=True)
        else:
          if not cfg.quiet:
            print(f"{method} seed {seed}:", flush=True)
          ckpt = prepare_unfinished(run, config, cfg.overwrite)
          try:
            result = run_one(
                cfg, method, seed, log=lambda s: print(s, flush=True), checkpointer=ckpt,
                on_start=lambda it, run=run: run.append_environment({"iteration": it},
                                                                    command))
          finally:
            ckpt.close()
          save_run(run, config, result)
          shutil.rmtree(run.checkpoint_dir, ignore_errors=True)  # finished: records suffice
      results.setdefault(method, []).append(result)
  text = summary(cfg, results)
  if len(results) > 1 and any(len(runs) > 1 for runs in results.values()):
    rows = comparison_rows(results)
    text += "\n\nTests between methods across seeds:\n\n" + tests_markdown(rows)
    write_tests_csv(pathlib.Path(cfg.out) / "tests.csv", rows)
  print(text)
  (pathlib.Path(cfg.out) / "summary.md").write_text(text + "\n")
  if cfg.plot:
    path = pathlib.Path(cfg.out) / "ufm.png"
    plot(cfg, results, path)
    print(f"figure: {path}")
  print(f"records: {cfg.out}/<method>/seed-<n>/metrics.jsonl")
  return results


def cli(argv: Sequence[str] | None = None, *, program: bool = False) -> None:
  """``python -m experiments.ufm`` (which passes ``program=True``): an interrupted run or a
  bad folder is a message, not a traceback, and the last line of stderr
  (:func:`experiments.cli.exit_with_message`); exit status 130 after SIGINT/SIGTERM, 2
  otherwise."""
  try:
    main(argv)
  except Interrupted as err:
    exit_with_message(str(err), 130, program=program)
  except (ValueError, train.TrainingFault, OSError) as err:
    exit_with_message(f"error: {err}", 2, program=program)


if __name__ == "__main__":
  cli(sys.argv[1:], program=True)
