"""Checkpoint faults, produced for real (issue #11, "nothing lost, nothing mixed").

A write killed with SIGKILL in a child process (paused deterministically inside
Orbax's save by a hook, then killed: no timing race), files of a real save
truncated, deleted or overwritten, a position edited by hand. After each, a
process that did not take part (this one) must list only complete checkpoints,
restore the newest intact one (saying which and why), and save again.
States are small dicts of arrays (or a tiny struct with a ``step``), so the file
runs in seconds; the train-state specifics (zero-size leaves, the implicit head's
static flag, another tree structure) are covered by tests/test_loop.py.
"""

import json
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import flax.struct
import jax.numpy as jnp
import numpy as np
import pytest

from nc_jax import checkpoint
from nc_jax.checkpoint import Checkpointer, CheckpointWarning, has_checkpoint

TMP = checkpoint.TMP_MARK


def state(s):
  # Random values: constant ones compress to nothing, and the data files would not
  # hold the array bytes that the damage tests change.
  w = np.random.default_rng(s).standard_normal((128, 64)).astype(np.float32)
  return {"w": jnp.asarray(w), "b": jnp.arange(8, dtype=jnp.int32) + s}


def position(s, per_epoch=1):
  return {"epoch": s // per_epoch, "batch": s % per_epoch}


def assert_state(restored, s):
  for name, value in state(s).items():
    np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(value))


def save_steps(directory, steps, keep=3):
  with Checkpointer(directory, keep=keep) as ck:
    for s in steps:
      ck.save(s, state(s), position(s))


def entries(directory):
  return sorted(os.listdir(directory))


# --------------------------------------------------------------------------- #
# SIGKILL inside a save
# --------------------------------------------------------------------------- #

# Saves steps 1..FIRST, then starts step FIRST + 1 with a hook that pauses at WHERE
# and says so on stdout; the parent then kills it. Hooks (orbax-checkpoint 0.12.8):
#   created:  the unfinished step folder exists (with _CHECKPOINT_METADATA), no data yet;
#   commit:   every item written, the commit (commit_success.txt + rename) not done;
#   rotation: step FIRST + 1 is finished, and keep-N rotation is half-way through
#             deleting the oldest step.
CHILD = textwrap.dedent("""
    import os, shutil, sys, time
    import jax.numpy as jnp
    import numpy as np
    from orbax.checkpoint._src.path import atomicity
    from nc_jax import checkpoint

    directory, where, first = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def state(s):
      w = np.random.default_rng(s).standard_normal((128, 64)).astype(np.float32)
      return {"w": jnp.asarray(w), "b": jnp.arange(8, dtype=jnp.int32) + s}

    def pause():
      print("PAUSED", where, flush=True)
      time.sleep(600)

    with checkpoint.Checkpointer(directory, keep=2) as ck:
      for s in range(1, first + 1):
        ck.save(s, state(s), {"epoch": s, "batch": 0})
        ck.wait()
      if where == "created":
        create = atomicity._create_tmp_directory
        async def hooked(*args, **kwargs):
          out = await create(*args, **kwargs)
          pause()
          return out
        atomicity._create_tmp_directory = hooked
      elif where == "commit":
        async def hooked(self):
          pause()
        atomicity.AtomicRenameTemporaryPath.finalize = hooked
      elif where == "rotation":  # whoever deletes step 1 (Orbax's rotation deletes in place)
        rmtree = shutil.rmtree
        def hooked(path, *args, **kwargs):
          if not os.path.basename(os.fspath(path)).startswith("1"):
            return rmtree(path, *args, **kwargs)
          files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
          for f in files[: len(files) // 2]:
            os.remove(f)
          pause()
        shutil.rmtree = hooked
      else:
        raise SystemExit(f"unknown hook {where}")
      ck.save(first + 1, state(first + 1), {"epoch": first + 1, "batch": 0})
      ck.wait()
    print("NOT PAUSED", flush=True)
""")


def run_and_kill(tmp_path, directory, where, first, before_kill=None):
  """Runs CHILD until it pauses inside the save, then SIGKILLs it."""
  err_path = tmp_path / f"child-{where}.err"
  with open(err_path, "w") as err:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(directory), where, str(first)],
                            stdout=subprocess.PIPE, stderr=err, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    deadline, line = time.monotonic() + 120, ""
    while "PAUSED" not in line:
      ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
      line = proc.stdout.readline() if ready else ""
      if not ready or (not line and proc.poll() is not None) or line.startswith("NOT PAUSED"):
        pytest.fail(f"the child did not pause at {where!r} (exit code {proc.poll()}):\n"
                    f"{err_path.read_text()[-3000:]}")
    if before_kill is not None:
      before_kill()
  finally:
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
  assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("where", ["created", "commit"])
def test_killed_write_leaves_no_checkpoint_and_blocks_nothing(tmp_path, where):
  directory = tmp_path / "ck"
  readers = {}

  def read_while_paused():
    # Another process may open the folder while a write is in progress: opening,
    # listing and restoring change nothing (the unfinished write stays).
    with Checkpointer(directory, keep=1) as reader:
      readers["steps"] = reader.all_steps()
      readers["state"], readers["position"] = reader.restore(state(0))
    readers["entries"] = entries(directory)

  run_and_kill(tmp_path, directory, where, first=1, before_kill=read_while_paused)
  # Orbax 0.12.8 names the unfinished folder "<step>.orbax-checkpoint-tmp"; "2" never appeared.
  assert entries(directory) == ["1", "2" + TMP]
  assert readers["entries"] == ["1", "2" + TMP] and readers["steps"] == [1]
  assert_state(readers["state"], 1) and readers["position"] == {"epoch": 1, "batch": 0}

  assert has_checkpoint(directory)
  with Checkpointer(directory, keep=2) as ck:
    assert ck.all_steps() == [1] and ck.latest_step() == 1 and ck.damaged_steps() == {}
    restored, pos = ck.restore(state(0))
    assert_state(restored, 1) and pos == {"epoch": 1, "batch": 0} and ck.restored_step == 1
    ck.save(2, state(2), position(2))
  assert entries(directory) == ["1", "2"]                  # the unfinished write is gone
  with Checkpointer(directory) as ck:
    assert ck.latest_step() == 2
    assert_state(ck.restore(state(0))[0], 2)


def test_killed_first_write_is_not_a_partial_run(tmp_path):
  """The runner's "partial run, pass --resume" then "no checkpoint to restore"."""
  directory = tmp_path / "ck"
  run_and_kill(tmp_path, directory, "commit", first=0)
  assert entries(directory) == ["1" + TMP]
  assert not has_checkpoint(directory)
  with Checkpointer(directory) as ck:
    assert ck.latest_step() is None and ck.all_steps() == [] and not ck.has_checkpoint()
    with pytest.raises(ValueError, match=r"ck \(an unfinished write.*is not a checkpoint\)"):
      ck.restore(state(0))
    ck.save(1, state(1), position(1))
  assert entries(directory) == ["1"]


def test_killed_rotation_leaves_no_half_deleted_step(tmp_path):
  """Orbax deletes an old step in place; here it is renamed to an unfinished-write
  name first, so the half-deleted folder is not mistaken for step 1."""
  directory = tmp_path / "ck"
  run_and_kill(tmp_path, directory, "rotation", first=2)
  assert entries(directory) == ["1" + TMP + "-deleted", "2", "3"]
  with Checkpointer(directory, keep=2) as ck:
    assert ck.all_steps() == [2, 3] and ck.damaged_steps() == {}
    assert_state(ck.restore(state(0))[0], 3)
    ck.save(4, state(4), position(4))
  assert entries(directory) == ["3", "4"]


# --------------------------------------------------------------------------- #
# Damaged files of a real save
# --------------------------------------------------------------------------- #


def data_files(step_dir):
  """The state's TensorStore data files (under state/**/d/), largest first."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / "state")
           for f in fs if os.path.basename(d) == "d"]
  assert files, f"no data files under {step_dir / 'state'}"
  return sorted(files, key=os.path.getsize, reverse=True)


def damage(step_dir, kind):
  if kind == "data-truncated":
    for f in data_files(step_dir):
      os.truncate(f, os.path.getsize(f) // 2)
  elif kind == "data-deleted":      # the one holding the array bytes
    os.remove(data_files(step_dir)[0])
  elif kind == "data-bit-flipped":  # TensorStore reads it without complaint
    path = data_files(step_dir)[0]
    with open(path, "r+b") as f:
      f.seek(os.path.getsize(path) // 2)
      byte = f.read(1)[0]
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte ^ 0x10]))
  elif kind == "checkpoint-metadata":
    (step_dir / "_CHECKPOINT_METADATA").write_text("{\"item_handlers\": ")
  elif kind == "manifest":
    (step_dir / "state" / "manifest.ocdbt").write_bytes(b"\0garbage")
  elif kind == "state-metadata":
    path = step_dir / "state" / "_METADATA"
    os.truncate(path, os.path.getsize(path) // 2)
  elif kind == "position-truncated":
    path = step_dir / "position" / "metadata"
    os.truncate(path, os.path.getsize(path) // 2)
  elif kind == "position-garbage":
    (step_dir / "position" / "metadata").write_text("epoch: 3")
  elif kind == "position-deleted":
    os.remove(step_dir / "position" / "metadata")
  else:
    raise AssertionError(kind)


# Orbax leaves the reads it abandons after the first failure as coroutines that
# raise when collected; harmless, and not ours to silence globally.
quiet_abandoned_reads = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")

DAMAGE = {  # kind -> what the warning says
    "data-truncated": r"reading the state failed: .*OCDBT",
    "data-deleted": r"reading the state failed",
    "data-bit-flipped": r"the restored arrays differ from the ones saved \(their SHA-256 "
                        r"recorded in .*2/position/metadata does not match\)",
    "checkpoint-metadata": r"checkpoint metadata .*2/_CHECKPOINT_METADATA is not valid JSON",
    "manifest": r"reading the state failed: .*manifest",
    "state-metadata": r"state metadata .*2/state/_METADATA is not valid JSON",
    "position-truncated": r"position file .*2/position/metadata is not valid JSON",
    "position-garbage": r"position file .*2/position/metadata is not valid JSON",
    "position-deleted": r"position file .*2/position/metadata is missing",
}


@quiet_abandoned_reads
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_newest_falls_back_to_the_newest_intact(tmp_path, kind):
  directory = tmp_path / "ck"
  save_steps(directory, [1, 2])
  damage(directory / "2", kind)
  assert has_checkpoint(directory)
  with Checkpointer(directory) as ck:
    with pytest.warns(CheckpointWarning, match=r"ck: restored step 1, the newest intact "
                      r"checkpoint; skipped damaged newer ones: step 2: " + DAMAGE[kind]):
      restored, pos = ck.restore(state(0))
    assert_state(restored, 1) and pos == {"epoch": 1, "batch": 0} and ck.restored_step == 1
    assert ck.latest_step() == 1 and list(ck.damaged_steps()) == [2]
    # The resumed run saves step 2 again: the damaged one is moved aside, saying why.
    with pytest.warns(CheckpointWarning, match=r"moved checkpoint step 2 to .*set-aside"):
      ck.save(2, state(2), position(2))
  assert entries(directory) == ["1", "2", "set-aside"]
  [aside] = os.listdir(directory / "set-aside")
  assert "is at or after step 2" in (directory / "set-aside" / aside / "SET_ASIDE.txt").read_text()
  with warnings.catch_warnings():
    warnings.simplefilter("error", CheckpointWarning)
    with Checkpointer(directory) as ck:
      assert ck.all_steps() == [1, 2]
      assert_state(ck.restore(state(0))[0], 2)


@quiet_abandoned_reads
@pytest.mark.parametrize("kinds", [("data-truncated", "position-garbage"),
                                   ("manifest", "checkpoint-metadata")])
def test_no_intact_checkpoint_names_each_problem(tmp_path, kinds):
  directory = tmp_path / "ck"
  save_steps(directory, [1, 2])
  damage(directory / "1", kinds[0])
  damage(directory / "2", kinds[1])
  assert has_checkpoint(directory)           # a partial run: resuming must say what is wrong
  with Checkpointer(directory) as ck:
    with pytest.raises(ValueError) as info:
      ck.restore(state(0))
    msg = str(info.value)
    assert msg.startswith(f"{directory}: no intact checkpoint to restore; nothing was restored")
    assert re.search(r"step 2: " + DAMAGE[kinds[1]], msg), msg
    assert re.search(r"step 1: " + DAMAGE[kinds[0]], msg), msg
    assert ck.restored_step is None
    # A fresh start in the same folder is possible, and leaves no damaged step behind.
    with pytest.warns(CheckpointWarning, match="moved checkpoint step"):
      ck.save(1, state(1), position(1))
  assert entries(directory) == ["1", "set-aside"]
  assert len(os.listdir(directory / "set-aside")) == 2


def test_explicit_step_does_not_fall_back(tmp_path):
  directory = tmp_path / "ck"
  save_steps(directory, [1, 2])
  damage(directory / "2", "position-garbage")
  with Checkpointer(directory) as ck:
    with pytest.raises(ValueError, match=r"step 2: position file .* is not valid JSON"):
      ck.restore(state(0), step=2)
    with pytest.raises(ValueError, match=r"step: no finished checkpoint at step 7 .*\[1, 2\]"):
      ck.restore(state(0), step=7)
    assert_state(ck.restore(state(0), step=1)[0], 1)


# --------------------------------------------------------------------------- #
# The position against the state's step
# --------------------------------------------------------------------------- #


@flax.struct.dataclass
class Stepped:
  step: jnp.ndarray
  w: jnp.ndarray


def stepped(s):
  return Stepped(jnp.int32(s), jnp.full((4,), float(s)))


def edit_position(step_dir, edit, keep_record=True):
  path = step_dir / "position" / "metadata"
  data = json.loads(path.read_text())
  if not keep_record:
    del data[checkpoint.RECORD_KEY]
  data.update(edit)
  path.write_text(json.dumps(data))


def test_a_position_edited_by_hand_is_refused(tmp_path):
  directory = tmp_path / "ck"
  with Checkpointer(directory) as ck:
    for s in (3, 6):  # 3 batches per epoch
      ck.save(s, stepped(s), position(s, 3))
  edit_position(directory / "6", {"epoch": 5})
  with Checkpointer(directory) as ck:
    with pytest.warns(CheckpointWarning, match=r"step 6: position file .*6/position/metadata: "
                      r"the position .* does not match the checksum recorded"):
      restored, pos = ck.restore(stepped(0))
  assert int(restored.step) == 3 and pos == {"epoch": 1, "batch": 0}


def test_the_position_is_checked_against_steps_per_epoch(tmp_path):
  """A position without the checksum record (an older checkpoint, or an editor who
  removed it) is still checked against the state's step and ``steps_per_epoch``."""
  directory = tmp_path / "ck"
  with Checkpointer(directory) as ck:
    for s in (3, 6):
      ck.save(s, stepped(s), position(s, 3))
  edit_position(directory / "6", {"epoch": 5}, keep_record=False)
  with Checkpointer(directory) as ck:
    # Without steps_per_epoch nothing can tell (documented); the record-less position is
    # accepted as an older checkpoint's.
    assert ck.restore(stepped(0))[1] == {"epoch": 5, "batch": 0}
    with pytest.warns(CheckpointWarning, match=r"step 6: position file .* says epoch 5, batch "
                      r"0: step 15 at 3 steps per epoch, but the checkpoint is step 6"):
      restored, pos = ck.restore(stepped(0), steps_per_epoch=3)
    assert int(restored.step) == 3 and pos == {"epoch": 1, "batch": 0}
    with pytest.warns(CheckpointWarning, match=r"step 15 at steps_per_epoch\(epoch\) steps"):
      ck.restore(stepped(0), steps_per_epoch=lambda epoch: 3)
    with pytest.raises(ValueError, match=r"steps_per_epoch: expected a positive int"):
      ck.restore(stepped(0), steps_per_epoch=0)
  edit_position(directory / "6", {"epoch": 2, "batch": 0})
  with warnings.catch_warnings():
    warnings.simplefilter("error", CheckpointWarning)
    with Checkpointer(directory) as ck:
      restored, pos = ck.restore(stepped(0), steps_per_epoch=3)
      assert int(restored.step) == 6 and pos == {"epoch": 2, "batch": 0}
      restored, pos = ck.restore(stepped(0), steps_per_epoch=lambda e: 3)
      assert ck.restored_step == 6


def test_the_state_step_must_be_the_checkpoint_step(tmp_path):
  directory = tmp_path / "ck"
  with Checkpointer(directory) as ck:
    with pytest.raises(ValueError, match=r"step: expected the state's own step 4 "
                       r"\(int\(state.step\)\), got 5"):
      ck.save(5, stepped(4), position(5))
    ck.save(1, stepped(1), position(1))
    ck.save(2, stepped(2), position(2))
  # A step folder renamed by hand (its record removed too): the state says otherwise.
  os.rename(directory / "2", directory / "5")
  edit_position(directory / "5", {"epoch": 5}, keep_record=False)
  with Checkpointer(directory) as ck:
    with pytest.warns(CheckpointWarning, match=r"step 5: the state is at step 2, not the "
                      r"folder's step 5"):
      restored, _ = ck.restore(stepped(0))
  assert int(restored.step) == 1


def test_save_refuses_what_it_cannot_restore(tmp_path):
  with Checkpointer(tmp_path / "ck") as ck:
    with pytest.raises(ValueError, match=r"position: the key 'checkpoint' is reserved"):
      ck.save(1, state(1), {"epoch": 1, "batch": 0, "checkpoint": 1})
    with pytest.raises(ValueError, match=r"position: expected JSON-serialisable values"):
      ck.save(1, state(1), {"epoch": object()})
    ck.save(1, state(1), {"epoch": 1, "batch": 0, "sums": {"loss": 0.1 + 0.2, "n": 3}})
    assert ck.restore(state(0))[1] == {"epoch": 1, "batch": 0, "sums": {"loss": 0.1 + 0.2,
                                                                          "n": 3}}


# --------------------------------------------------------------------------- #
# Rotation, set-aside, readers
# --------------------------------------------------------------------------- #


def test_keep_n_rotation_with_async_saves(tmp_path):
  directory = tmp_path / "ck"
  with Checkpointer(directory, keep=2) as ck:
    for s in range(1, 6):
      ck.save(s, state(s), position(s))       # asynchronous; the next save waits
    assert ck.all_steps() == [4, 5]            # waits, then rotates
  assert entries(directory) == ["4", "5"]
  with Checkpointer(directory, keep=2) as ck:
    assert_state(ck.restore(state(0))[0], 5)


def test_restoring_an_older_step_and_saving_sets_the_newer_ones_aside(tmp_path):
  """Else the next resume would jump back to the abandoned line (mixed)."""
  directory = tmp_path / "ck"
  save_steps(directory, [1, 2, 3])
  with Checkpointer(directory) as ck:
    assert_state(ck.restore(state(0), step=1)[0], 1)
    with pytest.warns(CheckpointWarning) as record:
      ck.save(2, state(20), position(2))
    assert sorted(str(w.message).split(" to ")[0][-6:] for w in record) == ["step 2", "step 3"]
  with Checkpointer(directory) as ck:
    assert ck.all_steps() == [1, 2]
    assert_state(ck.restore(state(0))[0], 20)
  assert sorted(n.split("-")[0] for n in os.listdir(directory / "set-aside")) == ["2", "3"]


def test_readers_change_nothing(tmp_path):
  directory = tmp_path / "ck"
  assert not has_checkpoint(directory) and not directory.exists()
  with Checkpointer(directory, read_only=True) as ro:
    assert ro.all_steps() == [] and not directory.exists()
  save_steps(directory, [1, 2, 3])
  (directory / ("4" + TMP)).mkdir()         # another process's write in progress
  before = entries(directory)
  with Checkpointer(directory, keep=1) as a, Checkpointer(directory, keep=1, read_only=True) as b:
    assert a.all_steps() == b.all_steps() == [1, 2, 3]
    assert_state(a.restore(state(0))[0], 3)
    assert_state(b.restore(state(0), step=2)[0], 2)
    with pytest.raises(ValueError, match=r"ck: this Checkpointer is read-only; save refused"):
      b.save(4, state(4), position(4))
  assert entries(directory) == before


# --------------------------------------------------------------------------- #
# A failed write's threads
# --------------------------------------------------------------------------- #


class _FailingWriter(threading.Thread):
  """A writer thread that fails when it ends and, like Orbax's per-array threads,
  re-raises the failure from join()."""

  def __init__(self, work):
    super().__init__(name="array_writer")
    self._work = work

  def run(self):
    self._work()

  def join(self, timeout=None):
    super().join(timeout)
    raise OSError(27, "File too large")


class _SlowWriterManager:
  """The real Orbax manager, except that save() also starts a writer thread that ends
  0.5 s later (failing, as Orbax's per-array threads do on a full disk), and the write
  fails: synchronously in save() or later, in wait_until_finished()."""

  def __init__(self, real, fail_in_save):
    self._real, self._fail_in_save, self.ended = real, fail_in_save, []

  def __getattr__(self, name):
    return getattr(self._real, name)

  def save(self, step, **kwargs):
    _FailingWriter(lambda: (time.sleep(0.5), self.ended.append(step))).start()
    if self._fail_in_save:
      raise OSError(28, "No space left on device")
    return self._real.save(step, **kwargs)

  def wait_until_finished(self):
    self._real.wait_until_finished()
    if not self._fail_in_save and self._real.latest_step() == 2:
      raise ValueError("OUT_OF_RANGE: Error writing \"w/0.0\": File too large")


@pytest.mark.parametrize("fail_in_save", [False, True], ids=["later", "in-save"])
def test_a_failed_write_returns_only_after_its_threads_end(tmp_path, fail_in_save):
  """Orbax stops waiting at the first array that fails while the other arrays' threads
  still write, each logging its own traceback when it ends. The CheckpointWriteError
  comes only after the threads that write started have ended, so a runner's error
  message is the last thing it prints. Step 1 is intact and named."""
  with Checkpointer(tmp_path / "ck") as ck:
    ck.save(1, state(1), position(1))
    ck.wait()
    slow = ck._manager = _SlowWriterManager(ck._manager, fail_in_save)
    with pytest.raises(checkpoint.CheckpointWriteError,
                       match=r"checkpoint step 2 could not be written .*the newest complete "
                             r"checkpoint, step 1, is intact"):
      ck.save(2, state(2), position(2))
      ck.wait()
    assert slow.ended == [2]    # the writer thread had ended before the error was raised
    ck._manager = slow._real


class _TensorStoreFailureManager(_SlowWriterManager):
  """As Orbax reports a file-size limit: TensorStore's text names the OS error in the
  middle, followed by a long JSON spec of the array, and tags it with its code."""

  def wait_until_finished(self):
    self._real.wait_until_finished()
    if self._real.latest_step() == 2:
      spec = "{" + ", ".join(f'"key{i}": {i}' for i in range(80)) + "}"
      raise ValueError(f'OUT_OF_RANGE: Error opening "zarr" driver: Error writing "w/.zarray" '
                       f"in OCDBT database: Failed to write 904717 bytes to file 11: File too "
                       f"large [tensorstore_spec='{spec}'] [os_error_code='27']")


def test_a_tensorstore_failure_names_the_os_error_however_long_its_message(tmp_path):
  with Checkpointer(tmp_path / "ck") as ck:
    ck.save(1, state(1), position(1))
    ck.wait()
    real = ck._manager
    ck._manager = _TensorStoreFailureManager(real, fail_in_save=False)
    with pytest.raises(checkpoint.CheckpointWriteError) as err:
      ck.save(2, state(2), position(2))
      ck.wait()
    ck._manager = real
  message = str(err.value)
  assert "(ValueError: File too large [errno 27]: OUT_OF_RANGE: Error opening" in message
  assert len(message) < 700 and "step 1, is intact" in message
