r"""Benchmark of the streaming training path: images/s of ``StreamingPipeline.train_batches``.

Run from the repository root::

    python -m benchmarks.streaming                        # full run, Markdown to stdout
    python -m benchmarks.streaming --quick                # a smoke run (seconds)
    python -m benchmarks.streaming --json after.json --baseline before.json   # with ratios

What is timed is what :func:`nc_jax.loop.fit` consumes from a streamed dataset: whole epochs of
:meth:`nc_jax.pipeline.StreamingPipeline.train_batches` (the epoch plan, host reads,
per-example augmentation seeded by ``(seed, epoch, index)``, normalisation to float32, each
batch put on the default device and blocked on with ``jax.block_until_ready``); no model runs.
Two cases, each held in memory as a random-access source (``len(src)``, ``src[i] ->
{"image", "label"}``):

* **cifar** — 32×32×3 uint8 random images (``--cifar-examples``, default 50,000: CIFAR-10's
  training set, one epoch = 195 batches of 256), K = 10, the ``cifar10`` ``train_spec``
  (4-pixel zero padding + random 32 crop, random flip), batch ``--cifar-batch`` (256).
* **imagenet** — varying-size uint8 images, as decoded JPEGs are (a pool of
  ``--imagenet-pool`` distinct images, 256–384 pixels a side; example ``i`` is image
  ``i mod pool``, so a few hundred batches need little memory), K = 1000, the
  ``imagenet2012`` ``train_spec`` (Resize(256) of the shorter side, 4-pixel padding + random
  224 crop, random flip: the paper's recipe, docs/method.md §10.3; 224×224×3 float32 out),
  batch ``--imagenet-batch`` (64), ``--imagenet-batches`` batches (200).

``--configs`` lists the host configurations: ``T`` (``num_threads=T``, no worker process) or
``TxW`` (``W`` worker processes with ``T`` threads each; a pipeline without worker processes,
e.g. the code before Grain, skips these rows). ``default`` is the pipeline's own default
thread count, what the image runner uses. Every configuration runs ``--repeats`` epochs
(default 3), interleaved with the others round by round (the first configuration rotating), so
slow drifts of a shared machine hit all alike. "images/s" is the median over the epochs of
examples / wall time of the whole epoch (from asking for the epoch to the last batch, start-up
included, as training sees it); "first batch s" is the median wait for the first batch (plan,
threads or processes started, first batch built). ``--baseline`` takes the JSON of an earlier
run (e.g. of the code before a change, run with this script) and adds "× baseline": this
run's images/s over the baseline's for the same case, batch and configuration (a configuration
the baseline lacks, e.g. worker processes, is compared with the baseline's default one).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from nc_jax.data import registry, streaming  # noqa: E402
from nc_jax.pipeline import StreamingPipeline  # noqa: E402

CASES = ("cifar", "imagenet")


class PoolSource:
  """A random-access source of ``len(labels)`` examples over a pool of images: example
  ``i`` is ``{"image": pool[i % len(pool)], "label": labels[i]}`` (picklable, for worker
  processes)."""

  def __init__(self, pool: Sequence[np.ndarray], labels: np.ndarray):
    self.pool, self.labels = list(pool), np.asarray(labels)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    return {"image": self.pool[i % len(self.pool)], "label": self.labels[i]}

  def __getitems__(self, ids: Sequence[int]) -> list[dict]:
    return [self[i] for i in ids]


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  dataset: str
  batch: int
  source: Any
  label: str

  @property
  def info(self):
    return registry.get_dataset_info(self.dataset)


def make_case(name: str, args, rng: np.random.Generator) -> Case:
  if name == "cifar":
    n = args.cifar_examples
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    source = PoolSource(images, np.arange(n) % 10)
    return Case(name, "cifar10", args.cifar_batch, source,
                f"32×32×3, {n:,} examples, cifar10 train_spec")
  n = args.imagenet_batches * args.imagenet_batch
  sizes = rng.integers(256, 385, (args.imagenet_pool, 2))
  pool = [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8) for h, w in sizes]
  return Case(name, "imagenet2012", args.imagenet_batch, PoolSource(pool, np.arange(n) % 1000),
              f"256–384 px a side (pool of {args.imagenet_pool}), {n:,} examples, "
              f"imagenet2012 train_spec → 224×224×3")


def _fields() -> set[str]:
  return {f.name for f in dataclasses.fields(StreamingPipeline)}


def default_threads() -> int:
  """The pipeline's own default host thread count on this machine (what the image runner
  uses): the field's default, or, when that is ``None``,
  :func:`nc_jax.data.streaming.default_num_threads`."""
  default = next(f.default for f in dataclasses.fields(StreamingPipeline)
                 if f.name == "num_threads")
  return streaming.default_num_threads() if default is None else default


def make_pipeline(case: Case, threads: int, workers: int, seed: int):
  info = case.info
  kwargs = dict(train_spec=info.train_spec, eval_spec=info.eval_spec, batch_size=case.batch,
                num_classes=info.num_classes, seed=seed, num_threads=threads)
  if workers:
    kwargs["num_workers"] = workers
  return StreamingPipeline(case.source, None, **kwargs)


def time_epoch(pipeline, epoch: int) -> dict[str, float]:
  """One epoch of training batches, each blocked on."""
  t0 = time.perf_counter()
  rows = pipeline.train_batches(None, epoch)
  first = None
  count = 0
  try:
    for args in rows:
      jax.block_until_ready(args)
      count += 1
      if first is None:
        first = time.perf_counter()
  finally:
    if hasattr(rows, "close"):
      rows.close()
  end = time.perf_counter()
  if count < 2:
    raise ValueError(f"an epoch of {count} batch(es): need at least 2")
  return {"first_batch_s": first - t0, "steady_s": end - first, "batches": count}


def epoch_rate(epoch: dict, batch: int) -> float:
  """Examples / wall time of a whole epoch (start-up included)."""
  return epoch["batches"] * batch / (epoch["first_batch_s"] + epoch["steady_s"])


@dataclasses.dataclass
class Row:
  case: str
  batch: int
  threads: int
  workers: int
  epochs: list[dict] = dataclasses.field(default_factory=list)
  skipped: str | None = None
  ratio_to_baseline: float | None = None

  @property
  def key(self) -> tuple:
    return (self.case, self.batch, self.threads, self.workers)

  @property
  def images_per_s(self) -> float | None:
    if not self.epochs:
      return None
    return statistics.median(epoch_rate(e, self.batch) for e in self.epochs)

  @property
  def first_batch_s(self) -> float | None:
    return statistics.median(e["first_batch_s"] for e in self.epochs) if self.epochs else None

  def as_json(self) -> dict[str, Any]:
    return {"case": self.case, "batch": self.batch, "threads": self.threads,
            "workers": self.workers, "skipped": self.skipped, "epochs": self.epochs,
            "images_per_s": self.images_per_s, "first_batch_s": self.first_batch_s,
            "ratio_to_baseline": self.ratio_to_baseline}


def run(cases: Sequence[Case], configs: Sequence[tuple[int, int]], repeats: int,
        seed: int) -> list[Row]:
  has_workers = "num_workers" in _fields()
  rows, live = [], []
  for case in cases:
    for t, w in configs:
      row = Row(case.name, case.batch, t, w)
      if w and not has_workers:
        row.skipped = "this StreamingPipeline has no worker processes"
      else:
        live.append((row, make_pipeline(case, t, w, seed)))
      rows.append(row)
  for r in range(repeats):
    for j in range(len(live)):
      row, pipeline = live[(r + j) % len(live)]
      row.epochs.append(time_epoch(pipeline, r))
  return rows


def apply_baseline(rows: list[Row], baseline: dict) -> None:
  """Sets each row's ratio to the baseline's row of the same case, batch and configuration
  (images/s recomputed from the baseline's epochs, the same way), else to the baseline's row
  with its pipeline's default threads (what the image runner used)."""
  base = {}
  for b in baseline["rows"]:
    if b.get("epochs"):
      base[(b["case"], b["batch"], b["threads"], b["workers"])] = statistics.median(
          epoch_rate(e, b["batch"]) for e in b["epochs"])
  default = baseline["settings"].get("default_threads")
  for row in rows:
    ref = base.get(row.key) or base.get((row.case, row.batch, default, 0))
    if ref and row.images_per_s:
      row.ratio_to_baseline = row.images_per_s / ref


def report(env, settings, cases, rows) -> str:
  lines = ["# Streaming training path: images/s", ""]
  lines += common.environment_lines(env)
  lines.append(f"- nc_jax streaming: {settings['implementation']}, default "
               f"{settings['default_threads']} threads; {settings['repeats']} epochs per row "
               f"(medians), interleaved; images/s over whole epochs, start-up included")
  for case in cases:
    lines.append(f"- {case.name}: {case.label}, batch {case.batch}")
  if settings.get("baseline"):
    lines.append(f"- baseline: {settings['baseline']}")
  lines.append("")
  headers = ["case", "batch", "threads", "workers", "images/s", "first batch s", "× baseline"]
  table = []
  for row in rows:
    if row.skipped:
      table.append([row.case, row.batch, row.threads, row.workers, "skipped", row.skipped, "–"])
      continue
    table.append([row.case, row.batch, row.threads, row.workers,
                  common.fmt_num(row.images_per_s), f"{row.first_batch_s:.2f}",
                  "–" if row.ratio_to_baseline is None else f"{row.ratio_to_baseline:.2f}"])
  lines.append(common.markdown_table(headers, table, right_align_from=1))
  return "\n".join(lines) + "\n"


def _configs(text: str) -> tuple[tuple[int, int] | str, ...]:
  """``T`` or ``TxW`` items (or ``default``), comma-separated."""
  out = []
  for item in (v.strip() for v in text.split(",") if v.strip()):
    if item == "default":
      out.append(item)
      continue
    t, _, w = item.partition("x")
    try:
      t, w = int(t), int(w or 0)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected T or TxW (threads x workers), got {item!r}"
                                       ) from None
    if t < 0 or w < 0:
      raise argparse.ArgumentTypeError(f"expected non-negative counts, got {item!r}")
    out.append((t, w))
  if not out:
    raise argparse.ArgumentTypeError("expected at least one configuration")
  return tuple(out)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.streaming",
      description="Images/s of the streaming training path on this host (see the docstring).")
  parser.add_argument("--cases", type=common.comma_choices(CASES, "case"), default=CASES)
  parser.add_argument("--cifar-examples", type=int, default=None)
  parser.add_argument("--cifar-batch", type=int, default=None)
  parser.add_argument("--imagenet-batch", type=int, default=None)
  parser.add_argument("--imagenet-batches", type=int, default=None)
  parser.add_argument("--imagenet-pool", type=int, default=None)
  parser.add_argument("--configs", type=_configs, default=None,
                      help="T (threads) or TxW (W worker processes, T threads each), "
                           "comma-separated; 'default' = the pipeline's default threads "
                           "(default: default,4,2,1x2,2x2; --quick: default)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="epochs per row (default 3; --quick: 1)")
  parser.add_argument("--baseline", metavar="JSON", default=None,
                      help="an earlier run's --json, for the × baseline column")
  parser.add_argument("--json", metavar="PATH", default=None)
  parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
  parser.add_argument("--seed", type=int, default=0)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  quick = args.quick
  defaults = dict(cifar_examples=(1024, 50_000), cifar_batch=(64, 256), imagenet_batch=(16, 64),
                  imagenet_batches=(4, 200), imagenet_pool=(8, 256), repeats=(1, 3))
  for name, (q, full) in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, q if quick else full)
  configs = args.configs or (("default",) if quick else
                             ("default", (4, 0), (2, 0), (1, 2), (2, 2)))
  configs = [(default_threads(), 0) if c == "default" else c for c in configs]
  configs = list(dict.fromkeys(configs))  # 'default' may repeat another item
  if args.repeats < 1:
    raise SystemExit("--repeats: expected at least 1")
  rng = np.random.default_rng(args.seed)
  cases = [make_case(name, args, rng) for name in args.cases]
  env = common.environment()
  settings = {"quick": quick, "cases": list(args.cases), "configs": [list(c) for c in configs],
              "repeats": args.repeats, "seed": args.seed, "default_threads": default_threads(),
              "implementation": StreamingPipeline.__module__ + ".StreamingPipeline (" + (
                  "Grain" if "num_workers" in _fields() else "StreamingLoader") + ")",
              "baseline": args.baseline,
              **{name: getattr(args, name) for name in defaults}}
  rows = run(cases, configs, args.repeats, args.seed)
  if args.baseline:
    with open(args.baseline, encoding="utf-8") as f:
      apply_baseline(rows, json.load(f))
  print(report(env, settings, cases, rows), end="")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"environment": env, "settings": settings,
                 "rows": [r.as_json() for r in rows]}, f, indent=2)
      f.write("\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
