"""The benchmark scripts stay runnable (a smoke run; timings are not asserted)."""

import json

from benchmarks import solver as solver_benchmark


def test_solver_benchmark_quick_run(tmp_path, capsys):
  out = tmp_path / "bench.json"
  assert solver_benchmark.main(["--quick", "--json", str(out)]) == 0
  table = capsys.readouterr().out
  assert "polar-svd" in table and "dense-ddn" in table
  saved = json.loads(out.read_text())
  assert saved["complete"] is True          # (partial files say False while it runs)
  rows = saved["results"]
  measured = [r for r in rows if not r["skipped"]]
  assert {r["variant"] for r in measured} >= {"polar-svd", "polar-eigh", "rgd-warm", "dense-ddn"}
  for r in measured:
    assert r["forward_backward"]["median_ms"] > 0
    assert r["grad_rel_err_vs_float64"] < 1e-4  # a fast variant must also be a correct one
