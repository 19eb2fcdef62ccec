"""The image-classification experiments of the paper: one runner, one preset per dataset.

``python -m experiments.<name>`` for ``mnist``, ``fashion_mnist``, ``cifar10``,
``cifar100``, ``stl10`` and ``imagenet`` each call :func:`main` with their preset.
A preset is the paper's recipe (:class:`nc_jax.config.TrainConfig` defaults:
ResNet18 with the ImageNet stem, BatchNorm without affine parameters, τ = 5,
AGD with gain 10, batch 256, 200 epochs, stratified batches for the implicit
method) plus the dataset; **every** ``TrainConfig`` field is a flag
(``--model vgg13 --optimizer sgd --lr 0.05 --epochs 20 ...``), and an unknown
flag or value is an error listing the valid ones.

One invocation runs ``--methods`` × ``--seeds`` in turn (``--method`` and
``--seed`` for one). Each run lives in ``<out>/<experiment>/<method>/seed-<n>/``:

* ``config.json`` — the full :class:`~nc_jax.config.TrainConfig`, the run
  options, versions and machine;
* ``metrics.jsonl`` — one record per epoch: ``epoch``, ``step``, ``seconds``
  (training time of the epoch), ``elapsed`` (wall time since the run began,
  evaluation included), ``train_{loss,top1,top5}`` (running means over the
  epoch's augmented batches), ``test_{loss,top1,top5}`` every ``--eval-every``
  epochs, and every ``--nc-every`` epochs (1, 1+n, 1+2n, …, as the official
  code, and the last) the neural-collapse metrics of
  :func:`nc_jax.metrics.nc_metrics` on the un-augmented train and test splits as
  ``nc_train_<key>`` / ``nc_test_<key>`` (and ``nc_seconds``, the time they took);
* ``margins.npy`` — the sorted per-sample train cosine margins at the end;
* ``checkpoints/`` (Orbax; every ``--checkpoint-every`` epochs, at the end and
  on SIGINT/SIGTERM), ``tb/`` (TensorBoard scalars, when installed),
  ``metrics.png`` and ``margins.png``, and ``done.json`` once finished.

Finished runs are skipped, so a sweep can be re-run after an interruption; a
run with a checkpoint continues only with ``--resume`` (bitwise the
uninterrupted run on CPU), and ``--overwrite`` starts it again.
``python -m experiments.report <out>/<experiment>`` aggregates the seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
import pathlib
import platform
import shutil
import sys
import time
import types
import typing
from typing import Any, Callable, Sequence

from experiments import run_folder
from experiments.cli import METHODS, parse_methods, parse_seeds
from nc_jax import config as config_lib
from nc_jax import solver as solver_lib

# Per experiment: TrainConfig overrides of the paper recipe, and how often the NC metrics run.
PRESETS = types.MappingProxyType({
    "mnist": dict(dataset="mnist"),
    "fashion_mnist": dict(dataset="fashion_mnist"),
    "cifar10": dict(dataset="cifar10"),
    "cifar100": dict(dataset="cifar100"),
    "stl10": dict(dataset="stl10"),
    # K = 1000 needs d >= K for the ETF heads: ResNet50 (d = 2048), not ResNet18 (512).
    "imagenet": dict(dataset="imagenet2012", model="resnet50"),
})

# Flag choices for TrainConfig fields with a closed set of values.
_CHOICES = {
    "source": None, "model": None, "stem": ("imagenet", "cifar"),
    "compute_dtype": tuple(config_lib.COMPUTE_DTYPES), "loss": None, "optimizer": None,
    "schedule": None, "solver": solver_lib.METHODS, "factorisation": solver_lib.FACTORISATION_CHOICES,
}
# TrainConfig fields that are not flags: the preset fixes the dataset; method and seed come
# from --method(s)/--seed(s) (the forward-only ablation is the method "implicit-fo").
_NOT_FLAGS = ("dataset", "method", "seed", "forward_only")
_ALIASES = {"learning_rate": ("--lr",)}
_HELP = {
    "source": "tfds (prepared tensorflow-datasets), idx (MNIST-format files in --data-path), "
              "npz (--data-path file) or synthetic (random images, for smoke tests)",
    "data_path": "folder of IDX files (source idx) or .npz file (source npz)",
    "data_dir": "tfds data_dir (default: tfds's)",
    "num_examples": "examples per split for source synthetic",
    "stratified": "stratified batches (default: on for the implicit method)",
    "learning_rate": "not used by AGD (the paper's optimiser)",
    "gain": "AGD gain (default 10, the paper's)",
    "augment": "the dataset's training augmentation (--no-augment: normalisation only)",
    "width": "ResNet stem/first-stage channels (paper: 64; narrower nets for CPU runs)",
}


def _choices() -> dict[str, tuple[str, ...] | None]:
  from nc_jax import heads, models, optim
  from nc_jax.data.sources import SOURCES
  filled = dict(_CHOICES)
  filled.update(source=tuple(SOURCES), model=tuple(models.MODEL_NAMES), loss=tuple(heads.LOSSES),
                optimizer=tuple(optim.OPTIMIZERS), schedule=tuple(optim.SCHEDULES))
  return filled


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


class _Parser(argparse.ArgumentParser):
  """argparse that names the valid flags (and the closest one) for an unknown flag."""

  def error(self, message: str):
    if message.startswith("unrecognized arguments"):
      flags = sorted({s for a in self._actions for s in a.option_strings if s.startswith("--")})
      given = [w.split("=")[0] for w in message.split(":", 1)[1].split() if w.startswith("-")]
      hints = [f"{g} (did you mean {', '.join(difflib.get_close_matches(g, flags, 2))}?)"
               for g in given if difflib.get_close_matches(g, flags, 1)]
      message += ("\n" + "\n".join(hints) if hints else "") + (
          f"\nvalid flags: {' '.join(flags)}")
    super().error(message)


def _parse_bool_or_none(text: str) -> bool | None:
  return {"true": True, "false": False, "auto": None, "none": None}[text.lower()]


def _field_types() -> dict[str, str]:
  hints = typing.get_type_hints(config_lib.TrainConfig)
  out = {}
  for name, hint in hints.items():
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    out[name] = args[0].__name__
  return out


def build_parser(experiment: str) -> argparse.ArgumentParser:
  """The experiment's parser: run options, then one flag per TrainConfig field."""
  if experiment not in PRESETS:
    raise ValueError(f"experiment: expected one of {', '.join(PRESETS)}, got {experiment!r}")
  p = _Parser(prog=f"python -m experiments.{experiment}", allow_abbrev=False,
              description=f"{experiment}: the paper's image-classification recipe "
                          "(see experiments/image.py).")
  run = p.add_argument_group("runs")
  which = run.add_mutually_exclusive_group()
  which.add_argument("--methods", default="standard,fixed,implicit",
                     help=f"comma list of {', '.join(METHODS)} (default: the paper's three)")
  which.add_argument("--method", choices=METHODS, help="a single method")
  seeds = run.add_mutually_exclusive_group()
  seeds.add_argument("--seeds", default="1", help="N, A-B or a comma list (paper: 1-5)")
  seeds.add_argument("--seed", type=int, help="a single seed")
  run.add_argument("--out", default="runs", help="runs go to <out>/<experiment>/<method>/seed-<n>")
  run.add_argument("--devices", default="all",
                   help="'all' (data-parallel over every device), N (the first N) or a comma "
                        "list of device indices")
  run.add_argument("--eval-every", type=int, default=1, help="test accuracy every N epochs")
  run.add_argument("--nc-every", type=int, default=5,
                   help="NC metrics on train and test at epochs 1, 1+N, ... and the last "
                        "(official: 5)")
  run.add_argument("--nc-examples", type=int, default=None,
                   help="at most this many (class-balanced) train examples for the NC metrics "
                        "(default: all; ImageNet: 50000)")
  run.add_argument("--train-examples", type=int, default=None,
                   help="train on a class-balanced subset of this size (reduced runs)")
  run.add_argument("--test-examples", type=int, default=None,
                   help="evaluate on a class-balanced subset of this size")
  run.add_argument("--checkpoint-every", type=int, default=10, help="epochs between checkpoints")
  run.add_argument("--keep", type=int, default=2, help="checkpoints kept per run")
  state = run.add_mutually_exclusive_group()
  state.add_argument("--resume", action="store_true",
                     help="continue runs that have a checkpoint (finished runs are always "
                          "skipped)")
  state.add_argument("--overwrite", action="store_true",
                     help="delete existing run folders and start again")
  run.add_argument("--max-steps", type=int, default=None,
                   help="stop each run after this many steps (checkpointed; continue with "
                        "--resume)")
  run.add_argument("--tensorboard", type=_parse_bool_or_none, default=None,
                   metavar="{auto,true,false}",
                   help="TensorBoard scalars in <run>/tb (auto: when tensorboard is installed)")
  run.add_argument("--no-plot", action="store_true", help="no per-run figures")
  run.add_argument("--distributed", action="store_true",
                   help="several hosts: call jax.distributed.initialize() first (coordinator "
                        "and process ids from the environment, e.g. SLURM or JAX_* variables)")
  run.add_argument("--quiet", action="store_true", help="no progress bars, a line per run")

  cfg = p.add_argument_group("training configuration (TrainConfig; default: the paper's recipe)")
  choices, types_ = _choices(), _field_types()
  defaults = dataclasses.replace(config_lib.TrainConfig(), **PRESETS[experiment])
  for field in dataclasses.fields(config_lib.TrainConfig):
    name = field.name
    if name in _NOT_FLAGS:
      continue
    flags = (f"--{name.replace('_', '-')}",) + _ALIASES.get(name, ())
    default = getattr(defaults, name)
    kw: dict[str, Any] = {"dest": name, "default": default,
                          "help": _HELP.get(name, "") + f" (default: {default})"}
    kind = types_[name]
    if kind == "bool":
      kw["action"] = argparse.BooleanOptionalAction
    else:
      kw["type"] = {"int": int, "float": float, "str": str}[kind]
      if choices.get(name):
        kw["choices"] = choices[name]
    cfg.add_argument(*flags, **kw)
  return p


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """How the runs are carried out (not part of what a run computes)."""
  experiment: str
  methods: tuple[str, ...]
  seeds: tuple[int, ...]
  out: str = "runs"
  devices: str = "all"
  eval_every: int = 1
  nc_every: int = 5
  nc_examples: int | None = None
  train_examples: int | None = None
  test_examples: int | None = None
  checkpoint_every: int = 10
  keep: int = 2
  resume: bool = False
  overwrite: bool = False
  max_steps: int | None = None
  tensorboard: bool | None = None
  plot: bool = True
  quiet: bool = False

  def run_dir(self, method: str, seed: int) -> pathlib.Path:
    return pathlib.Path(self.out) / self.experiment / method / f"seed-{seed}"


def parse_args(experiment: str, argv: Sequence[str] | None = None
               ) -> tuple[RunOptions, config_lib.TrainConfig]:
  """``(options, base config)``; the base config's method and seed are set per run.

  Every run's configuration is validated here, before anything is loaded or compiled.
  """
  parser = build_parser(experiment)
  args = parser.parse_args(argv)
  try:
    methods = (args.method,) if args.method else parse_methods(args.methods)
    seeds = (args.seed,) if args.seed is not None else parse_seeds(args.seeds)
  except ValueError as err:
    parser.error(str(err))
  for name in ("eval_every", "nc_every", "checkpoint_every", "keep", "nc_examples",
               "train_examples", "test_examples", "max_steps"):
    value = getattr(args, name)
    if value is not None and value < 1:
      parser.error(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")
  fields = {f.name for f in dataclasses.fields(config_lib.TrainConfig)} - set(_NOT_FLAGS)
  # The parser's defaults are the preset's, so the flags carry every field but the dataset.
  base = dataclasses.replace(config_lib.TrainConfig(), **{
      **PRESETS[experiment], **{name: getattr(args, name) for name in fields}})
  try:
    for method in methods:
      config_for(base, method, seeds[0]).validate()
    n_devices = len(select_devices(args.devices))
    if base.batch_size % n_devices:
      raise ValueError(f"--batch-size: expected a multiple of the number of devices "
                       f"({n_devices}, --devices {args.devices}) for data parallelism, got "
                       f"{base.batch_size}")
  except ValueError as err:
    parser.error(str(err))
  options = RunOptions(
      experiment=experiment, methods=methods, seeds=seeds, out=args.out, devices=args.devices,
      eval_every=args.eval_every, nc_every=args.nc_every, nc_examples=args.nc_examples,
      train_examples=args.train_examples, test_examples=args.test_examples,
      checkpoint_every=args.checkpoint_every, keep=args.keep, resume=args.resume,
      overwrite=args.overwrite, max_steps=args.max_steps, tensorboard=args.tensorboard,
      plot=not args.no_plot, quiet=args.quiet)
  return options, base


def config_for(base: config_lib.TrainConfig, method: str, seed: int) -> config_lib.TrainConfig:
  """The run's TrainConfig: ``implicit-fo`` is the implicit head with ``forward_only``."""
  kind = "implicit" if method == "implicit-fo" else method
  return dataclasses.replace(base, method=kind, forward_only=method == "implicit-fo", seed=seed)


def select_devices(text: str) -> list:
  """The devices ``--devices`` names: ``all`` (every process's), a count ``N`` (the first N)
  or a comma list of indices.

  Raises:
    ValueError: naming ``--devices``, for anything else or more devices than exist.
  """
  import jax
  devices = jax.devices()
  if text == "all":
    return devices
  try:
    values = [int(x) for x in text.split(",")]
  except ValueError:
    values = []
  if not values or min(values) < (1 if len(values) == 1 else 0):
    raise ValueError(f"--devices: expected 'all', a count N >= 1 or a comma list of device "
                     f"indices, got {text!r}")
  if len(values) == 1:
    if values[0] > len(devices):
      raise ValueError(f"--devices: asked for {values[0]} devices, only {len(devices)} exist")
    return devices[:values[0]]
  if max(values) >= len(devices) or len(set(values)) != len(values):
    raise ValueError(f"--devices: indices must be distinct and < {len(devices)}, got {text!r}")
  return [devices[i] for i in values]


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #


def balanced_subset(labels, size: int | None, num_classes: int, seed: int = 0):
  """Indices (sorted) of a class-balanced random subset of ``size`` examples, or ``None``
  for all. Classes get ``size // K`` each (the remainder goes to the first classes), at most
  what a class has."""
  import numpy as np
  labels = np.asarray(labels)
  if size is None or size >= labels.shape[0]:
    return None
  rng = np.random.default_rng(seed)
  per, extra = divmod(size, num_classes)
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    take = min(members.size, per + (c < extra))
    chosen.append(rng.choice(members, take, replace=False))
  return np.sort(np.concatenate(chosen))


@dataclasses.dataclass
class Data:
  """The loaded splits of a sweep (shared by its runs)."""
  info: Any
  stream: bool
  train: Any            # (images, labels) host arrays, or a random-access source
  test: Any
  train_labels: Any     # (N,) host labels; streaming: None unless stratified or subset
  test_labels: Any
  on_device: Any = None  # device pipeline: ((images, labels) train, test) replicated on the mesh

  @property
  def num_train(self) -> int:
    return len(self.train) if self.stream else int(self.train_labels.shape[0])

  @property
  def num_test(self) -> int:
    return len(self.test) if self.stream else int(self.test_labels.shape[0])


class _Subset:
  """A random-access source restricted to ``ids``."""

  def __init__(self, source, ids):
    self.source, self.ids = source, [int(i) for i in ids]

  def __len__(self):
    return len(self.ids)

  def __getitem__(self, i):
    return self.source[self.ids[int(i)]]

  def __getitems__(self, ids):
    from nc_jax.data.sources import fetch
    return fetch(self.source, [self.ids[int(i)] for i in ids])


def _source_labels(source):
  import numpy as np
  from nc_jax.data.sources import fetch
  labels = []
  for start in range(0, len(source), 4096):
    labels += [int(r["label"]) for r in fetch(source, range(start, min(start + 4096,
                                                                        len(source))))]
  return np.asarray(labels, np.int32)


def load_data(cfg: config_lib.TrainConfig, options: RunOptions) -> Data:
  """Both splits, subset as the options ask (subsets are fixed: seed 0, the same for every
  run of a sweep, so seeds differ only in what they should)."""
  import numpy as np

  from nc_jax.data import sources
  info = cfg.info
  k = info.num_classes
  if info.pipeline == "stream":
    if cfg.source != "tfds":
      raise ValueError(f"source: {info.name} streams from tfds (images vary in size); got "
                       f"{cfg.source!r}")
    splits = []
    for split, size in (("train", options.train_examples), ("test", options.test_examples)):
      src = sources.tfds_source(info.name, split, cfg.data_dir)
      labels = None
      # Labels are only read (a pass over the records) when a subset or stratification needs
      # them.
      if size is not None or (split == "train" and cfg.use_stratified):
        labels = _source_labels(src)
        ids = balanced_subset(labels, size, k)
        if ids is not None:
          src, labels = _Subset(src, ids), labels[ids]
      splits.append((src, labels))
    (tr, tr_y), (te, te_y) = splits
    return Data(info, True, tr, te, tr_y, te_y)
  out = []
  for split, size in (("train", options.train_examples), ("test", options.test_examples)):
    images, labels, _ = sources.load_split(
        info, split, source=cfg.source, path=cfg.data_path, data_dir=cfg.data_dir,
        num_examples=cfg.num_examples, seed=0)
    ids = balanced_subset(labels, size, k)
    if ids is not None:
      images, labels = images[ids], labels[ids]
    out.append((np.ascontiguousarray(images), np.asarray(labels, np.int32)))
  return Data(info, False, out[0], out[1], out[0][1], out[1][1])


# --------------------------------------------------------------------------- #
# One run
# --------------------------------------------------------------------------- #


def _versions() -> dict[str, str]:
  import importlib.metadata as md
  out = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  return out


def machine_description() -> str:
  import jax
  devs = jax.devices()
  kinds = sorted({d.device_kind for d in devs})
  return (f"{len(devs)}× {'/'.join(kinds)} ({jax.default_backend()}), "
          f"{jax.process_count()} process(es), host {platform.machine()} "
          f"{os.cpu_count()} CPUs")


class _Progress:
  """tqdm bar over a run's steps (rate, ETA, last epoch's loss and accuracy); plain lines
  when tqdm is missing or output is quiet."""

  def __init__(self, title: str, total: int, done: int, quiet: bool):
    self.title, self.quiet, self.bar = title, quiet, None
    if quiet:
      return
    try:
      from tqdm.auto import tqdm
    except ImportError:
      print(f"{title}: {done}/{total} steps", flush=True)
      return
    self.bar = tqdm(total=total, initial=done, desc=title, unit="step", dynamic_ncols=True,
                    mininterval=1.0, file=sys.stdout)

  def step(self):
    if self.bar is not None:
      self.bar.update(1)

  def epoch(self, record: dict, epochs: int):
    fields = {"epoch": f"{record['epoch']}/{epochs}", "loss": f"{record['train_loss']:.4f}",
              "top1": f"{record['train_top1']:.2f}"}
    if "test_top1" in record:
      fields["test"] = f"{record['test_top1']:.2f}"
    if "nc_train_nc1" in record:
      fields["NC1"] = f"{record['nc_train_nc1']:.2e}"
    if self.bar is not None:
      self.bar.set_postfix(fields, refresh=False)
    elif not self.quiet:
      print(f"{self.title} " + " ".join(f"{k} {v}" for k, v in fields.items()), flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()


@dataclasses.dataclass
class _Compiled:
  """What runs of a sweep that differ only in the seed share (so the sweep compiles once)."""
  model: Any
  tx: Any
  head_config: Any
  steps: tuple
  features: Callable
  sample_input: Any


def _compile(cfg: config_lib.TrainConfig, data: Data, mesh, steps_per_epoch: int) -> _Compiled:
  import jax
  import jax.numpy as jnp

  from nc_jax import loop, train
  from nc_jax.data import batching
  info = data.info
  model = cfg.backbone()
  head_config = cfg.head_config(info.num_classes, model.feature_dim)
  tx = cfg.optimizer_transform(steps_per_epoch)
  static = dict(model=model, head_config=head_config, loss=cfg.loss)
  rep, sharded = train.replicated(mesh), train.batch_sharding(mesh)
  feat = functools.partial(train.features, model=model, head_config=head_config)
  if data.stream:
    steps = (train.compile_train_step(mesh, tx=tx, **static), train.compile_eval_step(mesh, **static))
    features = jax.jit(lambda state, x: feat(state, x), in_shardings=(rep, sharded),
                       out_shardings=rep)
  else:
    steps = loop.compile_data_steps(mesh, cfg.data_spec(True), cfg.data_spec(False), tx=tx,
                                    **static)
    eval_spec = info.spec(False)

    def device_features(state, images, labels, idx):
      x, y = batching.make_batch(images, labels, idx, None, eval_spec, False)
      return feat(state, x), y
    features = jax.jit(device_features, in_shardings=(rep, rep, rep, sharded),
                       out_shardings=(rep, rep))
  sample = jnp.zeros((2,) + info.input_shape, config_lib.COMPUTE_DTYPES[cfg.compute_dtype])
  return _Compiled(model, tx, head_config, steps, features, sample)


def _feature_batches(compiled: _Compiled, state, split_data, labels, ids, batch_size, mesh,
                     data: Data):
  """Host ``(features, labels)`` of the examples ``ids`` (all if None), eval mode."""
  import jax.numpy as jnp
  import numpy as np

  from nc_jax import loop, train
  from nc_jax.data import batching
  from nc_jax.data.streaming import StreamingLoader
  # Batches are dispatched without waiting; the features come back in one transfer, and
  # padding (label -1) is dropped on the host.
  feats, labs = [], []
  if data.stream:
    src = split_data if ids is None else _Subset(split_data, ids)
    loader = StreamingLoader(src, data.info.spec(False), batch_size=batch_size, train=False,
                             num_threads=8)
    with loader.epoch(0) as it:
      for batch in it:
        feats.append(compiled.features(state, train.global_batch(batch.images, mesh)))
        labs.append(np.where(batch.mask, batch.labels, -1))
    y = np.concatenate(labs)
  else:
    images, dev_labels = split_data
    n = int(labels.shape[0]) if ids is None else len(ids)
    plan, _ = batching.eval_indices(n, batch_size)
    if ids is not None:
      plan = np.where(plan >= 0, np.asarray(ids, np.int32)[np.maximum(plan, 0)], -1)
    for row in plan:
      h, y = compiled.features(state, images, dev_labels, loop._place(row, mesh))
      feats.append(h)
      labs.append(y)
    y = np.asarray(jnp.concatenate(labs))
  h = np.asarray(jnp.concatenate(feats))
  return h[y >= 0], y[y >= 0]


def nc_pass(compiled: _Compiled, state, split_data, labels, ids, batch_size, mesh, data: Data
            ) -> dict:
  """:func:`nc_jax.metrics.nc_metrics` of the eval-mode features of a split (streamed in
  chunks: the (N, K) logits are never held at once)."""
  import numpy as np

  from nc_jax import heads, metrics
  h, y = _feature_batches(compiled, state, split_data, labels, ids, batch_size, mesh, data)
  k = compiled.head_config.num_classes
  missing = k - np.unique(y).size
  if missing:
    # Class means (and so every NC metric) are undefined; a small subset or mock data.
    print(f"warning: NC metrics skipped: {missing} of {k} classes have no examples among "
          f"the {y.size} evaluated (raise --nc-examples)", file=sys.stderr, flush=True)
    return {key: float("nan") for key in metrics.METRIC_KEYS} | {"cosine_margins": None}
  w, b = heads.classifier(compiled.head_config, state.params["head"], state.head,
                          h.mean(axis=0, dtype=np.float64).astype(h.dtype))
  chunk = 8192
  return metrics.nc_metrics_streaming(
      lambda: ((h[i:i + chunk], y[i:i + chunk]) for i in range(0, h.shape[0], chunk)),
      np.asarray(w), np.asarray(b), compiled.head_config.num_classes)


def _nc_record(result: dict, prefix: str) -> dict:
  from nc_jax import metrics
  return {f"{prefix}{k}": float(result[k]) for k in metrics.METRIC_KEYS}


def run_one(cfg: config_lib.TrainConfig, method: str, options: RunOptions, data: Data, mesh,
            cache: dict) -> str:
  """Trains one (method, seed); returns ``"done"``, ``"skipped"``, ``"stopped"``
  (``--max-steps``), ``"interrupted"`` (SIGINT/SIGTERM) or ``"locked"`` (another process is
  running it: :meth:`experiments.run_folder.RunFolder.lock`)."""
  import jax
  run = run_folder.RunFolder(options.run_dir(method, cfg.seed))
  if jax.process_index() != 0:  # several hosts: process 0 alone writes the run folder
    return _run_locked(cfg, method, options, data, mesh, cache, run)
  try:
    with run.lock():
      return _run_locked(cfg, method, options, data, mesh, cache, run)
  except run_folder.RunLocked as err:
    print(f"{options.experiment}/{method}/seed-{cfg.seed}: skipped: {err}", flush=True)
    return "locked"


def _run_locked(cfg: config_lib.TrainConfig, method: str, options: RunOptions, data: Data,
                mesh, cache: dict, run: "run_folder.RunFolder") -> str:
  import jax
  import numpy as np

  from nc_jax import loop, train
  from nc_jax.checkpoint import Checkpointer, has_checkpoint
  from nc_jax.data import batching
  from nc_jax.data.streaming import StreamingLoader
  from experiments import tb_writer

  folder = run.path
  title = f"{options.experiment}/{method}/seed-{cfg.seed}"
  config_json = {"experiment": options.experiment, "method": method, "seed": cfg.seed,
                 "train_config": dataclasses.asdict(cfg),
                 "options": {k: v for k, v in dataclasses.asdict(options).items()
                             if k not in ("methods", "seeds")},
                 "machine": machine_description(), "versions": _versions(),
                 # "auto" is chosen per platform inside the compiled program (newton_schulz
                 # on GPUs): record what runs on this mesh's devices.
                 "factorisation_resolved": solver_lib.resolve_factorisation(
                     cfg.factorisation, mesh.devices.flat[0].platform),
                 "command": " ".join([f"python -m experiments.{options.experiment}"] +
                                     sys.argv[1:]) if sys.argv else ""}
  # Several hosts: every process trains, process 0 alone writes the run folder (Orbax
  # coordinates the checkpoints itself).
  writes = jax.process_index() == 0
  if options.overwrite and folder.exists() and writes:
    for entry in folder.iterdir():  # all but the lock this process holds
      if entry.name != ".lock":
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
  if run.done_epochs() == cfg.epochs:
    if not options.quiet:
      print(f"{title}: finished earlier, skipped", flush=True)
    return "skipped"
  ckpt_dir = run.checkpoint_dir
  has_ckpt = has_checkpoint(ckpt_dir)  # a killed write's leftovers are not a checkpoint
  if has_ckpt and not options.resume:
    raise ValueError(f"{folder}: holds an unfinished run (checkpoints); pass --resume to "
                     f"continue it or --overwrite to start it again")
  if has_ckpt:
    run_folder.check_same_run(run, config_json)
  folder.mkdir(parents=True, exist_ok=True)

  k = data.info.num_classes
  train.check_batch_size(cfg.batch_size, mesh)
  if data.stream:
    train_data = StreamingLoader(data.train, cfg.data_spec(True), batch_size=cfg.batch_size,
                                 train=True, seed=cfg.seed, stratified=cfg.use_stratified,
                                 labels=data.train_labels, num_classes=k, num_threads=16)
    eval_data = StreamingLoader(data.test, data.info.spec(False), batch_size=cfg.batch_size,
                                train=False, num_threads=16)
    steps_per_epoch = len(train_data)
  else:
    steps_per_epoch = batching.num_batches(data.num_train, cfg.batch_size)
  key = dataclasses.replace(cfg, seed=0)
  if key not in cache:
    cache.clear()  # one compiled configuration at a time
    cache[key] = _compile(cfg, data, mesh, steps_per_epoch)
  compiled = cache[key]
  if not data.stream:
    nc_train, nc_test = data.on_device
    train_data = loop.DeviceData(*nc_train, cfg.data_spec(True))
    eval_data = loop.DeviceData(*nc_test, data.info.spec(False))
  else:
    nc_train, nc_test = data.train, data.test
  nc_size = options.nc_examples or (50_000 if data.stream else None)
  if data.stream:  # the first examples (tfds shuffles records when it prepares a dataset)
    nc_ids = None if nc_size is None or nc_size >= data.num_train else range(nc_size)
    nc_test_ids = None if nc_size is None or nc_size >= data.num_test else range(nc_size)
  else:
    nc_ids = balanced_subset(data.train_labels, nc_size, k, seed=1)
    nc_test_ids = balanced_subset(data.test_labels, nc_size, k, seed=1)

  state = train.create_train_state(compiled.model, compiled.tx, compiled.head_config,
                                   jax.random.PRNGKey(cfg.seed), compiled.sample_input,
                                   init_params=cfg.init_params())
  state = train.replicate(state, mesh)
  position, records = {"epoch": 0, "batch": 0}, []
  checkpointer = Checkpointer(ckpt_dir, keep=options.keep)
  if has_ckpt:
    state, position = checkpointer.restore(state, steps_per_epoch=steps_per_epoch)
    print(f"{title}: resuming at epoch {position['epoch'] + 1}, batch {position['batch']} "
          f"(step {int(state.step)})", flush=True)  # also with --quiet: say what resumed
    if position["epoch"] > cfg.epochs:
      checkpointer.close()
      raise ValueError(f"{folder}: the checkpoint is at epoch {position['epoch']}, past "
                       f"--epochs {cfg.epochs}; resume with --epochs >= {position['epoch']}")
    # Records after the checkpoint belong to work that is about to be redone; those before
    # it must all be there.
    records = run.records_until(position["epoch"])
  else:
    if writes:
      run_folder.write_json(run.config_path, config_json)
  if writes:
    run.write_records(records)
  elapsed0 = records[-1]["elapsed"] if records else 0.0
  writer = tb_writer.open_writer(folder / "tb", options.tensorboard if writes else False)
  progress = _Progress(title, cfg.epochs * steps_per_epoch,
                       position["epoch"] * steps_per_epoch + position["batch"], options.quiet)
  t_start = time.perf_counter()
  last_margins: list = []

  def on_epoch(fit_record: dict) -> None:
    e = fit_record["epoch"]
    rec: dict[str, Any] = {"epoch": e, "step": e * steps_per_epoch,
                           "seconds": fit_record["seconds"]}
    rec.update({f"train_{m}": fit_record["train"][m] for m in ("loss", "top1", "top5")})
    if "eval" in fit_record:
      rec.update({f"test_{m}": fit_record["eval"][m] for m in ("loss", "top1", "top5")})
    if (e - 1) % options.nc_every == 0 or e == cfg.epochs:
      t_nc = time.perf_counter()
      current = holder["state"]
      tr = nc_pass(compiled, current, nc_train, data.train_labels, nc_ids, cfg.batch_size, mesh,
                   data)
      te = nc_pass(compiled, current, nc_test, data.test_labels, nc_test_ids, cfg.batch_size,
                   mesh, data)
      rec.update(_nc_record(tr, "nc_train_"))
      rec.update(_nc_record(te, "nc_test_"))
      if tr["cosine_margins"] is not None:
        last_margins[:] = [tr["cosine_margins"]]
        if writes:  # now, not at the end: a kill after the final checkpoint must not lose it
          _save_margins(run, tr["cosine_margins"])
      rec["nc_seconds"] = time.perf_counter() - t_nc
    rec["elapsed"] = elapsed0 + time.perf_counter() - t_start
    records.append(rec)
    if writes:
      run.append_record(rec)
    if writer is not None:
      writer.scalars(rec["step"], {_tb_tag(key): v for key, v in rec.items()
                                   if key not in ("epoch", "step") and np.isfinite(v)})
      writer.flush()
    progress.epoch(rec, cfg.epochs)

  # fit hands on_epoch the record, not the state: keep the latest state at hand for the NC
  # pass through the train function (a thin wrapper, no extra work per step).
  holder = {"state": state}
  train_fn, eval_fn = compiled.steps

  def tracked_train(st, *args):
    st, m = train_fn(st, *args)
    holder["state"] = st
    return st, m

  def on_step(epoch, batch):
    progress.step()

  try:
    result = loop.fit(state, train_data, steps=(tracked_train, eval_fn), epochs=cfg.epochs,
                      batch_size=cfg.batch_size, num_classes=k, stratified=cfg.use_stratified,
                      eval_data=eval_data, eval_every=options.eval_every, mesh=mesh,
                      checkpointer=checkpointer, checkpoint_every=options.checkpoint_every,
                      position=position, max_steps=options.max_steps, on_epoch=on_epoch,
                      on_step=on_step)
  finally:
    progress.close()
    checkpointer.close()
    if writer is not None:
      writer.close()
  if result.stopped:
    why = "--max-steps" if result.stop_reason == "max_steps" else result.stop_reason
    print(f"{title}: stopped ({why}) at epoch {result.position['epoch']} batch "
          f"{result.position['batch']} (checkpointed); continue with --resume", flush=True)
    return "stopped" if result.stop_reason == "max_steps" else "interrupted"
  if not writes:
    return "done"
  if not run.margins_path.exists():  # killed after the final checkpoint, before the margins
    tr = nc_pass(compiled, result.state, nc_train, data.train_labels, nc_ids, cfg.batch_size,
                 mesh, data)
    if tr["cosine_margins"] is not None:
      _save_margins(run, tr["cosine_margins"])
  wall = records[-1]["elapsed"] if records else 0.0
  run.mark_done({"epochs": cfg.epochs, "wall_seconds": wall})
  if options.plot:
    _plot_run(folder)
  final = records[-1]
  print(f"{title}: done in {wall:.0f} s — train top-1 {final['train_top1']:.2f}%"
        + (f", test top-1 {final['test_top1']:.2f}%" if "test_top1" in final else "")
        + (f", NC1 {final['nc_train_nc1']:.2e}" if "nc_train_nc1" in final else ""), flush=True)
  return "done"


def _tb_tag(key: str) -> str:
  """``train_loss`` → ``train/loss``, ``nc_test_nc1`` → ``nc_test/nc1``."""
  head = 2 if key.startswith("nc_") else 1
  parts = key.split("_")
  return "_".join(parts[:head]) + "/" + "_".join(parts[head:]) if len(parts) > head else key


def _save_margins(run: "run_folder.RunFolder", margins) -> None:
  """Sorted per-sample cosine margins to ``margins.npy``, atomically."""
  import numpy as np
  tmp = run.margins_path.with_name("margins.tmp.npy")
  np.save(tmp, np.sort(np.asarray(margins, np.float32)))
  tmp.replace(run.margins_path)


def _plot_run(folder: pathlib.Path) -> None:
  from experiments import report
  run = report.load_run(folder, folder.parent.name)
  if run is not None:
    report.plot_metrics({run.method: [run]}, folder / "metrics.png", title=str(folder))
    report.plot_margins({run.method: [run]}, folder / "margins.png", title=str(folder))


# --------------------------------------------------------------------------- #
# Sweep
# --------------------------------------------------------------------------- #


def main(experiment: str, argv: Sequence[str] | None = None) -> dict[tuple[str, int], str]:
  """Runs ``--methods`` × ``--seeds`` of ``experiment``; returns each run's outcome."""
  if "--distributed" in (sys.argv[1:] if argv is None else argv):
    import jax
    jax.distributed.initialize()  # before anything touches the devices (parse_args does)
  options, base = parse_args(experiment, argv)
  from nc_jax import train
  mesh = train.make_mesh(select_devices(options.devices))
  data = load_data(base, options)
  if not data.stream:  # once for the whole sweep
    data.on_device = train.replicate((data.train, data.test), mesh)
  if not options.quiet:
    print(f"{experiment}: {base.model} ({base.stem} stem), {base.optimizer}, batch "
          f"{base.batch_size}, {base.epochs} epochs, {data.num_train} train / "
          f"{data.num_test} test examples, {machine_description()}",
          flush=True)
  outcomes: dict[tuple[str, int], str] = {}
  cache: dict = {}
  for method in options.methods:
    for seed in options.seeds:
      outcome = run_one(config_for(base, method, seed), method, options, data, mesh, cache)
      outcomes[(method, seed)] = outcome
      if outcome in ("stopped", "interrupted"):
        return outcomes  # "locked" runs are another process's: the sweep goes on
  print(f"runs: {pathlib.Path(options.out) / experiment}; aggregate with "
        f"python -m experiments.report {pathlib.Path(options.out) / experiment}", flush=True)
  return outcomes


def cli(experiment: str) -> None:
  """Entry point of ``python -m experiments.<experiment>``: errors as messages, not tracebacks."""
  from nc_jax.data.sources import DataNotFoundError
  from nc_jax.train import TrainingFault
  try:
    outcomes = main(experiment, sys.argv[1:])
  except (DataNotFoundError, ValueError, TrainingFault) as err:
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2) from None
  if "interrupted" in outcomes.values():  # a signal; --max-steps is a requested stop: 0
    raise SystemExit(130)
