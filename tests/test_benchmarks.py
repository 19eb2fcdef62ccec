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
  assert "polar-ns" in {r["variant"] for r in measured}


def test_solver_accuracy_study_small_grid(tmp_path, capsys):
  from benchmarks import solver_accuracy  # noqa: PLC0415

  out = tmp_path / "acc.json"
  text = solver_accuracy.main(["--sizes", "64x10", "--deltas", "1e-3", "--seeds", "2",
                               "--json", str(out)])
  assert text in capsys.readouterr().out
  saved = json.loads(out.read_text())
  assert len(saved["rows"]) == 4 and len(saved["summary"]) == 2   # 2 kinds x 2 seeds
  for row in saved["rows"]:
    assert 0.3 < row["sigma_min_over_delta"] <= 1.0 + 1e-9          # σ_min(B) <= δ, exactly
    bound = 4 * row["kappa"] * 1.2e-7                                 # κ·eps, float32
    for f in ("svd", "eigh", "qdwh", "newton_schulz"):
      assert row[f]["p_err"] < bound and row[f]["grad_err"] < bound
  assert "| 64 | 10 | 0.001 | training |" in text
