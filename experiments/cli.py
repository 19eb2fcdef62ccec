"""The experiments' command lines: methods and seeds (shared with UFM) and the image runner's
flags — run options, then one flag per :class:`nc_jax.config.TrainConfig` field, generated from
its annotations so that a new field is a new flag with nothing else to edit."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import pathlib
import sys
import types
import typing
from typing import Any, NoReturn, Sequence

import jax

from nc_jax import config as config_lib
from nc_jax import heads, models, optim
from nc_jax import solver as solver_lib
from nc_jax.data.sources import SOURCES
from nc_jax.config import METHOD_VARIANTS, METHODS


def parse_methods(text: str, allowed: Sequence[str] = METHODS) -> tuple[str, ...]:
  """A comma list of ``allowed`` methods (default :data:`METHODS`; duplicates removed,
  order kept).

  Raises:
    ValueError: naming ``--methods``, for an empty list or an unknown method.
  """
  methods = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
  bad = [m for m in methods if m not in allowed]
  if bad or not methods:
    raise ValueError(f"--methods: expected a comma list of {', '.join(allowed)}; got {text!r}"
                     + (f" (unknown: {', '.join(bad)})" if bad else ""))
  return methods


def parse_seeds(text: str) -> tuple[int, ...]:
  """``"3"``, ``"1-5"`` or ``"1,4,7"`` (duplicates removed, order kept).

  Raises:
    ValueError: naming ``--seeds``, for anything else (``"5-1"``, ``"a"``, ``""``).
  """
  seeds: list[int] = []
  try:
    for part in text.split(","):
      part = part.strip()
      if "-" in part[1:]:
        lo, hi = part.split("-", 1)
        if int(hi) < int(lo):
          raise ValueError
        seeds.extend(range(int(lo), int(hi) + 1))
      else:
        seeds.append(int(part))
  except ValueError:
    raise ValueError(f"--seeds: expected N, A-B (A <= B) or a comma list of integers, "
                     f"got {text!r}") from None
  return tuple(dict.fromkeys(seeds))


# --------------------------------------------------------------------------- #
# The image runner
# --------------------------------------------------------------------------- #


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
_NOT_FLAGS = ("dataset", "head", "seed", "forward_only")
_ALIASES = {"learning_rate": ("--lr",)}
# Flag help: each TrainConfig field's description (its metadata), with the flag spelling of
# the fields it names.
_FLAG_WORDS = (("data_path", "--data-path"), ("batch_size", "--batch-size"))


def _choices() -> dict[str, tuple[str, ...] | None]:
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
  seeds.add_argument("--seeds", default="1", help="N, A-B or a comma list (default: %(default)s; paper: 1-5)")
  seeds.add_argument("--seed", type=int, help="a single seed")
  run.add_argument("--out", default="runs", help="runs go to <out>/<experiment>/<method>/seed-<n> (default: %(default)s)")
  run.add_argument("--devices", default="all",
                   help="'all' (data-parallel over every device), N (the first N) or a comma "
                        "list of device indices (default: %(default)s)")
  run.add_argument("--eval-every", type=int, default=1, help="test accuracy every N epochs (default: %(default)s)")
  run.add_argument("--nc-every", type=int, default=5,
                   help="NC metrics on train and test at epochs 1, 1+N, ... and the last "
                        "(default: %(default)s, the official code's)")
  run.add_argument("--nc-examples", type=int, default=None,
                   help="at most this many (class-balanced) train examples for the NC metrics "
                        "(default: all; ImageNet: 50000)")
  run.add_argument("--train-examples", type=int, default=None,
                   help="train on a class-balanced subset of this size (reduced runs)")
  run.add_argument("--test-examples", type=int, default=None,
                   help="evaluate on a class-balanced subset of this size")
  run.add_argument("--checkpoint-every", type=int, default=10, help="epochs between checkpoints (default: %(default)s)")
  run.add_argument("--keep", type=int, default=2, help="checkpoints kept per run (default: %(default)s)")
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
    text = field.metadata["help"]
    for word, flag in _FLAG_WORDS:
      text = text.replace(word, flag)
    # None defaults are described by the text itself ("None: ..."); argparse's
    # BooleanOptionalAction adds no second default when the help names it.
    text = text.replace("None:", "unset:")
    kw: dict[str, Any] = {"dest": name, "default": default,
                          "help": text if default is None else text + " (default: %(default)s)"}
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
  """The run's TrainConfig: the method's head, forward-only flag and options
  (:data:`nc_jax.config.METHOD_VARIANTS`), and the seed."""
  return dataclasses.replace(METHOD_VARIANTS[method].train_config(base), seed=seed)


def select_devices(text: str) -> list:
  """The devices ``--devices`` names: ``all`` (every process's), a count ``N`` (the first N)
  or a comma list of indices.

  Raises:
    ValueError: naming ``--devices``, for anything else or more devices than exist.
  """
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


def exit_with_message(message: str, status: int, *, program: bool) -> NoReturn:
  """Ends a command with ``message`` as the last line of its stderr, exit status ``status``.

  With ``program=True`` (this process *is* the command, ``python -m experiments.<name>``)
  the message stays the last line whatever else is still running. After a failed
  checkpoint write, TensorStore operations of that write can still be in flight in native
  threads that Python cannot join; as they end they print tracebacks of the same failure
  (asyncio's "Event loop is closed", Orbax's logged ``ValueError``) at any moment,
  interpreter shut-down included, and a user reading the end of the output would not see
  what to do. So file descriptor 2 is pointed at ``/dev/null`` first (whatever anything,
  Python or native code, prints from then on is dropped) and the message is written to a
  duplicate of the original. What is dropped is a consequence of the error being reported:
  its cause is in the message, and Orbax's own account of it was printed before.

  With ``program=False`` (called in-process, e.g. by a test) the message is printed and
  nothing else changes.

  Raises:
    SystemExit: always, with ``status``.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  if not program:
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(status)
  original = os.dup(2)
  null = os.open(os.devnull, os.O_WRONLY)
  os.dup2(null, 2)
  os.close(null)
  data = (message + "\n").encode(sys.stderr.encoding or "utf-8", "backslashreplace")
  while data:  # os.write may write part of it
    data = data[os.write(original, data):]
  os.close(original)
  raise SystemExit(status)
