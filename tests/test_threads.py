"""The BLAS thread policy of the command-line programs (experiments.threads): one thread
unless exported, set before JAX loads LAPACK, and recorded with every run segment."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

from experiments import threads

REPO = pathlib.Path(__file__).resolve().parents[1]
# Every module with a command line that runs JAX code (python -m experiments.<name>).
RUNNERS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "stl10", "imagenet", "ufm",
           "solver_demo")


def test_defaults_fill_only_what_the_caller_did_not_export(monkeypatch):
  for name in threads.BLAS_THREAD_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
  got = threads.set_blas_defaults()
  assert got == {"OPENBLAS_NUM_THREADS": "3", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
  assert threads.blas_threads_now() == got
  assert os.environ["OMP_NUM_THREADS"] == "1"
  monkeypatch.delenv("MKL_NUM_THREADS")
  assert threads.set_blas_defaults(2)["MKL_NUM_THREADS"] == "2"


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_count_is_a_clear_error(bad):
  with pytest.raises(ValueError, match=r"blas_threads: expected a positive integer, got"):
    threads.set_blas_defaults(bad)


def test_the_policy_modules_import_nothing_heavy():
  """They run before JAX: importing them must not load NumPy or JAX (whose BLAS would then
  have read the variables already)."""
  code = ("import sys, experiments.threads, experiments.run_folder, benchmarks; "
          "print(sorted(m for m in ('numpy', 'jax', 'scipy') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == "[]"


@pytest.mark.parametrize("name", RUNNERS)
def test_each_runner_sets_the_default_before_any_other_import(name):
  """The first statement after the docstring (and ``from __future__``) is the
  ``if __name__ == "__main__"`` block that calls ``threads.set_blas_defaults()``."""
  tree = ast.parse((REPO / "experiments" / f"{name}.py").read_text())
  body = [node for node in tree.body[1:]
          if not (isinstance(node, ast.ImportFrom) and node.module == "__future__")]
  first = body[0]
  assert isinstance(first, ast.If), ast.dump(first)[:200]
  assert ast.unparse(first.test) == "__name__ == '__main__'"
  calls = [ast.unparse(n.func) for n in ast.walk(first) if isinstance(n, ast.Call)]
  assert calls == ["threads.set_blas_defaults"]


def test_a_runner_records_the_threads_it_ran_with(tmp_path):
  """``python -m experiments.ufm`` with only OPENBLAS_NUM_THREADS exported: the others
  default to one thread, and the run's environment line records all three."""
  env = {k: v for k, v in os.environ.items() if k not in threads.BLAS_THREAD_VARIABLES}
  env["OPENBLAS_NUM_THREADS"] = "3"
  argv = ["--iterations", "1", "--eval-every", "1", "--seeds", "1", "--methods", "standard",
          "--no-plot", "--quiet", "--out", str(tmp_path)]
  subprocess.run([sys.executable, "-m", "experiments.ufm", *argv], cwd=REPO, env=env,
                 check=True, capture_output=True, timeout=300)
  lines = (tmp_path / "standard" / "seed-1" / "environment.jsonl").read_text().splitlines()
  assert len(lines) == 1
  segment = json.loads(lines[0])
  assert segment["blas_threads"] == {"OPENBLAS_NUM_THREADS": "3", "OMP_NUM_THREADS": "1",
                                     "MKL_NUM_THREADS": "1"}
  assert segment["start"] == {"iteration": 0}
  assert segment["command"] == "python -m experiments.ufm " + " ".join(argv)
  assert set(segment["versions"]) >= {"python", "jax", "jaxlib", "numpy"}
