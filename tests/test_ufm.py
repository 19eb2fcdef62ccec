"""The UFM experiment (the default job): a shortened run produces its records, figure and summary."""

import csv
import json
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import run_folder, ufm

REPO = pathlib.Path(__file__).resolve().parents[1]


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


# --------------------------------------------------------------------------- #
# Interrupted runs: killed for real, then continued by the same command
# --------------------------------------------------------------------------- #

RESUME_ARGV = ["--iterations", "160", "--eval-every", "20", "--checkpoint-every", "20",
               "--seeds", "1", "--methods", "implicit", "--no-plot", "--quiet"]


def _ufm_process(out, *extra):
  return subprocess.Popen([sys.executable, "-m", "experiments.ufm", *RESUME_ARGV, "--out",
                           str(out), *extra], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _records(out):
  rows = [json.loads(line) for line in
          (out / "implicit" / "seed-1" / "metrics.jsonl").read_text().splitlines()]
  for row in rows:
    row.pop("seconds")  # wall clock: the only field an interruption may change
  return rows


def _wait_for_checkpoint(folder, proc, at_least=1):
  """Polls until ``folder`` holds ``at_least`` finished checkpoints (Orbax's temporary
  folders excluded) or the process exits."""
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline and proc.poll() is None:
    if folder.exists() and len([p for p in folder.iterdir() if p.name.isdigit()]) >= at_least:
      return
    time.sleep(0.05)
  raise AssertionError(f"no checkpoint in {folder} (process exit status {proc.poll()})")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  out = tmp_path_factory.mktemp("ufm-whole")
  proc = _ufm_process(out)
  assert proc.wait(timeout=300) == 0, proc.stderr.read()
  return out


@pytest.mark.parametrize("kill_after", [1, 3])
def test_sigkill_then_the_same_command_continues_to_identical_records(
    tmp_path, uninterrupted, kill_after):
  """SIGKILL (no chance to save) after the 1st or 3rd checkpoint: the same command resumes
  from the newest checkpoint and the records and margins equal the uninterrupted run's;
  the finished run keeps no checkpoints."""
  out = tmp_path / "ufm"
  folder = out / "implicit" / "seed-1"
  proc = _ufm_process(out)
  _wait_for_checkpoint(folder / "checkpoints", proc, at_least=min(kill_after, 2))
  if kill_after == 3:
    while proc.poll() is None and not (folder / "checkpoints" / "60").exists():
      time.sleep(0.05)
  proc.kill()
  proc.wait(timeout=60)
  assert not (folder / "done.json").exists()
  again = _ufm_process(out)
  stdout, stderr = again.communicate(timeout=300)
  assert again.returncode == 0, stderr
  assert "resuming at iteration" in stdout
  assert _records(out) == _records(uninterrupted)
  np.testing.assert_array_equal(np.load(folder / "margins.npy"),
                                np.load(uninterrupted / "implicit" / "seed-1" / "margins.npy"))
  assert not (folder / "checkpoints").exists()


def test_sigterm_checkpoints_and_stops_then_changed_settings_are_refused(tmp_path,
                                                                          uninterrupted):
  """SIGTERM: a checkpoint at the iteration reached, exit status 130 and a message. Resuming
  with another setting that changes the run is refused (the setting named); --overwrite
  starts again; the same command continues to the uninterrupted records."""
  out = tmp_path / "ufm"
  folder = out / "implicit" / "seed-1"
  proc = _ufm_process(out)
  _wait_for_checkpoint(folder / "checkpoints", proc)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 130, stderr
  assert re.search(r"implicit seed 1: stopped \(SIGTERM\) at iteration \d+, checkpointed", stderr)
  steps = sorted(int(p.name) for p in (folder / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and f"iteration {steps[-1]}," in stderr
  changed = _ufm_process(out, "--lr", "0.02")
  _, stderr = changed.communicate(timeout=120)
  assert changed.returncode == 2
  assert "was checkpointed with a different configuration (lr: saved 0.01, now 0.02)" in stderr
  assert "Traceback" not in stderr
  again = _ufm_process(out)
  stdout, stderr = again.communicate(timeout=300)
  assert again.returncode == 0, stderr
  assert f"resuming at iteration {steps[-1]}" in stdout
  assert _records(out) == _records(uninterrupted)
  # One environment line per segment that ran (the refused one wrote none), each with the
  # iteration it continued from and the command.
  segments = run_folder.RunFolder(folder).read_environment()
  assert [s["start"] for s in segments] == [{"iteration": 0}, {"iteration": steps[-1]}]
  assert all(s["command"] == "python -m experiments.ufm " + " ".join(
      RESUME_ARGV + ["--out", str(out)]) for s in segments)


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, uninterrupted):
  """The two newest checkpoints are kept: a damaged newest one (a data file truncated) is
  skipped with a warning, and the run continues from the older one to the same records."""
  out = tmp_path / "ufm"
  folder = out / "implicit" / "seed-1"
  proc = _ufm_process(out)
  _wait_for_checkpoint(folder / "checkpoints", proc, at_least=2)
  proc.kill()
  proc.wait(timeout=60)
  steps = sorted(int(p.name) for p in (folder / "checkpoints").iterdir() if p.name.isdigit())
  assert len(steps) == 2
  newest = folder / "checkpoints" / str(steps[-1]) / "state"
  data = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
  again = _ufm_process(out)
  stdout, stderr = again.communicate(timeout=300)
  assert again.returncode == 0, stderr
  assert f"resuming at iteration {steps[0]}" in stdout
  assert f"skipped damaged newer ones: step {steps[-1]}" in stderr
  assert _records(out) == _records(uninterrupted)


def _history(reach_nc1_at, final_nc1, iterations=400, every=20):
  """A UFM history whose NC1 drops below 1e-2 at ``reach_nc1_at`` (never if None)."""
  rows = []
  for it in [1] + list(range(every, iterations + 1, every)):
    below = reach_nc1_at is not None and it >= reach_nc1_at
    rows.append({"iteration": it, "top1": 100.0 if it >= 40 else 50.0,
                 "nc1": final_nc1 if below else 0.5, "loss": 1.0 / it, "nc3": 0.1,
                 "wh_equinorm": 0.01, "avg_cosine_margin": 1.0})
  return {"history": rows}


def test_tests_between_methods_have_known_answers(tmp_path):
  """Fully separated 5 v 5 seeds give the smallest p, 2/C(10, 5) = 0.0079, significant
  after Holm; identical groups p = 1; a method that never reaches a criterion is censored
  (and still separated); the tables and the CSV carry them."""
  results = {
      "standard": [_history(200 + 20 * i, 1e-3) for i in range(5)],
      "implicit": [_history(100 + 20 * (i % 4), 1e-3) for i in range(5)],
      "fixed": [_history(None, 0.5) for _ in range(5)],
  }
  rows = ufm.comparison_rows(results)
  find = {(r["metric"], r["table"].removeprefix("test_"), r["method"], r["vs"]): r
          for r in rows}
  r = find[("iterations_to_nc1_below_1e-02", "location", "implicit", "standard")]
  assert (r["n"], r["n_vs"], r["direction"]) == (5, 5, "<")
  assert r["p"] == pytest.approx(2 / 252) and r["p_holm"] < 0.05
  r = find[("iterations_to_nc1_below_1e-02", "location", "fixed", "standard")]
  assert (r["censored"], r["censored_vs"], r["direction"]) == (5, 0, ">")
  assert r["p"] == pytest.approx(2 / 252)
  r = find[("iterations_to_nc1_below_1e-02", "spread", "fixed", "standard")]
  assert r["p"] is None and r["n"] == 0          # censored values have no spread
  r = find[("iterations_to_top1_100", "location", "implicit", "standard")]
  assert r["p"] == 1.0 and r["direction"] == "="
  assert {(r["method"], r["vs"]) for r in rows} == {
      ("fixed", "standard"), ("implicit", "standard"), ("implicit", "fixed")}
  text = ufm.tests_markdown(rows)
  assert "| quantity | implicit vs standard | fixed vs standard | implicit vs fixed |" in text
  assert "| seeds; smallest p | 5 v 5; 0.0079 | 5 v 5; 0.0079 | 5 v 5; 0.0079 |" in text
  assert ("| iterations to NC1 < 0.01 | 0.0079 < * | 0.0079 > * (5/0 not reached) | "
          "0.0079 < * (0/5 not reached) |") in text
  path = tmp_path / "tests.csv"
  ufm.write_tests_csv(path, rows)
  with open(path, newline="") as f:
    table = list(csv.DictReader(f))
  assert len(table) == len(rows) and list(table[0]) == list(ufm.TESTS_CSV_COLUMNS)
  row = next(r for r in table if (r["table"], r["metric"], r["method"], r["vs"]) ==
             ("test_location", "iterations_to_nc1_below_1e-02", "implicit", "standard"))
  assert float(row["p"]) == pytest.approx(2 / 252) and row["direction"] == "<"
