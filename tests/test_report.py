"""The image-experiment report: statistics, tables, CSV, Markdown and figures on synthetic runs.

The run folders are written here by hand (3 methods × 3 seeds, 6 epochs, NC
every 2 epochs, plus a one-seed extra method), with values chosen so that the
expected medians, ranges, means, standard deviations and convergence epochs
are known (computed below with the ``statistics`` module, not numpy).
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
import statistics

import matplotlib
import numpy as np
import pytest
from scipy import stats as sps

from experiments import report

matplotlib.use("Agg")

EPOCHS = 6
NC_EVERY = 2
# train_top1 per epoch 1..6 (augmented running mean, %).
TRAIN_TOP1 = {
    "standard": {1: [60, 80, 95, 100, 100, 100], 2: [55, 75, 90, 98, 100, 100],
                 3: [50, 70, 85, 95, 97, 99]},
    "fixed": {1: [40, 50, 60, 70, 80, 90], 2: [45, 55, 65, 75, 85, 95],
              3: [50, 60, 70, 80, 90, float("nan")]},
    # Seed 3 is unfinished: four epochs, no done.json.
    "implicit": {1: [70, 90, 99, 100, 100, 100], 2: [65, 85, 95, 99, 100, 100],
                 3: [60, 80, 90, 95]},
}
# nc_train_nc1 at NC epochs 2, 4, 6.
NC1 = {
    "standard": {1: [0.2, 0.05, 0.0005], 2: [0.08, 0.02, 0.005], 3: [0.3, 0.2, 0.09]},
    "fixed": {1: [0.5, 0.4, 0.3], 2: [0.6, 0.5, 0.4], 3: [0.7, 0.6, 0.5]},
    "implicit": {1: [0.09, 0.009, 0.0009], 2: [0.1, 0.05, 0.005], 3: [0.2, 0.1]},
}
# nc_train_top1 (NC pass) at NC epochs 2, 4, 6.
NC_TOP1 = {
    "standard": {1: [80, 100, 100], 2: [70, 99, 100], 3: [60, 90, 95]},
    "fixed": {1: [50, 60, 70], 2: [50, 60, 70], 3: [50, 60, 70]},
    "implicit": {1: [95, 100, 100], 2: [90, 100, 100], 3: [90, 99]},
}
OTHER_NC = ("top5", "vci", "nc2_etf", "nc2_equinorm_w", "nc2_equinorm_h", "wh_equinorm", "nc3",
            "ncc_mismatch", "bias_collapse", "avg_cosine_margin", "w_etf_dist", "h_etf_dist",
            "wh_etf_dist")


def elapsed(epoch, seed):
  return 10.0 * epoch + seed


def other_nc(seed, epoch):
  """Every other NC metric: 0.1·seed + 0.01·epoch (so the last epoch shows in the value)."""
  return round(0.1 * seed + 0.01 * epoch, 10)


def make_run(root, method, seed, records, *, done=True, margins=None, config=None):
  folder = root / method / f"seed-{seed}"
  folder.mkdir(parents=True)
  cfg = {"experiment": "fashion_mnist", "method": method, "seed": seed,
         "train_config": {"dataset": "fashion_mnist", "model": "resnet18", "epochs": EPOCHS,
                          "batch_size": 256, "optimizer": "agd"},
         "machine": "test box", "versions": {"jax": "0.10.2", "numpy": "2.0"}}
  (folder / "config.json").write_text(json.dumps(config if config is not None else cfg))
  # json.dumps writes NaN as NaN, as the runner's records do.
  (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  if margins is not None:
    np.save(folder / "margins.npy", margins)
  if done:
    (folder / "done.json").write_text(json.dumps({"epochs": EPOCHS, "wall_seconds": 99.0}))
  (folder / "checkpoints").mkdir()         # ignored
  return folder


def records_for(method, seed):
  out = []
  for i, top1 in enumerate(TRAIN_TOP1[method][seed]):
    epoch = i + 1
    rec = {"epoch": epoch, "step": 10 * epoch, "seconds": 9.0, "elapsed": elapsed(epoch, seed),
           "train_loss": 1.0 / epoch, "train_top1": top1, "train_top5": 100.0,
           "test_loss": 1.5 / epoch, "test_top1": top1 - 5, "test_top5": 99.0}
    if epoch % NC_EVERY == 0:
      j = epoch // NC_EVERY - 1
      for split in ("train", "test"):
        rec[f"nc_{split}_nc1"] = NC1[method][seed][j] * (1 if split == "train" else 2)
        rec[f"nc_{split}_top1"] = NC_TOP1[method][seed][j] - (0 if split == "train" else 3)
        for key in OTHER_NC:
          rec[f"nc_{split}_{key}"] = other_nc(seed, epoch)
    out.append(rec)
  if method == "fixed" and seed == 2:
    out[-1]["nc_test_nc3"] = float("nan")
  if method == "standard" and seed == 1:
    out[-1]["train_loss"] = 0.0           # log axes must cope
  return out


@pytest.fixture
def experiment(tmp_path):
  root = tmp_path / "fashion_mnist"
  rng = np.random.default_rng(0)
  for method, seeds in TRAIN_TOP1.items():
    for seed in seeds:
      unfinished = method == "implicit" and seed == 3
      margins = None if (method == "fixed" and seed == 1) else rng.uniform(-1, 1, 40 + 10 * seed)
      make_run(root, method, seed, records_for(method, seed), done=not unfinished,
               margins=margins)
  # A fourth, unknown method sorts after the paper's; a seed folder without records is skipped.
  make_run(root, "ablation", 1, records_for("standard", 1))
  (root / "standard" / "seed-9").mkdir()
  (root / "standard" / "seed-9" / "config.json").write_text("{}")
  (root / "report-notes.txt").write_text("not a run")
  return root


def find(rows, table, method, metric, split="train", epoch=None):
  hits = [r for r in rows if (r["table"], r["method"], r["metric"], r["split"]) ==
          (table, method, metric, split) and (epoch is None or r["epoch"] == epoch)]
  assert len(hits) == 1, (table, method, metric, split, epoch, hits)
  return hits[0]


def check(row, values, total=3):
  assert row["n"] == len(values) and row["total"] == total
  assert row["median"] == pytest.approx(statistics.median(values))
  assert (row["min"], row["max"]) == (pytest.approx(min(values)), pytest.approx(max(values)))
  assert row["mean"] == pytest.approx(statistics.mean(values))
  sd = statistics.stdev(values) if len(values) > 1 else 0.0
  assert row["std"] == pytest.approx(sd)


def test_stats_ignores_none_and_nan():
  s = report.stats([3, None, float("nan"), 1, 2])
  assert s == {"n": 3, "median": 2.0, "min": 1.0, "max": 3.0, "mean": 2.0, "std": 1.0}
  assert report.stats([5.0])["std"] == 0.0
  assert report.stats([None, float("nan")]) == dict(n=0, median=None, min=None, max=None,
                                                    mean=None, std=None)


def test_first_reach():
  recs = [{"epoch": 1, "nc1": 0.5, "elapsed": 3.0}, {"epoch": 2}, {"epoch": 3, "nc1": float("nan")},
          {"epoch": 4, "nc1": 0.05, "elapsed": 12.5}]
  assert report.first_reach(recs, "nc1", lambda v: v < 0.1) == (4, 12.5)
  assert report.first_reach(recs, "nc1", lambda v: v < 0.01) is None


def test_load_runs(experiment, capsys):
  warnings = []
  runs = report.load_runs(experiment, warn=warnings.append)
  assert list(runs) == ["standard", "fixed", "implicit", "ablation"]
  assert [r.seed for r in runs["standard"]] == [1, 2, 3]
  assert len(warnings) == 1 and "seed-9" in warnings[0] and "no metrics.jsonl" in warnings[0]
  run = runs["implicit"][2]
  assert not run.finished and run.last_epoch == 4 and run.planned_epochs == 6
  assert report.unfinished(runs) == ["implicit seed 3 (epoch 4/6)"]
  assert runs["fixed"][0].margins is None and runs["fixed"][1].margins.shape == (60,)
  assert math.isnan(runs["fixed"][2].records[-1]["train_top1"])


def test_read_records_skips_bad_lines_and_keeps_the_resumed_epoch(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"epoch": 1, "x": 1}\n{"epoch": 2, "x": 2}\n\n{"epoch": 2, "x": 3}\n'
                  '{"epoch": 3, "x": 4')
  warnings = []
  recs = report.read_records(path, warn=warnings.append)
  assert [(r["epoch"], r["x"]) for r in recs] == [(1, 1), (2, 3)]
  assert len(warnings) == 1 and ":5: not JSON" in warnings[0]


def test_top1_table(experiment):
  runs = report.load_runs(experiment, warn=lambda _: None)
  assert report.default_epochs(runs) == [2, 3, 5, 6]
  rows = report.report_tables(runs, [1, 6])
  check(find(rows, "top1", "standard", "top1", "train", 6), [100, 100, 99])
  check(find(rows, "top1", "standard", "top1", "test", 1), [55, 50, 45])
  check(find(rows, "top1", "standard", "top1", "train", 1), [60, 55, 50])
  # NaN tolerated (n reduced); a run that stopped early is left out at epoch 6.
  check(find(rows, "top1", "fixed", "top1", "train", 6), [90, 95])
  check(find(rows, "top1", "implicit", "top1", "train", 6), [100, 100])
  check(find(rows, "top1", "ablation", "top1", "train", 6), [100], total=1)


def test_final_nc_table(experiment):
  runs = report.load_runs(experiment, warn=lambda _: None)
  rows = report.report_tables(runs, [6])
  row = find(rows, "final_nc", "standard", "nc1", "train")
  check(row, [0.0005, 0.005, 0.09])
  assert row["epoch"] == 6
  check(find(rows, "final_nc", "standard", "nc1", "test"), [0.001, 0.01, 0.18])
  check(find(rows, "final_nc", "standard", "top1", "train"), [100, 100, 95])
  check(find(rows, "final_nc", "standard", "nc3", "train"), [0.16, 0.26, 0.36])
  # NaN at the last NC epoch is left out, not replaced by an earlier value.
  check(find(rows, "final_nc", "fixed", "nc3", "test"), [0.16, 0.36])
  # The unfinished seed (3, last NC epoch 4) is not a final state: left out, total kept.
  row = find(rows, "final_nc", "implicit", "wh_equinorm", "train")
  check(row, [0.16, 0.26])
  assert row["epoch"] == 6
  # ... unless no run of the method finished.
  only_unfinished = {"implicit": [r for r in runs["implicit"] if not r.finished]}
  row = find(report.report_tables(only_unfinished, [6]), "final_nc", "implicit", "wh_equinorm",
             "train")
  assert row["n"] == 1 and row["epoch"] == 4


def test_convergence_table(experiment):
  runs = report.load_runs(experiment, warn=lambda _: None)
  rows = report.report_tables(runs, [6])
  # standard: train_top1 hits 100 at epochs 4 (seed 1) and 5 (seed 2); seed 3 never.
  check(find(rows, "convergence", "standard", "epochs_to_train_top1_100"), [4, 5])
  # 99.9 % is reached no later than 100 %.
  lenient = find(rows, "convergence", "standard", "epochs_to_train_top1_99.9")
  assert lenient["n"] >= 2 and lenient["max"] <= 5
  check(find(rows, "convergence", "standard", "seconds_to_train_top1_100"),
        [elapsed(4, 1), elapsed(5, 2)])
  check(find(rows, "convergence", "standard", "epochs_to_nc_train_top1_100"), [4, 6])
  check(find(rows, "convergence", "standard", "epochs_to_nc1_below_1e-01"), [4, 2, 6])
  check(find(rows, "convergence", "standard", "epochs_to_nc1_below_1e-02"), [6, 6])
  check(find(rows, "convergence", "standard", "seconds_to_nc1_below_1e-03"), [elapsed(6, 1)])
  check(find(rows, "convergence", "implicit", "epochs_to_nc1_below_1e-01"), [2, 4])
  for metric in ("epochs_to_train_top1_100", "epochs_to_nc1_below_1e-01"):
    row = find(rows, "convergence", "fixed", metric)
    assert row["n"] == 0 and row["total"] == 3 and row["median"] is None


def test_main_writes_report_csv_and_figures(experiment, tmp_path, capsys):
  out = tmp_path / "out"
  results = report.main([str(experiment), "--epochs", "6,1", "--out", str(out)])
  captured = capsys.readouterr()
  result = results[str(experiment)]
  assert result["epochs"] == [1, 6]
  md = (out / "report.md").read_text()
  assert md == result["markdown"] and md in captured.out
  assert f"wrote {out / 'report.csv'}" in captured.out
  assert "warning:" in captured.err and "seed-9" in captured.err
  for text in ("# Report: fashion_mnist", "## Top-1 accuracy (%) at chosen epochs",
               "## Final neural-collapse metrics", "## Convergence",
               "dataset: fashion_mnist; model: resnet18; optimizer: agd; batch size: 256; "
               "epochs: 6", "- standard: seeds 1, 2, 3 (3 runs, 3 finished)",
               "- implicit: seeds 1, 2, 3 (3 runs, 2 finished)", "machine: test box",
               "versions: jax 0.10.2; numpy 2.0", "unfinished: implicit seed 3 (epoch 4/6)",
               "| standard | 6 | 3/3 | 100.00 [99.00, 100.00] | 99.67 ± 0.58 |",
               "| nc1 | standard | 6 | 3/3 | 5.00e-03 [5.00e-04, 9.00e-02] |",
               "| nc3 | fixed | 6 | 3/3 | 0.2600 [0.1600, 0.3600] | 0.2600 ± 0.1000 | 2/3 |",
               "| standard | train top-1 = 100 % (running mean) | 2/3 | 4.5 [4, 5] | "
               "46.5 [41.0, 52.0] |",
               "| fixed | train NC1 < 1e-03 | 0/3 | – | – | not reached (3 of 3) |",
               "| standard | train top-1 = 100 % (running mean) | 2/3 | 4.5 [4, 5] | "
               "46.5 [41.0, 52.0] | not reached (1 of 3) |",
               "| implicit | train top-1 = 100 % (running mean) | 2/3 | 4.5 [4, 5] | "
               "46.5 [41.0, 52.0] | not reached (1 of 3) |",
               # Final metrics: fixed vs standard (3 finished each) comes first.
               "| quantity | fixed vs standard | implicit vs standard | ablation vs standard | "
               "implicit vs fixed |", "| seeds; smallest p | 3 v 3; 0.1 |",
               # fixed {6+, 6+, 6+} (censored at 6) vs standard {4, 5, 6+}: Gehan scores
               # {2, 2, 2} vs {-5, -3, 2}; |S| >= 6 in 8 of 20 relabellings. implicit {4, 5, 4+}
               # (seed 3 stopped at epoch 4: undecided against 5 and 6+) vs fixed: scores
               # {-5, -2, 1} vs {2, 2, 2}, only the observed split and its mirror: 2/20.
               "| train top-1 ≥ 99.9 % (running mean) | 0.4 > n.s. (3/1 not reached) | "
               "1 < n.s. (1/1 not reached) | 0.75 < n.s. (0/1 not reached) | "
               "0.1 < n.s. (1/3 not reached) |"):
    assert text in md, text
  assert md.index("| standard |") < md.index("| fixed |") < md.index("| implicit |") < \
      md.index("| ablation |")

  with open(out / "report.csv", newline="") as f:
    table = list(csv.DictReader(f))
  assert list(table[0]) == list(report.CSV_COLUMNS)
  assert len(table) == len(result["rows"])
  row = next(r for r in table if (r["table"], r["method"], r["split"], r["epoch"]) ==
             ("top1", "standard", "train", "6"))
  assert (int(row["n"]), int(row["total"])) == (3, 3)
  assert float(row["median"]) == 100.0 and float(row["min"]) == 99.0
  assert float(row["mean"]) == pytest.approx(statistics.mean([100, 100, 99]), rel=1e-12)
  assert float(row["std"]) == pytest.approx(statistics.stdev([100, 100, 99]), rel=1e-12)
  row = next(r for r in table if (r["method"], r["metric"]) ==
             ("fixed", "seconds_to_nc1_below_1e-01"))
  assert (row["n"], row["total"], row["median"], row["epoch"]) == ("0", "3", "", "")

  for name in ("metrics.png", "margins.png"):
    data = (out / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
  assert set(result["paths"]) == {"markdown", "csv", "metrics", "margins"}


def test_default_output_is_the_experiment_folder_and_several_folders(experiment, tmp_path,
                                                                     capsys):
  other = tmp_path / "other" / "cifar10"
  make_run(other, "fixed", 1, records_for("fixed", 1),
           config={"train_config": {"epochs": 6}})     # no optional keys
  results = report.main([str(experiment), str(other), "--quiet", "--no-plot"])
  out = capsys.readouterr().out
  assert "# Report" not in out
  assert (experiment / "report.md").exists() and (other / "report.csv").exists()
  assert not (experiment / "metrics.png").exists()
  md = results[str(other)]["markdown"]
  assert md.startswith("# Report: cifar10") and "machine: ?" in md
  assert results[str(experiment)]["epochs"] == [2, 3, 5, 6]
  results = report.main([str(experiment), str(other), "--quiet", "--no-plot", "--out",
                         str(tmp_path / "reports")])
  assert (tmp_path / "reports" / "fashion_mnist" / "report.md").exists()
  assert (tmp_path / "reports" / "cifar10" / "report.md").exists()


def test_plots_tolerate_missing_data(tmp_path):
  run = report.Run("implicit", 1, tmp_path, {}, [{"epoch": 1, "train_top1": 50.0,
                                                  "nc_train_nc1": 0.0}])
  assert report.plot_margins({"implicit": [run]}, tmp_path / "m.png") is None
  path = report.plot_metrics({"implicit": [run]}, tmp_path / "metrics.png")
  assert path.stat().st_size > 1000
  assert report.plot_metrics({"implicit": [report.Run("implicit", 1, tmp_path, {}, [])]},
                             tmp_path / "none.png") is None


@pytest.mark.parametrize("argv,match", [
    (["--epochs", "abc"], "--epochs: expected a comma list of positive integers, got 'abc'"),
    (["--epochs", "0,10"], "--epochs: expected a comma list of positive integers"),
    (["--epochs", "10,"], "--epochs: expected a comma list of positive integers"),
    (["--epoch", "10"], "unrecognized arguments: --epoch"),
])
def test_bad_flags_fail_clearly(experiment, argv, match, capsys):
  with pytest.raises(SystemExit) as exit_info:
    report.main([str(experiment), *argv])
  assert exit_info.value.code == 2
  assert match in capsys.readouterr().err


def test_missing_or_empty_folder_fails_clearly(tmp_path, capsys):
  for folder, what in ((tmp_path / "nope", "no such folder"), (tmp_path, "no runs found")):
    with pytest.raises(SystemExit) as exit_info:
      report.main([str(folder), "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{folder}: {what}" in err and "<dir>/<method>/seed-<n>/metrics.jsonl" in err


def test_ufm_run_folders_are_refused_clearly(tmp_path, capsys):
  """UFM records are per iteration: one clear line, not a report of skipped lines."""
  folder = tmp_path / "ufm" / "implicit" / "seed-1"
  folder.mkdir(parents=True)
  (folder / "metrics.jsonl").write_text('{"iteration": 1, "loss": 2.3}\n')
  with pytest.raises(SystemExit) as err:
    report.main([str(tmp_path / "ufm")])
  assert err.value.code == 2
  assert "UFM run folders (records per iteration, not per epoch)" in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# Tests between methods, on constructed folders with known answers
# --------------------------------------------------------------------------- #

P_5V5 = 2 / 252          # 2 / C(10, 5): the smallest two-sided p for 5 vs 5 seeds
TEST_EPOCHS = 12
# Epoch at which train top-1 first reaches 100 % (None: never within TEST_EPOCHS).
REACH = {"standard": [8, 9, 9, 10, 11], "fixed": [None] * 5, "implicit": [3, 3, 4, 4, 5],
         "implicit-fo": [8, 9, 9, 10, 11]}
# Final train NC3 per seed: known spreads (fixed five times standard's; implicit a shift).
FINAL_NC3 = {"standard": [1, 2, 3, 4, 5], "fixed": [0, 5, 10, 15, 20],
             "implicit": [11, 12, 13, 14, 15], "implicit-fo": [1, 2, 3, 4, 5]}


def reach_records(reach, nc3, seed):
  """train top-1 100 from epoch ``reach`` on (never if None); NC metrics every 2 epochs."""
  out = []
  for epoch in range(1, TEST_EPOCHS + 1):
    top1 = 100.0 if reach is not None and epoch >= reach else 90.0 + 0.5 * epoch
    rec = {"epoch": epoch, "elapsed": 10.0 * epoch, "train_top1": top1,
           "test_top1": 80.0 + seed}
    if epoch % 2 == 0:
      rec.update(nc_train_nc1=0.5 / epoch, nc_test_nc1=0.6 / epoch, nc_train_nc3=nc3,
                 nc_test_nc3=nc3)
    out.append(rec)
  return out


def make_reach_experiment(root, reach=REACH, nc3=FINAL_NC3):
  for method, epochs in reach.items():
    for seed, (r, v) in enumerate(zip(epochs, nc3[method]), 1):
      make_run(root, method, seed, reach_records(r, v, seed))
  return root


def comparison_row(rows, table, method, vs, metric, split="train"):
  hits = [r for r in rows if (r["table"], r["method"], r["vs"], r["metric"], r["split"]) ==
          (table, method, vs, metric, split)]
  assert len(hits) == 1, (table, method, vs, metric, split)
  return hits[0]



def test_comparison_pairs():
  assert report.comparison_pairs(["standard", "fixed", "implicit", "implicit-fo", "ablation"]) == [
      ("fixed", "standard"), ("implicit", "standard"), ("implicit-fo", "standard"),
      ("ablation", "standard"), ("implicit", "fixed"), ("implicit", "implicit-fo")]
  assert report.comparison_pairs(["implicit", "fixed"]) == [("implicit", "fixed")]
  assert report.comparison_pairs(["standard"]) == []
  assert report.BASELINE == "standard"
  assert report.CLAIM_PAIRS == (("implicit", "fixed"), ("implicit", "implicit-fo"),
                                ("implicit", "fixed-dotreg"))
  assert report.comparison_pairs(["standard", "fixed", "implicit", "fixed-dotreg"]) == [
      ("fixed", "standard"), ("implicit", "standard"), ("fixed-dotreg", "standard"),
      ("implicit", "fixed"), ("implicit", "fixed-dotreg")]


def test_time_to_censors_at_the_last_checked_epoch():
  recs = [{"epoch": 1, "x": 1.0}, {"epoch": 2, "x": 0.5}, {"epoch": 3}, {"epoch": 4, "x": 0.2},
          {"epoch": 5, "x": float("nan")}]
  run = report.Run("implicit", 1, None, {}, recs)
  assert report.time_to(run, "x", lambda v: v < 0.6) == (2, False)
  assert report.time_to(run, "x", lambda v: v < 0.1) == (4, True)
  assert report.time_to(run, "y", lambda v: v < 0.1) is None


def test_convergence_tests_known_answers(tmp_path):
  runs = report.load_runs(make_reach_experiment(tmp_path / "exp"), warn=lambda _: None)
  rows = report.report_tables(runs, [TEST_EPOCHS])
  metric = "epochs_to_train_top1_100"
  # {3,3,4,4,5} against {8,9,9,10,11}: complete separation, p = 2/252, earlier.
  row = comparison_row(rows, "test_location", "implicit", "standard", metric)
  assert row["p"] == pytest.approx(P_5V5) and row["p_min"] == pytest.approx(P_5V5)
  assert (row["direction"], row["statistic"], row["n"], row["n_vs"]) == ("<", -25.0, 5, 5)
  assert (row["censored"], row["censored_vs"], row["total"]) == (0, 0, 5)
  assert row["test"] == "permutation, Gehan scores (Mann-Whitney), two-sided"
  # Identical distributions: p = 1.
  row = comparison_row(rows, "test_location", "implicit-fo", "standard", metric)
  assert (row["p"], row["direction"], row["statistic"]) == (1.0, "=", 0.0)
  # Never reached (censored at epoch 12) against always reached: the minimal p, later.
  for method, vs, direction in (("fixed", "standard", ">"), ("implicit", "fixed", "<")):
    row = comparison_row(rows, "test_location", method, vs, metric)
    assert row["p"] == pytest.approx(P_5V5) and row["direction"] == direction
    assert (row["n"], row["n_vs"]) == (5, 5)
    assert (row["censored"], row["censored_vs"]) == ((5, 0) if method == "fixed" else (0, 5))
  # Holm over the row's five comparisons: four at 2/252 → 4 · 2/252 ... 5 · 2/252 < 0.05.
  family = [r for r in rows if r["table"] == "test_location" and r["metric"] == metric]
  assert len(family) == 5
  assert sorted(r["p_holm"] for r in family) == pytest.approx([5 * P_5V5] * 4 + [1.0])
  # Spread of the epochs (reached only): no test with no reaching run, else as scipy's W.
  row = comparison_row(rows, "test_spread", "fixed", "standard", metric)
  assert row["p"] is None and (row["n"], row["censored"]) == (0, 5)
  row = comparison_row(rows, "test_spread", "implicit", "standard", metric)
  ref = sps.levene(REACH["implicit"], REACH["standard"], center="median")
  assert row["statistic"] == pytest.approx(ref.statistic)
  assert row["p_approx"] == pytest.approx(ref.pvalue)
  assert row["test"] == "Brown-Forsythe, permutation of the deviations"
  # The convergence statistics rows are unchanged in kind: n = seeds that got there.
  assert find(rows, "convergence", "fixed", metric)["n"] == 0


def test_final_metric_tests_known_answers(tmp_path):
  runs = report.load_runs(make_reach_experiment(tmp_path / "exp"), warn=lambda _: None)
  rows = report.report_tables(runs, [TEST_EPOCHS])
  # Spread: five times the spread (deviations {0,1,1,2,2} vs {0,5,5,10,10}).
  row = comparison_row(rows, "test_spread", "fixed", "standard", "nc3")
  ref = sps.levene(FINAL_NC3["fixed"], FINAL_NC3["standard"], center="median")
  assert row["statistic"] == pytest.approx(ref.statistic)
  assert row["p_approx"] == pytest.approx(ref.pvalue)
  assert row["p"] == pytest.approx(12 / 252) and row["p_min"] == pytest.approx(4 / 252)
  assert row["direction"] == ">"
  # A shift only: equal spread (W = 0, p = 1) but a complete location separation.
  row = comparison_row(rows, "test_spread", "implicit", "standard", "nc3", "test")
  assert (row["statistic"], row["p"], row["direction"]) == (0.0, 1.0, "=")
  row = comparison_row(rows, "test_location", "implicit", "standard", "nc3", "test")
  assert row["p"] == pytest.approx(P_5V5) and row["direction"] == ">"
  # Final test top-1 (80 + seed in every method): identical, p = 1.
  row = comparison_row(rows, "test_location", "implicit", "standard", "top1_last_epoch", "test")
  assert (row["p"], row["n"], row["n_vs"]) == (1.0, 5, 5)
  # NC1 decreases identically in every run: p = 1; a metric no run recorded: no test.
  assert comparison_row(rows, "test_location", "fixed", "standard", "nc1")["p"] == 1.0
  row = comparison_row(rows, "test_location", "fixed", "standard", "nc2_etf")
  assert row["p"] is None and row["p_holm"] is None and row["n"] == 0


def test_three_seeds_are_never_significant(tmp_path):
  reach = {"standard": [6, 7, 8], "implicit": [2, 3, 4]}
  nc3 = {"standard": [1, 2, 3], "implicit": [1, 2, 3]}
  runs = report.load_runs(make_reach_experiment(tmp_path / "exp", reach, nc3),
                          warn=lambda _: None)
  rows = report.report_tables(runs, [TEST_EPOCHS])
  row = comparison_row(rows, "test_location", "implicit", "standard", "epochs_to_train_top1_100")
  assert row["p"] == pytest.approx(0.1) and row["p_min"] == pytest.approx(0.1)
  assert row["p_holm"] >= report.ALPHA
  md = report.render_markdown(tmp_path / "exp", runs, rows)
  assert "| seeds; smallest p | 3 v 3; 0.1 |" in md
  assert "| train top-1 = 100 % (running mean) | 0.1 < n.s. |" in md
  assert " * |" not in md and " n.s. |" in md       # 2/C(6, 3) = 0.1: nothing can be


def test_report_without_comparable_methods_says_so(tmp_path):
  root = tmp_path / "exp"
  make_run(root, "fixed", 1, reach_records(3, 1.0, 1))
  runs = report.load_runs(root, warn=lambda _: None)
  rows = report.report_tables(runs, [TEST_EPOCHS])
  assert not [r for r in rows if r["table"].startswith("test_")]
  md = report.render_markdown(root, runs, rows)
  assert md.count("No tests between methods") == 1 and "### Tests" not in md


def test_cli_end_to_end_with_tests(tmp_path):
  import subprocess
  import sys
  root = make_reach_experiment(tmp_path / "exp")
  proc = subprocess.run([sys.executable, "-m", "experiments.report", str(root), "--no-plot",
                         "--quiet"], capture_output=True, text=True, timeout=300,
                        cwd=pathlib.Path(report.__file__).resolve().parents[1])
  assert proc.returncode == 0, proc.stderr
  md = (root / "report.md").read_text()
  for text in ("### Tests between methods: final metrics", "### Tests between methods: epochs "
               "to each criterion", "| quantity | fixed vs standard | implicit vs standard | "
               "implicit-fo vs standard | implicit vs fixed | implicit vs implicit-fo |",
               "| seeds; smallest p | 5 v 5; 0.0079 |",
               "| train top-1 = 100 % (running mean) | 0.0079 > * (5/0 not reached) | "
               "0.0079 < * | 1 = n.s. | 0.0079 < * (0/5 not reached) | 0.0079 < * |",
               "| fixed | train top-1 = 100 % (running mean) | 0/5 | – | – | "
               "not reached (5 of 5) |",
               "| standard | train top-1 = 100 % (running mean) | 5/5 | 9 [8, 11] | "
               "90.0 [80.0, 110.0] | – |",
               "smallest attainable p (2/C(n1+n2, n1) without ties: 0.0079 for 5 v 5, 0.1 for "
               "3 v 3", "Holm's correction over the row's comparisons", "right-censored",
               "Brown–Forsythe", "Spread:", "| train nc3 |"):
    assert text in md, text
  assert "| train nc2_etf |" not in md            # no run recorded it: CSV only
  assert "## Figures" not in md and "png)" not in md  # --no-plot: nothing drawn, none linked
  with open(root / "report.csv", newline="") as f:
    table = list(csv.DictReader(f))
  # The existing columns keep their place; the tests' columns come after them.
  assert list(table[0])[:12] == ["table", "method", "metric", "split", "epoch", "n", "median",
                                 "min", "max", "mean", "std", "total"]
  assert list(table[0])[12:] == list(report.TEST_COLUMNS)
  row = next(r for r in table if (r["table"], r["method"], r["vs"], r["metric"]) ==
             ("test_location", "implicit", "standard", "epochs_to_train_top1_100"))
  assert float(row["p"]) == pytest.approx(P_5V5, rel=1e-12)
  assert float(row["p_holm"]) == pytest.approx(5 * P_5V5, rel=1e-12)
  assert (row["n"], row["n_vs"], row["direction"], row["median"]) == ("5", "5", "<", "")
  row = next(r for r in table if (r["table"], r["method"], r["vs"], r["metric"]) ==
             ("test_spread", "fixed", "standard", "nc3"))
  assert float(row["p"]) == pytest.approx(12 / 252) and float(row["p_approx"]) > 0
  stat_row = next(r for r in table if r["table"] == "top1")
  assert all(stat_row[c] == "" for c in report.TEST_COLUMNS)


def test_imbalance_metrics_appear_only_when_recorded(tmp_path):
  """A balanced experiment's report has no minority rows and no per-class section; one whose
  runs recorded the imbalance metrics reports their medians per method, and each class's
  test top-1 and NC1 (tables, CSV rows, figure) with the minority classes marked."""
  balanced, imbalanced = tmp_path / "balanced", tmp_path / "imbalanced"
  for root, extra in ((balanced, {}), (imbalanced, {"minority_collapse": 0.25,
                                                    "top1_minority": 40.0})):
    for method in ("standard", "implicit"):
      for seed in (1, 2):
        recs = records_for(method, seed)
        for rec in recs:
          for split in ("train", "test"):
            if f"nc_{split}_nc1" in rec:
              rec.update({f"nc_{split}_{k}": v * seed for k, v in extra.items()})
              if extra:                # 4 classes; class 3 falls with the seed (and method)
                rec[f"nc_{split}_top1_per_class"] = [
                    100.0, 80.0, 60.0, 40.0 - 10 * seed - (5 if method == "implicit" else 0)]
                rec[f"nc_{split}_nc1_per_class"] = [1e-3 * seed, 2e-3, None, 4e-3]
        config = None
        if extra:
          config = {"experiment": "fashion_mnist", "method": method, "seed": seed,
                    "train_config": {"dataset": "fashion_mnist", "imbalance": "longtail",
                                     "imbalance_ratio": 10.0, "minority_fraction": 0.5}}
        make_run(root, method, seed, recs, config=config)
  for root in (balanced, imbalanced):
    report.main([str(root), "--quiet"])
  text = (balanced / "report.md").read_text()
  assert "minority_collapse" not in text and "## Per class" not in text
  assert not (balanced / "per_class.png").exists()
  assert "(metrics.png)" in text and "per_class.png" not in text
  text = (imbalanced / "report.md").read_text()
  row = next(line for line in text.splitlines()
             if line.startswith("| minority_collapse | implicit |"))
  assert "0.3750 [0.2500, 0.5000]" in row       # median [min, max] over seeds 1, 2
  assert "| top1_minority | standard |" in text
  section = text[text.index("## Per class"):text.index("## Convergence")]
  assert ("`longtail` imbalance, ratio 10 (largest / smallest class; sizes falling "
          "exponentially from class 0 to class 3); minority classes (m): 2–3.") in section
  assert section.count("| method | n | 0 | 1 | 2 m | 3 m |") == 3
  # Class 3's test top-1: standard seeds {30, 20} → 25, implicit {25, 15} → 20.
  assert "| standard | 2 | 100.00 | 80.00 | 60.00 | 25.00 |" in section
  assert "| implicit | 2 | 100.00 | 80.00 | 60.00 | 20.00 |" in section
  # Train NC1: class 0 {1e-3, 2e-3} → 1.5e-3; class 2 recorded as null (NaN): no value.
  assert "| standard | 2 | 1.50e-03 | 2.00e-03 | – | 4.00e-03 |" in section
  with open(imbalanced / "report.csv", newline="") as f:
    table = [r for r in csv.DictReader(f) if r["table"] == "per_class"]
  assert len(table) == 2 * 3 * 4                 # methods × PER_CLASS × classes
  row = next(r for r in table if (r["method"], r["metric"], r["split"]) ==
             ("implicit", "top1_class_3", "test"))
  assert (float(row["min"]), float(row["max"]), row["n"], row["epoch"]) == (
      15.0, 25.0, "2", str(EPOCHS))
  assert (imbalanced / "per_class.png").stat().st_size > 0
  # report.md shows the figures this call drew, by file name (it sits beside them).
  assert text.index("## Figures") > text.index("## Convergence")
  for name in ("metrics", "per_class"):
    assert f"![{report.FIGURES[name]}]({name}.png)" in text
