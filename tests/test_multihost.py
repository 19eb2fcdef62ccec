"""Multi-host data parallelism: 2 CPU processes on localhost equal 1 process."""

import os
import socket
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(__file__), "_multihost_worker.py")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return str(s.getsockname()[1])


def _run(processes, out, timeout=240):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(processes), port, str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(processes)]
  try:
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return np.load(out)


def test_two_processes_equal_one(tmp_path):
  two = _run(2, tmp_path / "two.npz")
  one = _run(1, tmp_path / "one.npz")
  assert int(two["processes"]) == 2 and int(two["devices"]) == 4
  assert int(one["processes"]) == 1 and int(one["devices"]) == 2
  keys = [k for k in one.files if k not in ("processes", "devices")]
  assert set(keys) == set(two.files) - {"processes", "devices"} and len(keys) > 5
  for key in keys:
    np.testing.assert_allclose(two[key], one[key], rtol=1e-9, atol=1e-11, err_msg=key)
