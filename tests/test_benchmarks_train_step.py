"""The train-step benchmark stays runnable (a smoke run; timings are not asserted).

Runs in the test session's set-up (conftest: 8 fake CPU devices, x64 enabled), so
``--devices all`` exercises the data-parallel mesh path.
"""

import json

import jax

from benchmarks import train_step as train_step_benchmark


def test_train_step_benchmark_quick_run(tmp_path, capsys):
  out = tmp_path / "bench.json"
  assert train_step_benchmark.main(["--quick", "--json", str(out)]) == 0
  table = capsys.readouterr().out
  assert "Head overhead" in table and "× standard" in table and "Input pipeline" in table
  result = json.loads(out.read_text())
  assert result["settings"]["devices"] == len(jax.local_devices())

  rows = result["heads"]
  assert {r["head"] for r in rows} == set(train_step_benchmark.DEFAULT_HEADS)
  for r in rows:
    assert r["median_ms"] > 0 and r["images_per_s"] > 0 and r["repeats"] >= 1
    assert r["ratio_to_standard"] is not None and r["ratio_to_standard"] > 0
    assert r["back_to_back_ms"] > 0
  standard = [r for r in rows if r["head"] == "standard"]
  assert all(r["ratio_to_standard"] == 1.0 and r["head_overhead"] == 0.0 for r in standard)
  for r in rows:
    line = next(l for l in table.splitlines() if l.startswith(f"| {r['K']} | {r['batch']} | "
                                                               f"{r['head']} |"))
    assert f"{r['ratio_to_standard']:.3f}" in line  # the ratio column

  tp = result["throughput"]
  assert tp["median_ms"] > 0 and tp["images_per_s"] > 0 and tp["tflops_xla"] > 0

  plans = {r["plan"] for r in result["pipeline"]}
  assert plans == {"plain", "stratified"}
  for r in result["pipeline"]:
    for mode in ("dispatched", "in_jit"):
      assert r[mode]["images_per_s"] > 0 and r[mode]["batches_per_s"] > 0
