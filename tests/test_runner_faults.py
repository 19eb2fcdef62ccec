"""Faults around the experiment runner: real processes killed at chosen points, damaged files,
concurrent writers, changed flags on resume. Each ends in "resumed, identical records" or "a
clear error, nothing lost".

Runs are tiny (synthetic data, the MLP backbone, two steps per epoch). A killed run is a real
child process (``subprocess``) that SIGKILLs itself at the chosen point; the resume and the
uninterrupted reference run in this process.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from experiments import cifar10, run_folder

SMOKE = ["--source", "synthetic", "--num-examples", "64", "--batch-size", "32", "--epochs", "3",
         "--nc-every", "1", "--devices", "1", "--quiet", "--checkpoint-every", "1", "--model",
         "mlp", "--method", "implicit", "--no-plot"]
TIMING_KEYS = ("seconds", "elapsed", "nc_seconds")
REPO = pathlib.Path(__file__).resolve().parents[1]


def folder_of(out):
  return pathlib.Path(out) / "cifar10" / "implicit" / "seed-1"


def records(folder):
  return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
          for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run in this process: its records and margins."""
  out = tmp_path_factory.mktemp("reference")
  assert cifar10.main(SMOKE + ["--out", str(out)]) == {("implicit", 1): "done"}
  folder = folder_of(out)
  return records(folder), np.load(folder / "margins.npy")


def run_child(out, argv=(), kill_after_final_checkpoint=False, disk_full_after_epoch=None):
  """The sweep in a child process (``python -m experiments.cifar10``, as a user runs it: its
  ``__main__`` block, after the hooks below are installed); optionally SIGKILLed right
  after the final checkpoint is written, before done.json, or with files limited to 64 KB
  (RLIMIT_FSIZE: writes fail with EFBIG, as on a full disk) once the checkpoint of epoch
  ``disk_full_after_epoch`` is written. (Kills inside a checkpoint write:
  tests/test_checkpoint_faults.py.) Returns the child's stderr."""
  script = textwrap.dedent(f"""
      import os, resource, signal, sys
      sys.argv = ["cifar10"] + {SMOKE + ["--out", str(out)] + list(argv)!r}
      from nc_jax import checkpoint
      real_save = checkpoint.Checkpointer.save
      def save(self, step, state, position):
        real_save(self, step, state, position)
        if {kill_after_final_checkpoint!r} and position["epoch"] == 3:
          self.wait()
          os.kill(os.getpid(), signal.SIGKILL)
        if position["epoch"] == {disk_full_after_epoch!r}:
          self.wait()
          signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead
          resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
      checkpoint.Checkpointer.save = save
      import runpy
      runpy.run_module("experiments.cifar10", run_name="__main__")
      """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  want = (-signal.SIGKILL if kill_after_final_checkpoint else
          2 if disk_full_after_epoch is not None else 0)
  assert proc.returncode == want, proc.stderr[-2000:]
  return proc.stderr


def test_kill_at_random_moments_then_resume_gives_identical_records(tmp_path):
  """SIGKILL the CLI at seeded random moments (start-up, training, an NC pass, a checkpoint
  write: wherever the clock falls); each time, resuming (repeatedly, killed again at another
  moment) ends with records and margins identical to an uninterrupted run's.

  The moments are fractions of an uninterrupted run's measured wall time, so that they fall
  inside a run on a slow machine and a fast one alike (with the session's compilation cache a
  child run takes a third of the time it takes without); at least one round must really be
  killed. The timed run is the second one, its programs loaded from the cache as the killed
  runs' are, and its records equal the first's (compiled afresh or loaded, the same run)."""
  run_child(tmp_path / "full")
  full = folder_of(tmp_path / "full")
  start = time.monotonic()
  run_child(tmp_path / "timed")
  seconds = time.monotonic() - start
  assert records(folder_of(tmp_path / "timed")) == records(full)
  rng = np.random.default_rng(11)
  out = tmp_path / "killed"
  folder = folder_of(out)
  script = textwrap.dedent(f"""
      import sys
      sys.argv = ["cifar10"] + {SMOKE + ["--out", str(out), "--resume"]!r}
      import runpy
      runpy.run_module("experiments.cifar10", run_name="__main__")
      """)
  delays, killed = [], 0
  for _ in range(4):
    delay = float(rng.uniform(0.1, 0.9)) * seconds
    delays.append(round(delay, 2))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
      proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
      proc.kill()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGKILL), (delays, err[-2000:])
    killed += proc.returncode == -signal.SIGKILL
  assert killed >= 1, (seconds, delays)
  run_child(out, ["--resume"])   # finishes whatever is left
  assert json.loads((folder / "done.json").read_text())["epochs"] == 3, delays
  assert records(folder) == records(full), delays
  np.testing.assert_array_equal(np.load(folder / "margins.npy"), np.load(full / "margins.npy"))


def test_full_disk_is_a_clear_error_and_the_run_resumes_identically(tmp_path):
  """Files limited to 64 KB after the epoch-1 checkpoint (the epoch-2 checkpoint's arrays do
  not fit): the run stops with one line naming the failed step and the intact one, exit 2;
  resumed without the limit, its records and margins equal an uninterrupted run's."""
  run_child(tmp_path / "full")
  err = run_child(tmp_path / "disk", disk_full_after_epoch=1)
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: ") and "checkpoint step 4 could not be written" in last
  assert "File too large" in last and "the newest complete checkpoint, step 2, is intact" in last
  run_child(tmp_path / "disk", ["--resume"])
  folder, full = folder_of(tmp_path / "disk"), folder_of(tmp_path / "full")
  assert records(folder) == records(full)
  np.testing.assert_array_equal(np.load(folder / "margins.npy"), np.load(full / "margins.npy"))


@pytest.mark.parametrize("program", [True, False])
def test_the_error_line_stays_last_whatever_prints_after_it(program):
  """:func:`experiments.cli.exit_with_message` as a program's exit: what was printed before
  stays, the message is the last line, exit status as given, though a thread (as Orbax's and
  TensorStore's after a failed write), native code and an atexit hook print after it. In-process
  (``program=False``) nothing is dropped: the late noise follows the message, which shows the
  noise does come after it."""
  script = textwrap.dedent(f"""
      import atexit, os, sys, threading, time
      from experiments import cli
      print("early: kept", file=sys.stderr, flush=True)
      def late():
        time.sleep(0.3)  # after the message: the interpreter waits for this thread at exit
        print("Traceback (most recent call last):\\nValueError: late", file=sys.stderr,
              flush=True)
        os.write(2, b"native: late\\n")
      threading.Thread(target=late).start()
      atexit.register(lambda: print("atexit: late", file=sys.stderr, flush=True))
      cli.exit_with_message("error: the disk is full; free space and resume", 3,
                            program={program!r})
      """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 3, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert lines[0] == "early: kept"
  message = "error: the disk is full; free space and resume"
  if program:
    assert lines == ["early: kept", message]
  else:
    assert lines[1] == message and set(lines[2:]) == {
        "Traceback (most recent call last):", "ValueError: late", "native: late",
        "atexit: late"}


def test_kill_after_the_final_checkpoint_resumes_to_identical_results(tmp_path):
  """Killed after the last checkpoint, before done.json: the resume runs no epoch and finishes
  the run — margins included (they are written at every NC pass now). Compared with an
  uninterrupted child process (the same JAX settings; this test process enables x64)."""
  run_child(tmp_path / "full")
  run_child(tmp_path / "killed", kill_after_final_checkpoint=True)
  folder = folder_of(tmp_path / "killed")
  assert not (folder / "done.json").exists() and (folder / "margins.npy").exists()
  run_child(tmp_path / "killed", ["--resume"])
  assert json.loads((folder / "done.json").read_text())["epochs"] == 3
  full = folder_of(tmp_path / "full")
  assert records(folder) == records(full)
  np.testing.assert_array_equal(np.load(folder / "margins.npy"), np.load(full / "margins.npy"))


def test_margins_lost_after_the_final_checkpoint_are_recomputed(tmp_path, reference):
  cifar10.main(SMOKE + ["--out", str(tmp_path)])
  folder = folder_of(tmp_path)
  (folder / "margins.npy").unlink()
  (folder / "done.json").unlink()
  assert cifar10.main(SMOKE + ["--out", str(tmp_path), "--resume"]) == {("implicit", 1): "done"}
  np.testing.assert_array_equal(np.load(folder / "margins.npy"), reference[1])


def test_half_written_last_record_is_dropped_on_resume(tmp_path, reference):
  """A kill while writing a record leaves a line without its newline: resume drops it (its
  epoch is after the checkpoint) with a warning, and the records end identical."""
  cifar10.main(SMOKE + ["--out", str(tmp_path), "--max-steps", "3"])   # mid-epoch 2
  folder = folder_of(tmp_path)
  with open(folder / "metrics.jsonl", "a") as f:
    f.write('{"epoch": 2, "train_loss": 0.12')
  with pytest.warns(UserWarning, match="dropped a half-written last line"):
    assert cifar10.main(SMOKE + ["--out", str(tmp_path), "--resume"]) == {
        ("implicit", 1): "done"}
  assert records(folder) == reference[0]


def test_missing_records_are_an_error_not_a_silent_hole(tmp_path):
  cifar10.main(SMOKE + ["--out", str(tmp_path), "--max-steps", "5"])   # checkpoint at epoch 2
  folder = folder_of(tmp_path)
  (folder / "metrics.jsonl").unlink()
  with pytest.raises(ValueError, match=r"metrics.jsonl: the checkpoint holds epochs 1–2 but the "
                     r"records of epoch\(s\) 1, 2 are missing"):
    cifar10.main(SMOKE + ["--out", str(tmp_path), "--resume"])
  assert (folder / "checkpoints").exists()   # nothing deleted


@pytest.mark.parametrize("flag", [["--train-examples", "32"], ["--nc-examples", "16"],
                                  ["--test-examples", "16"], ["--nc-every", "2"]])
def test_resume_refuses_options_that_change_the_run(tmp_path, flag):
  cifar10.main(SMOKE + ["--out", str(tmp_path), "--max-steps", "3"])
  name = flag[0]
  with pytest.raises(ValueError, match=rf"different configuration \({name}: saved None|"
                     rf"different configuration \({name}: saved 1, now 2"):
    cifar10.main(SMOKE + ["--out", str(tmp_path), "--resume"] + flag)


def test_resume_without_config_json_is_refused(tmp_path):
  cifar10.main(SMOKE + ["--out", str(tmp_path), "--max-steps", "3"])
  (folder_of(tmp_path) / "config.json").unlink()
  with pytest.raises(ValueError, match="has checkpoints but no config.json"):
    cifar10.main(SMOKE + ["--out", str(tmp_path), "--resume", "--tau", "4"])


@pytest.mark.parametrize("name", ["config.json", "done.json"])
def test_damaged_json_names_the_file(tmp_path, name):
  cifar10.main(SMOKE + ["--out", str(tmp_path)])
  path = folder_of(tmp_path) / name
  path.write_text('{"epochs": 3, "wall')
  argv = SMOKE + ["--out", str(tmp_path)] + (["--resume"] if name == "config.json" else [])
  if name == "config.json":
    (folder_of(tmp_path) / "done.json").unlink()
  with pytest.raises(ValueError, match=rf"{name}: not valid JSON"):
    cifar10.main(argv)


def hold_lock(folder):
  """A child process holding the run folder's lock until killed."""
  script = textwrap.dedent(f"""
      import sys, time
      from experiments import run_folder
      with run_folder.RunFolder({str(folder)!r}).lock():
        print("locked", flush=True)
        time.sleep(600)
      """)
  proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "locked"
  return proc


def test_a_second_writer_is_refused_and_a_killed_one_releases_the_folder(tmp_path, capsys):
  folder = folder_of(tmp_path)
  holder = hold_lock(folder)
  try:
    assert cifar10.main(SMOKE + ["--out", str(tmp_path)]) == {("implicit", 1): "locked"}
    assert "another process is writing this run (pid " in capsys.readouterr().out
    assert not (folder / "metrics.jsonl").exists()       # nothing written beside the holder
  finally:
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
  # SIGKILL released the lock (the kernel drops a dead process's flock): no stale lock.
  assert cifar10.main(SMOKE + ["--out", str(tmp_path)]) == {("implicit", 1): "done"}


def test_run_folder_lock_in_process():
  """Two holders in one process are two open files: the second is refused too."""
  import tempfile  # noqa: PLC0415
  with tempfile.TemporaryDirectory() as d:
    run = run_folder.RunFolder(d)
    with run.lock():
      with pytest.raises(run_folder.RunLocked, match=r"another process is writing this run "
                         r"\(pid \d+ on .* since \d{4}-"):
        with run_folder.RunFolder(d).lock():
          pass
    with run.lock():  # released
      pass


def test_records_reader_refuses_a_damaged_middle_line(tmp_path):
  run = run_folder.RunFolder(tmp_path)
  run.records_path.write_text('{"epoch": 1}\n{"epoch": 2, oops}\n{"epoch": 3}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not valid JSON"):
    run.read_records()
  run.records_path.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo')
  with pytest.warns(UserWarning, match="line 3"):
    assert run.read_records() == [{"epoch": 1}, {"epoch": 2}]
