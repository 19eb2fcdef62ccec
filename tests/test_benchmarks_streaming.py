"""The streaming benchmark stays runnable (a smoke run; timings are not asserted)."""

import json

from benchmarks import streaming as streaming_benchmark


def test_streaming_benchmark_quick_run_and_baseline(tmp_path, capsys):
  first = tmp_path / "before.json"
  assert streaming_benchmark.main(["--quick", "--json", str(first)]) == 0
  table = capsys.readouterr().out
  assert "Streaming training path" in table and "| cifar | 64 |" in table
  saved = json.loads(first.read_text())
  default = saved["settings"]["default_threads"]
  rows = saved["rows"]
  assert {(r["case"], r["threads"], r["workers"]) for r in rows} == {
      ("cifar", default, 0), ("imagenet", default, 0)}
  for r in rows:
    assert r["images_per_s"] > 0 and r["first_batch_s"] > 0 and len(r["epochs"]) == 1
    assert r["epochs"][0]["batches"] == (16 if r["case"] == "cifar" else 4)
  second = tmp_path / "after.json"
  assert streaming_benchmark.main(["--quick", "--cases", "cifar", "--configs", "default,0",
                                   "--json", str(second), "--baseline", str(first)]) == 0
  table = capsys.readouterr().out
  after = json.loads(second.read_text())["rows"]
  assert [(r["threads"], r["workers"]) for r in after] == [(default, 0), (0, 0)]
  # the same configuration, else the baseline's default one
  assert all(r["ratio_to_baseline"] > 0 for r in after)
  assert "× baseline" in table
