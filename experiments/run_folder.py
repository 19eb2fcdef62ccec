"""A run folder's bookkeeping: one writer at a time, readable records, resume only the same run.

A run folder (``runs/<experiment>/<method>/seed-<n>/``) holds ``config.json`` (what the run
computes), ``metrics.jsonl`` (one record per epoch or evaluation), ``environment.jsonl`` (where
and with what each segment of the run ran: one line per start or resume), ``done.json``
(written last), ``margins.npy``, ``checkpoints/`` and figures. Everything here is about
keeping those files consistent under faults:

* **One writer.** :meth:`RunFolder.lock` takes an exclusive ``flock`` on ``<folder>/.lock``
  for the run's lifetime. The kernel releases it when the process dies (also on SIGKILL), so a
  stale lock never blocks a later resume, and a second process on the same folder is refused
  with the holder's pid, host and start time instead of interleaving records with it.
* **Readable records.** :meth:`RunFolder.read_records` tolerates exactly what a kill leaves —
  a half-written last line, which it drops with a warning — and refuses anything else that is
  not JSON, naming the file and line. Records are rewritten atomically (write, then rename).
* **The same run.** :func:`check_same_run` compares the saved ``config.json`` with the new
  one on everything that changes what the run computes or records: the whole training
  configuration, the options in :data:`RUN_DEFINING_OPTIONS`, and the factorisation ``auto``
  resolved to. A folder with checkpoints but no readable ``config.json`` cannot be checked and
  is refused.
* **Provenance per segment.** A run resumed on another machine, with other package versions
  or another BLAS thread count computes the same thing up to float rounding, so such a change
  does not stop a resume; :meth:`RunFolder.append_environment` records it instead, one line
  per segment, with the step the segment started from.
* **Clear errors.** Every JSON file is read through :func:`read_json`, whose errors name the
  file.

Used by the image runner (:mod:`experiments.image`) and the UFM runner (:mod:`experiments.ufm`).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import platform
import socket
import warnings
from typing import Any, Iterator

from experiments import threads

# Options that change what a run computes or records (resuming with another value would mix
# two runs in one folder). The others (where output goes, how often to checkpoint, progress
# display, --max-steps, ...) do not.
RUN_DEFINING_OPTIONS = ("train_examples", "test_examples", "nc_examples", "eval_every",
                        "nc_every", "devices")


class RunLocked(ValueError):
  """Another process holds the run folder's lock."""


def read_json(path: pathlib.Path) -> Any:
  """The JSON content of ``path``; ``ValueError`` naming the file if it is not valid JSON."""
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as err:
    raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column "
                     f"{err.colno}); repair or delete the file, or start the run again with "
                     f"--overwrite") from None
  except UnicodeDecodeError as err:
    raise ValueError(f"{path}: not a text file ({err.reason})") from None


def write_json(path: pathlib.Path, content: Any) -> None:
  """Writes ``content`` as JSON atomically (a kill leaves the old file or the new one)."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(content, indent=2) + "\n")
  tmp.replace(path)


def _read_jsonl(path: pathlib.Path, dropped: str) -> list[dict]:
  """The JSON lines of ``path`` (``[]`` if missing). A last line without its newline that is
  not valid JSON (a kill during the write) is dropped with a warning that says ``dropped``;
  any other invalid line is a ``ValueError`` naming the file and line."""
  if not path.exists():
    return []
  text = path.read_text()
  lines = text.split("\n")
  out = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError as err:
      if number == len(lines) and not text.endswith("\n"):
        warnings.warn(f"{path}: dropped a half-written last line (line {number}: a run "
                      f"killed while writing it); {dropped}", stacklevel=3)
        continue
      raise ValueError(f"{path}: line {number} is not valid JSON ({err.msg}); repair or "
                       f"delete the line, or start the run again with --overwrite") from None
  return out


class RunFolder:
  """The files of one run (see the module docstring)."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)

  @property
  def config_path(self) -> pathlib.Path:
    return self.path / "config.json"

  @property
  def records_path(self) -> pathlib.Path:
    return self.path / "metrics.jsonl"

  @property
  def done_path(self) -> pathlib.Path:
    return self.path / "done.json"

  @property
  def margins_path(self) -> pathlib.Path:
    return self.path / "margins.npy"

  @property
  def checkpoint_dir(self) -> pathlib.Path:
    return self.path / "checkpoints"

  @property
  def environment_path(self) -> pathlib.Path:
    return self.path / "environment.jsonl"

  @property
  def reference_etf_path(self) -> pathlib.Path:
    return self.path / "reference_etf.npz"

  def save_reference_etfs(self, frames: dict[str, Any]) -> None:
    """The nearest-ETF frames of the reference epoch (``{name: (d, K) array or None}``),
    atomically; the ``None`` ones are left out."""
    import numpy as np
    tmp = self.reference_etf_path.with_name("reference_etf.tmp.npz")
    np.savez(tmp, **{k: np.asarray(v) for k, v in frames.items() if v is not None})
    tmp.replace(self.reference_etf_path)

  def load_reference_etfs(self) -> dict[str, Any] | None:
    """The saved reference frames, or ``None`` if there are none."""
    import numpy as np
    if not self.reference_etf_path.exists():
      return None
    try:
      with np.load(self.reference_etf_path) as f:
        return {k: f[k] for k in f.files}
    except (OSError, ValueError) as err:
      raise ValueError(f"{self.reference_etf_path}: unreadable ({err}); delete it to record "
                       f"the reference-ETF distances as NaN") from err

  @contextlib.contextmanager
  def lock(self) -> Iterator[None]:
    """Exclusive lock of the folder for the ``with`` block (created if missing).

    Raises:
      RunLocked: another live process holds it (its pid, host and start time are named).
    """
    self.path.mkdir(parents=True, exist_ok=True)
    lock_path = self.path / ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
        raise RunLocked(f"{self.path}: another process is writing this run ({holder}); "
                        f"wait for it to finish, or stop it first") from None
      stamp = (f"pid {os.getpid()} on {socket.gethostname()} since "
               f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC")
      os.ftruncate(fd, 0)
      os.pwrite(fd, stamp.encode(), 0)
      yield
    finally:
      os.close(fd)  # releases the lock (as does the process's death)

  def read_records(self) -> list[dict]:
    """The records of ``metrics.jsonl`` (``[]`` if missing).

    A last line without its newline that is not valid JSON is what a kill during the write
    leaves: it is dropped, with a warning. Any other invalid line is an error naming it.
    """
    return _read_jsonl(self.records_path, "its epoch is redone")

  def append_environment(self, start: dict[str, int], command: str) -> dict:
    """Records where and with what the segment of the run starting now runs.

    Appends one JSON line to ``environment.jsonl``: ``start`` (the step the segment starts
    from, e.g. ``{"iteration": 400}`` or ``{"epoch": 12, "batch": 0}``; all zero for a run
    from the beginning, which starts the file again), ``started`` (UTC), ``command``,
    ``machine`` (:func:`machine_description`), ``cpu`` (:func:`cpu_model`), ``versions``
    (:func:`versions`), ``blas_threads`` (:func:`experiments.threads.blas_threads_now`) and
    ``xla_flags``. Call it after the restore (``start`` is where the run really continues)
    and before the first step.

    Returns:
      The recorded line.
    """
    line = {"start": {k: int(v) for k, v in start.items()},
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "command": command, "machine": machine_description(), "cpu": cpu_model(),
            "versions": versions(), "blas_threads": threads.blas_threads_now(),
            "xla_flags": os.environ.get("XLA_FLAGS")}
    self.path.mkdir(parents=True, exist_ok=True)
    from_beginning = not any(line["start"].values())
    with open(self.environment_path, "w" if from_beginning else "a") as f:
      f.write(json.dumps(line) + "\n")
    return line

  def read_environment(self) -> list[dict]:
    """The lines of ``environment.jsonl``, oldest first (``[]`` if missing; a half-written
    last line is dropped with a warning, as in :meth:`read_records`)."""
    return _read_jsonl(self.environment_path, "that segment's environment is unrecorded")

  def write_records(self, records: list[dict]) -> None:
    """Replaces ``metrics.jsonl`` atomically."""
    tmp = self.records_path.with_name(self.records_path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(self.records_path)

  def append_record(self, record: dict) -> None:
    with open(self.records_path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def records_until(self, epoch: int) -> list[dict]:
    """The records of epochs 1..``epoch`` (the work a checkpoint at ``epoch`` holds).

    Raises:
      ValueError: a record of one of these epochs is missing (e.g. ``metrics.jsonl`` deleted
        or truncated): resuming would leave a silent hole in the run's history.
    """
    records = [r for r in self.read_records() if r.get("epoch", 0) <= epoch]
    missing = sorted(set(range(1, epoch + 1)) - {r.get("epoch") for r in records})
    if missing:
      shown = ", ".join(map(str, missing[:10])) + (", …" if len(missing) > 10 else "")
      raise ValueError(f"{self.records_path}: the checkpoint holds epochs 1–{epoch} but the "
                       f"records of epoch(s) {shown} are missing; restore the file, or start "
                       f"the run again with --overwrite")
    return records

  def done_epochs(self) -> int | None:
    """The epoch count of a finished run (``done.json``), else ``None``."""
    if not self.done_path.exists():
      return None
    content = read_json(self.done_path)
    if not isinstance(content, dict) or not isinstance(content.get("epochs"), int):
      raise ValueError(f"{self.done_path}: expected {{\"epochs\": <int>, ...}}, got "
                       f"{json.dumps(content)[:80]}")
    return content["epochs"]

  def mark_done(self, content: dict) -> None:
    write_json(self.done_path, content)


def check_same_run(folder: RunFolder, config: dict) -> None:
  """Refuses to resume ``folder`` with a ``config`` that computes or records something else.

  Compared: ``train_config`` (only ``epochs`` may grow, and only at a constant learning rate:
  a schedule is laid out over the whole run), the options in :data:`RUN_DEFINING_OPTIONS`,
  and ``factorisation_resolved``.

  Raises:
    ValueError: a difference (each listed), or no readable ``config.json`` to compare with.
  """
  if not folder.config_path.exists():
    raise ValueError(f"{folder.path}: has checkpoints but no config.json to check the "
                     f"configuration against; start the run again with --overwrite")
  saved = read_json(folder.config_path)
  diff = []
  now_cfg, saved_cfg = config["train_config"], saved.get("train_config", {})
  free = ("epochs",) if now_cfg.get("schedule") == "constant" else ()
  diff += [f"{k}: saved {saved_cfg.get(k)!r}, now {now_cfg[k]!r}" for k in now_cfg
           if k not in free and saved_cfg.get(k) != now_cfg[k]]
  now_opt, saved_opt = config.get("options", {}), saved.get("options", {})
  diff += [f"--{k.replace('_', '-')}: saved {saved_opt.get(k)!r}, now {now_opt.get(k)!r}"
           for k in RUN_DEFINING_OPTIONS if k in now_opt and saved_opt.get(k) != now_opt[k]]
  if ("factorisation_resolved" in config
      and saved.get("factorisation_resolved") != config["factorisation_resolved"]):
    diff.append(f"factorisation 'auto' resolved to: saved "
                f"{saved.get('factorisation_resolved')!r}, now "
                f"{config['factorisation_resolved']!r}")
  if diff:
    raise ValueError(f"{folder.path}: --resume with a different configuration ("
                     + "; ".join(diff) + "); use the saved one or --overwrite")


def versions() -> dict[str, str]:
  """Versions of Python and of the packages a run's numbers depend on."""
  import importlib.metadata as md
  out = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  return out


def cpu_model() -> str:
  """The host CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_description() -> str:
  """Devices, processes and host of this run, one line."""
  import jax
  devs = jax.devices()
  kinds = sorted({d.device_kind for d in devs})
  return (f"{len(devs)}× {'/'.join(kinds)} ({jax.default_backend()}), "
          f"{jax.process_count()} process(es), host {platform.machine()} "
          f"{os.cpu_count()} CPUs")
