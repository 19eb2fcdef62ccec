"""The UFM experiment (the default job): a shortened run produces its records, figure and summary."""

import json

import numpy as np
import pytest

from experiments import ufm


def test_short_run_writes_records_figure_and_summary(tmp_path, capsys):
  out = tmp_path / "ufm"
  results = ufm.main(["--iterations", "30", "--eval-every", "10", "--seeds", "0-1", "--out",
                      str(out), "--methods", ",".join(ufm.METHODS), "--quiet"])
  text = capsys.readouterr().out
  assert "it: NC1<0.01" in text and "CE lower bound 0.0342" in text
  assert (out / "ufm.png").stat().st_size > 10_000
  for method in ufm.METHODS:
    assert len(results[method]) == 2
    for seed in (0, 1):
      folder = out / method / f"seed-{seed}"
      config = json.loads((folder / "config.json").read_text())
      assert config["method"] == method and config["seed"] == seed
      records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
      assert [r["iteration"] for r in records] == [1, 10, 20, 30]
      assert records[-1]["loss"] < records[0]["loss"]       # it trains
      assert np.load(folder / "margins.npy").shape == (1000,)
  # The ablation without normalisation trains unnormalised features (norms drift from τ).
  assert results["standard-nonorm"][0]["history"][-1]["loss"] != results["standard"][0][
      "history"][-1]["loss"]
  # Seeds differ; the ETF methods are ETFs by construction.
  s0, s1 = (results["implicit"][i]["history"][-1]["loss"] for i in (0, 1))
  assert s0 != s1
  assert results["implicit"][0]["history"][-1]["nc2_etf"] < 1e-5


def test_finished_seeds_are_reused_and_changed_settings_refused(tmp_path, capsys):
  """Like the image sweeps: a re-run reuses finished seeds (identical results, no retraining),
  runs the missing ones, refuses a finished folder with other settings, and --overwrite
  trains again."""
  out = str(tmp_path / "ufm")
  argv = ["--iterations", "20", "--eval-every", "10", "--methods", "implicit", "--out", out,
          "--no-plot"]
  first = ufm.main(argv + ["--seeds", "1"])
  capsys.readouterr()
  again = ufm.main(argv + ["--seeds", "1-2"])
  text = capsys.readouterr().out
  assert "implicit seed 1: finished earlier, reused" in text
  assert "implicit seed 2: finished earlier" not in text
  assert again["implicit"][0]["history"] == first["implicit"][0]["history"]
  np.testing.assert_array_equal(again["implicit"][0]["margins"], first["implicit"][0]["margins"])
  with pytest.raises(ValueError, match=r"seed-1: finished with a different configuration "
                     r"\(lr: saved 0.01, now 0.02\); use --overwrite"):
    ufm.main(argv + ["--seeds", "1", "--lr", "0.02"])
  redone = ufm.main(argv + ["--seeds", "1", "--lr", "0.02", "--overwrite"])
  assert redone["implicit"][0]["history"] != first["implicit"][0]["history"]
  # A run that did not finish (no done.json) is run again, never reused.
  (tmp_path / "ufm" / "implicit" / "seed-2" / "done.json").unlink()
  capsys.readouterr()
  ufm.main(argv + ["--seeds", "2"])
  assert "finished earlier" not in capsys.readouterr().out


def test_nc1_first_iteration_and_summary_markers():
  history = [{"iteration": 1, "nc1": 1.0}, {"iteration": 10, "nc1": 0.05},
             {"iteration": 20, "nc1": 0.005}]
  assert ufm.first_iteration(history, "nc1", lambda v: v < 0.01) == 20
  assert ufm.first_iteration(history, "nc1", lambda v: v < 1e-4) is None


@pytest.mark.parametrize("text,want", [("3", (3,)), ("1-3", (1, 2, 3)), ("1,4,7", (1, 4, 7))])
def test_parse_seeds(text, want):
  assert ufm.parse_seeds(text) == want


@pytest.mark.parametrize("argv,match", [
    (["--methods", "standard,learned"], "--methods: expected a comma list of standard, fixed"),
    (["--preset", "ufm5"], "invalid choice: 'ufm5'"),
    (["--seeds", "a-b"], "--seeds: expected"),
    (["--dim", "5"], "--dim: the ETF methods need d >= K"),
    (["--iterations", "0"], "--iterations: expected a positive integer"),
    (["--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_flags_fail_clearly(argv, match, capsys):
  with pytest.raises(SystemExit) as exit_info:
    ufm.config_from_args(argv)
  assert exit_info.value.code == 2
  assert match in capsys.readouterr().err


def test_every_flag_has_a_help_text():
  parser = ufm.build_parser()
  for action in parser._actions:
    assert action.help and action.help.strip(), action.dest
    assert action.help.count("(default:") <= 1, action.help
