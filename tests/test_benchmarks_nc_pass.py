"""The NC-pass benchmark stays runnable (a smoke run; timings are not asserted)."""

import argparse
import json

import pytest

from benchmarks import nc_pass


def test_nc_pass_benchmark_quick_run(tmp_path, capsys):
  out = tmp_path / "nc_pass.json"
  assert nc_pass.main(["--quick", "--json", str(out)]) == 0
  table = capsys.readouterr().out
  assert "with and without the numerical rank" in table and "| 10 | 32 | 200 |" in table
  saved = json.loads(out.read_text())
  (row,) = saved["rows"]
  assert (row["classes"], row["dim"], row["samples"]) == (10, 32, 200)
  assert len(row["rounds"]["with_rank"]) == len(row["rounds"]["without_rank"]) == 1
  assert row["with_rank_s"] > 0 and row["without_rank_s"] > 0
  assert row["ratio"] == pytest.approx(row["with_rank_s"] / row["without_rank_s"])
  assert saved["environment"]["command"]


@pytest.mark.parametrize("text", ["200:512", "2:1:10", "200:512:x", "1:8:10"])
def test_nc_pass_sizes_are_validated(text):
  with pytest.raises(argparse.ArgumentTypeError, match="--sizes"):
    nc_pass.parse_sizes(text)
  assert nc_pass.parse_sizes("200:512:100,10:32:20") == [(200, 512, 100), (10, 32, 20)]
