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
  :func:`nc_jax.evaluate.nc_evaluate` on the un-augmented train and test splits as
  ``nc_train_<key>`` / ``nc_test_<key>`` (and ``nc_seconds``, the time they took; with
  ``--imbalance`` also the per-class lists and the minority metrics of
  :data:`nc_jax.evaluate.IMBALANCE_KEYS`);
* ``environment.jsonl`` — one line per start or resume: the epoch and batch it started
  from, machine, CPU, versions, BLAS threads, ``XLA_FLAGS`` and command
  (:meth:`experiments.run_folder.RunFolder.append_environment`);
* ``margins.npy`` — the sorted per-sample train cosine margins at the end;
* ``reference_etf.npz`` — the nearest ETFs of epoch 1's NC pass, which the
  ``nc_*_w_etf_ref_dist`` / ``nc_*_h_etf_ref_dist`` metrics compare with;
* ``checkpoints/`` (Orbax; every ``--checkpoint-every`` epochs, at the end and
  on SIGINT/SIGTERM), ``tb/`` (TensorBoard scalars, when installed),
  ``metrics.png`` and ``margins.png``, and ``done.json`` once finished.

Finished runs are skipped, so a sweep can be re-run after an interruption; a
run with a checkpoint continues only with ``--resume`` (bitwise the
uninterrupted run on CPU), and ``--overwrite`` starts it again.
``python -m experiments.report <out>/<experiment>`` aggregates the seeds.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import progress as progress_lib
from experiments import report, run_folder, tb_writer
from experiments.cli import (RunOptions, config_for, exit_with_message, parse_args,
                             select_devices)
from experiments.image_data import Data, load_data
from nc_jax import config as config_lib
from nc_jax import class_metrics, evaluate, loop, train
from nc_jax import solver as solver_lib
from nc_jax.checkpoint import Checkpointer, has_checkpoint
from nc_jax.data.sources import DataNotFoundError
from nc_jax.train import TrainingFault

# --------------------------------------------------------------------------- #
# One run
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class _Compiled:
  """What runs of a sweep that differ only in the seed share (so the sweep compiles once)."""
  model: Any
  tx: Any
  head_config: Any
  steps: Any  # nc_jax.pipeline.Steps
  sample_input: Any


def _compile(cfg: config_lib.TrainConfig, pipe, steps_per_epoch: int) -> _Compiled:
  info = cfg.info
  model = cfg.backbone()
  head_config = cfg.head_config(info.num_classes, model.feature_dim)
  tx = cfg.optimizer_transform(steps_per_epoch)
  steps = pipe.compile(model=model, tx=tx, head_config=head_config, loss=cfg.loss)
  sample = jnp.zeros((2,) + info.input_shape, config_lib.COMPUTE_DTYPES[cfg.compute_dtype])
  return _Compiled(model, tx, head_config, steps, sample)


#: The epoch whose nearest ETFs the ``*_etf_ref_dist`` metrics compare with (official
#: ``--ref_ETF 1``).
REFERENCE_EPOCH = 1


def nc_pass(compiled: _Compiled, state, pipe, split: str, ids, *, reference=None,
            minority=None) -> dict:
  """The NC metrics (:func:`nc_jax.evaluate.nc_evaluate`) of the eval-mode features of
  ``split``'s examples ``ids`` (all if ``None``); batches are dispatched without waiting."""
  h, y = evaluate.collect_features(compiled.steps.features(state, *args)
                                   for args in pipe.feature_batches(split, ids))
  return evaluate.nc_evaluate(h, y, compiled.head_config, state.params["head"], state.head,
                              reference=reference, minority=minority)


def _nc_record(result: dict, prefix: str) -> dict:
  """The record's NC entries: every scalar; with minority classes also the imbalance scalars
  and the per-class NC1 and top-1 as lists."""
  rec = {f"{prefix}{k}": float(result[k]) for k in evaluate.SCALAR_KEYS}
  if "nc1_per_class" in result:
    rec.update({f"{prefix}{k}": float(result[k]) for k in evaluate.IMBALANCE_KEYS})
    rec.update({f"{prefix}{k}": [float(x) for x in result[k]]
                for k in ("nc1_per_class", "top1_per_class")})
  return rec


def _reference_of(frames: dict | None, split: str) -> dict | None:
  """One split's reference frames, as :func:`nc_jax.evaluate.nc_evaluate` takes them."""
  if frames is None:
    return None
  return {f"{m}_etf_frame": frames.get(f"{split}_{m}") for m in ("w", "h")}


def run_one(cfg: config_lib.TrainConfig, method: str, options: RunOptions, data: Data, mesh,
            cache: dict) -> str:
  """Trains one (method, seed); returns ``"done"``, ``"skipped"``, ``"stopped"``
  (``--max-steps``), ``"interrupted"`` (SIGINT/SIGTERM) or ``"locked"`` (another process is
  running it: :meth:`experiments.run_folder.RunFolder.lock`)."""
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


  folder = run.path
  title = f"{options.experiment}/{method}/seed-{cfg.seed}"
  config_json = {"experiment": options.experiment, "method": method, "seed": cfg.seed,
                 "train_config": dataclasses.asdict(cfg),
                 "options": {k: v for k, v in dataclasses.asdict(options).items()
                             if k not in ("methods", "seeds")},
                 "machine": run_folder.machine_description(), "versions": run_folder.versions(),
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

  pipe = cfg.pipeline(data.train, data.test, mesh)
  steps_per_epoch = pipe.steps_per_epoch
  key = dataclasses.replace(cfg, seed=0)
  if key not in cache:
    cache.clear()  # one compiled configuration at a time
    cache[key] = _compile(cfg, pipe, steps_per_epoch)
  compiled = cache[key]

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
    run.append_environment({"epoch": position["epoch"], "batch": position["batch"]},
                           config_json["command"])
  elapsed0 = records[-1]["elapsed"] if records else 0.0
  writer = tb_writer.open_writer(folder / "tb", options.tensorboard if writes else False)
  progress = progress_lib.Progress(title, cfg.epochs * steps_per_epoch,
                       position["epoch"] * steps_per_epoch + position["batch"], options.quiet)
  t_start = time.perf_counter()
  # The reference epoch's nearest ETFs (saved with the run; read back on resume).
  reference = run.load_reference_etfs() if has_ckpt else None

  def on_epoch(fit_record: dict, current) -> None:
    e = fit_record["epoch"]
    rec: dict[str, Any] = {"epoch": e, "step": e * steps_per_epoch,
                           "seconds": fit_record["seconds"]}
    rec.update({f"train_{m}": fit_record["train"][m] for m in ("loss", "top1", "top5")})
    if "eval" in fit_record:
      rec.update({f"test_{m}": fit_record["eval"][m] for m in ("loss", "top1", "top5")})
    if (e - 1) % options.nc_every == 0 or e == cfg.epochs:
      t_nc = time.perf_counter()
      nonlocal reference
      tr, te = (nc_pass(compiled, current, pipe, split, ids, minority=cfg.minority,
                        reference=_reference_of(reference, split))
                for split, ids in (("train", data.nc_train_ids), ("eval", data.nc_test_ids)))
      if e == REFERENCE_EPOCH:
        reference = {f"{split}_{m}": r[f"{m}_etf_frame"] for split, r in (("train", tr),
                                                                          ("eval", te))
                     for m in ("w", "h")}
        if writes:  # before the record: a record of epoch ≥ 1 implies the reference
          run.save_reference_etfs(reference)
        for r, split in ((tr, "train"), (te, "eval")):
          r.update(class_metrics.etf_reference_distances(r, _reference_of(reference, split)))
      rec.update(_nc_record(tr, "nc_train_"))
      rec.update(_nc_record(te, "nc_test_"))
      if tr["cosine_margins"] is not None and writes:
        # Now, not at the end: a kill after the final checkpoint must not lose it.
        _save_margins(run, tr["cosine_margins"])
      rec["nc_seconds"] = time.perf_counter() - t_nc
    rec["elapsed"] = elapsed0 + time.perf_counter() - t_start
    records.append(rec)
    if writes:
      run.append_record(rec)
    if writer is not None:
      writer.scalars(rec["step"], {_tb_tag(key): v for key, v in rec.items()
                                   if key not in ("epoch", "step") and np.isscalar(v)
                                   and np.isfinite(v)})
      writer.flush()
    progress.epoch(rec, cfg.epochs)

  def on_step(epoch, batch):
    progress.step()

  try:
    result = loop.fit(state, pipe, steps=compiled.steps, epochs=cfg.epochs,
                      eval_every=options.eval_every,
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
    tr = nc_pass(compiled, result.state, pipe, "train", data.nc_train_ids)
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
  tmp = run.margins_path.with_name("margins.tmp.npy")
  np.save(tmp, np.sort(np.asarray(margins, np.float32)))
  tmp.replace(run.margins_path)


def _plot_run(folder: pathlib.Path) -> None:
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
    jax.distributed.initialize()  # before anything touches the devices (parse_args does)
  options, base = parse_args(experiment, argv)
  mesh = train.make_mesh(select_devices(options.devices))
  data = load_data(base, options, mesh)
  if not options.quiet:
    print(f"{experiment}: {base.model} ({base.stem} stem), {base.optimizer}, batch "
          f"{base.batch_size}, {base.epochs} epochs, {data.num_train} train / "
          f"{data.num_test} test examples, {run_folder.machine_description()}",
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


def cli(experiment: str, *, program: bool = False) -> None:
  """Entry point of ``python -m experiments.<experiment>`` (which passes ``program=True``):
  errors as messages, not tracebacks; the ``error:`` line is the last line of stderr
  (:func:`experiments.cli.exit_with_message`), exit status 2."""
  try:
    outcomes = main(experiment, sys.argv[1:])
  except (DataNotFoundError, ValueError, TrainingFault, OSError) as err:
    # OSError: e.g. a full disk while writing records or a checkpoint
    # (nc_jax.checkpoint.CheckpointWriteError names the intact checkpoint to resume from).
    exit_with_message(f"error: {err}", 2, program=program)
  if "interrupted" in outcomes.values():  # a signal; --max-steps is a requested stop: 0
    raise SystemExit(130)
