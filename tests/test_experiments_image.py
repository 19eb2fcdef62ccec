"""The image experiments: CLI, every module end to end (smoke sizes), sweeps, resume, report.

Smoke runs use synthetic data (``--source synthetic``) or ``tfds.testing.mock_data``, the MLP
backbone or a narrow ResNet18, and one device unless a test is about data parallelism.
"""

import dataclasses
import importlib
import json
import os
import re
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import cli as cli_lib
from experiments import image, report, run_folder
from nc_jax.data.subsets import balanced_subset

SMOKE = ["--source", "synthetic", "--num-examples", "64", "--batch-size", "32", "--epochs", "2",
         "--nc-every", "1", "--devices", "1", "--quiet", "--checkpoint-every", "1"]
TIMING_KEYS = ("seconds", "elapsed", "nc_seconds")


def records(folder):
  return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def without_timings(record):
  return {k: v for k, v in record.items() if k not in TIMING_KEYS}


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def test_overrides_reach_the_train_config():
  options, cfg = cli_lib.parse_args("cifar10", [
      "--method", "implicit", "--epochs", "20", "--seed", "3", "--model", "vgg13",
      "--optimizer", "sgd", "--lr", "0.05", "--devices", "all", "--affine", "--no-stratified",
      "--tau", "2.5", "--factorisation", "eigh", "--out", "elsewhere"])
  assert options.methods == ("implicit",) and options.seeds == (3,)
  assert options.devices == "all" and options.out == "elsewhere"
  assert (cfg.dataset, cfg.model, cfg.optimizer, cfg.learning_rate, cfg.epochs) == (
      "cifar10", "vgg13", "sgd", 0.05, 20)
  assert cfg.affine is True and cfg.stratified is False and cfg.tau == 2.5
  assert cfg.factorisation == "eigh"
  run_cfg = cli_lib.config_for(cfg, "implicit-fo", 4)
  assert (run_cfg.head, run_cfg.forward_only, run_cfg.seed) == ("implicit", True, 4)


def test_defaults_are_the_paper_recipe():
  options, cfg = cli_lib.parse_args("mnist", [])
  assert options.methods == ("standard", "fixed", "implicit") and options.seeds == (1,)
  assert (cfg.dataset, cfg.model, cfg.stem, cfg.optimizer, cfg.batch_size, cfg.epochs,
          cfg.tau, cfg.affine) == ("mnist", "resnet18", "imagenet", "agd", 256, 200, 5.0, False)
  assert cli_lib.config_for(cfg, "implicit", 1).use_stratified
  assert not cli_lib.config_for(cfg, "standard", 1).use_stratified
  imagenet = cli_lib.parse_args("imagenet", [])[1]
  assert (imagenet.dataset, imagenet.model) == ("imagenet2012", "resnet50")   # d >= K = 1000


def test_every_train_config_field_is_a_flag():
  parser = cli_lib.build_parser("cifar100")
  dests = {a.dest for a in parser._actions}
  for field in dataclasses.fields(cli_lib.config_lib.TrainConfig):
    if field.name not in ("dataset", "head", "seed", "forward_only"):
      assert field.name in dests, field.name


def test_every_flag_has_one_help_text_with_at_most_one_default():
  """Each TrainConfig field's description (its metadata) is its flag's help; a default is
  shown once, and unset defaults are described in words, never as "None"."""
  parser = cli_lib.build_parser("fashion_mnist")
  text = parser.format_help()
  for action in parser._actions:
    if action.dest == "help":
      continue
    assert action.help and action.help.strip(), action.dest
    assert action.help.count("(default:") <= 1, action.help
  assert "None" not in text and "(default: %" not in text
  assert "--data-path" in text and "data_path" not in text.split("training configuration")[1]
  for field in dataclasses.fields(cli_lib.config_lib.TrainConfig):
    assert field.metadata["help"], field.name


def test_seed_and_method_lists():
  assert cli_lib.parse_seeds("1-5") == (1, 2, 3, 4, 5)
  assert cli_lib.parse_seeds("1,4,4,7") == (1, 4, 7)
  assert cli_lib.parse_methods("standard, implicit-fo") == ("standard", "implicit-fo")
  for bad in ("5-1", "a", "1-b", ""):
    with pytest.raises(ValueError, match="--seeds"):
      cli_lib.parse_seeds(bad)
  with pytest.raises(ValueError, match="unknown: etf"):
    cli_lib.parse_methods("standard,etf")


@pytest.mark.parametrize("argv, expected", [
    (["--epoch", "3"], "valid flags: .*--epochs"),                    # unknown flag
    (["--epoch", "3"], "did you mean --epochs"),
    (["--model", "resnet101"], "invalid choice: 'resnet101' \\(choose from '?resnet18"),
    (["--optimizer", "lion"], "invalid choice: 'lion'"),
    (["--methods", "standard,etf"], "--methods: expected a comma list of standard, fixed"),
    (["--seeds", "3-1"], "--seeds: expected"),
    (["--nc-every", "0"], "--nc-every: expected a positive integer, got 0"),
    (["--affine"], "affine: AGD cannot train 1-D parameters"),          # bad combination
    (["--model", "vgg13", "--width", "8"], "width: expected None or a positive integer"),
    (["--devices", "zero"], "--devices: expected 'all'"),
    (["--resume", "--overwrite"], "not allowed with argument"),
])
def test_bad_flags_fail_clearly(capsys, argv, expected):
  with pytest.raises(SystemExit) as err:
    cli_lib.parse_args("cifar10", argv)
  assert err.value.code == 2
  assert re.search(expected, capsys.readouterr().err)


def test_cli_max_steps_is_a_success_and_a_signal_is_not(tmp_path, monkeypatch):
  """--max-steps is a requested stop: exit 0 (was 130, like Ctrl-C); SIGTERM: 130."""
  argv = SMOKE + ["--model", "mlp", "--method", "implicit", "--no-plot", "--out", str(tmp_path)]
  monkeypatch.setattr(sys, "argv", ["cifar10"] + argv + ["--max-steps", "1"])
  assert image.cli("cifar10") is None
  import os  # noqa: PLC0415
  import signal  # noqa: PLC0415
  from nc_jax import loop  # noqa: PLC0415
  real_fit = loop.fit

  def fit_then_sigterm(*a, **kw):
    kw["on_step"] = lambda epoch, batch: os.kill(os.getpid(), signal.SIGTERM)
    return real_fit(*a, **kw)

  monkeypatch.setattr(loop, "fit", fit_then_sigterm)
  monkeypatch.setattr(sys, "argv", ["cifar10"] + argv + ["--resume"])
  with pytest.raises(SystemExit) as err:
    image.cli("cifar10")
  assert err.value.code == 130


def test_cli_reports_missing_data_without_traceback(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.fashion_mnist", "--source", "idx", "--data-path",
       str(tmp_path / "nowhere"), "--out", str(tmp_path), "--quiet"],
      cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
  assert "nowhere" in proc.stderr


def test_balanced_subset():
  labels = np.repeat(np.arange(4), [10, 10, 10, 3])
  ids = balanced_subset(labels, 14, 4)
  counts = np.bincount(labels[ids], minlength=4)
  assert counts.tolist() == [4, 4, 3, 3] and np.all(np.diff(ids) > 0)
  assert balanced_subset(labels, 100, 4) is None
  np.testing.assert_array_equal(ids, balanced_subset(labels, 14, 4))   # fixed


def test_select_devices():
  import jax
  assert len(cli_lib.select_devices("all")) == jax.device_count()
  assert cli_lib.select_devices("2") == jax.devices()[:2]
  assert cli_lib.select_devices("3,1") == [jax.devices()[3], jax.devices()[1]]
  with pytest.raises(ValueError, match="only"):
    cli_lib.select_devices(str(jax.device_count() + 1))


# --------------------------------------------------------------------------- #
# Every module end to end
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("module, extra", [
    ("mnist", ["--model", "mlp"]),
    ("cifar10", ["--model", "mlp"]),
    ("cifar100", ["--model", "mlp", "--num-examples", "200", "--batch-size", "100"]),
    ("stl10", ["--model", "mlp"]),
])
def test_module_smoke(tmp_path, module, extra):
  mod = importlib.import_module(f"experiments.{module}")
  outcomes = mod.main(SMOKE + ["--out", str(tmp_path), "--no-plot"] + extra)
  assert set(outcomes.values()) == {"done"} and len(outcomes) == 3
  for method in ("standard", "fixed", "implicit"):
    folder = tmp_path / module / method / "seed-1"
    recs = records(folder)
    assert [r["epoch"] for r in recs] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) and "test_top1" in r and "nc_test_nc1" in r
               for r in recs)
    assert (folder / "done.json").exists() and (folder / "margins.npy").exists()


def test_fashion_mnist_resnet_run_folder(tmp_path, capsys):
  """The paper's backbone (narrow), every file of a run folder, and the report on top."""
  from experiments import fashion_mnist
  argv = SMOKE + ["--out", str(tmp_path), "--width", "8", "--methods", "fixed,implicit",
                  "--seeds", "1-2", "--tensorboard", "auto"]
  assert set(fashion_mnist.main(argv).values()) == {"done"}
  folder = tmp_path / "fashion_mnist" / "implicit" / "seed-2"
  config = json.loads((folder / "config.json").read_text())
  assert config["train_config"]["width"] == 8 and config["train_config"]["stem"] == "imagenet"
  assert config["method"] == "implicit" and config["seed"] == 2
  assert config["versions"]["jax"] and config["machine"]
  assert config["train_config"]["factorisation"] == "auto"
  assert config["factorisation_resolved"] == "eigh"         # "auto" on CPU
  recs = records(folder)
  assert recs[-1]["step"] == 4 and recs[-1]["elapsed"] >= recs[0]["elapsed"]
  # The ETF classifier is exactly an ETF, so its NC2 is ~0.
  assert recs[-1]["nc_train_nc2_etf"] < 1e-4
  assert np.all(np.diff(np.load(folder / "margins.npy")) >= 0)             # sorted
  assert (folder / "metrics.png").stat().st_size > 5000
  assert (folder / "margins.png").stat().st_size > 5000
  assert (folder / "checkpoints").is_dir()
  from experiments import tb_writer
  assert any((folder / "tb").glob("events.*")) == tb_writer.available()
  # Seeds differ.
  other = records(tmp_path / "fashion_mnist" / "implicit" / "seed-1")
  assert other[-1]["train_loss"] != recs[-1]["train_loss"]
  # Running again skips the finished runs.
  capsys.readouterr()
  assert set(fashion_mnist.main(argv).values()) == {"skipped"}
  assert "finished earlier, skipped" not in capsys.readouterr().out   # --quiet
  # The report aggregates the folder.
  out = report.main([str(tmp_path / "fashion_mnist"), "--quiet"])
  result = out[str(tmp_path / "fashion_mnist")]
  assert sorted(result["runs"]) == ["fixed", "implicit"]
  assert (tmp_path / "fashion_mnist" / "report.md").exists()
  assert (tmp_path / "fashion_mnist" / "metrics.png").exists()


@pytest.mark.skipif(not importlib.util.find_spec("tensorboard"), reason="tensorboard missing")
def test_tensorboard_scalars(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator
  from experiments import cifar10
  cifar10.main(SMOKE + ["--out", str(tmp_path), "--model", "mlp", "--method", "implicit",
                        "--tensorboard", "true", "--no-plot"])
  folder = tmp_path / "cifar10" / "implicit" / "seed-1"
  acc = event_accumulator.EventAccumulator(str(folder / "tb"))
  acc.Reload()
  tags = acc.Tags()["scalars"]
  assert {"train/loss", "test/top1", "nc_train/nc1"} <= set(tags)
  loss = [e.value for e in acc.Scalars("train/loss")]
  np.testing.assert_allclose(loss, [r["train_loss"] for r in records(folder)], rtol=1e-6)


def test_imagenet_streams_from_tfds_mock(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from experiments import imagenet
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    outcomes = imagenet.main(
        ["--source", "tfds", "--batch-size", "8", "--epochs", "1", "--devices", "1",
         "--quiet", "--no-plot", "--method", "standard", "--model", "resnet18", "--width", "4",
         "--out", str(tmp_path)])
  # (K = 1000 > d = 32 here: only the standard head; the ETF heads need d >= K.)
  assert outcomes == {("standard", 1): "done"}
  recs = records(tmp_path / "imagenet" / "standard" / "seed-1")
  assert len(recs) == 1 and recs[0]["step"] == 2 and np.isfinite(recs[0]["train_loss"])
  assert "test_top1" in recs[0]
  # 16 mock images cannot hold all 1000 classes: the NC metrics are NaN, with a warning.
  assert np.isnan(recs[0]["nc_train_nc1"])


def test_mnist_default_source_is_tfds_mock(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from experiments import mnist
  with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
    outcomes = mnist.main(["--batch-size", "32", "--epochs", "1", "--devices", "1", "--quiet",
                           "--no-plot", "--method", "standard", "--model", "mlp", "--out",
                           str(tmp_path)])
  assert outcomes == {("standard", 1): "done"}


def test_data_parallel_equals_one_device(tmp_path):
  """--devices 4 (sharded jit over fake CPU devices) trains the same run as one device."""
  from experiments import cifar10
  argv = SMOKE + ["--model", "mlp", "--method", "implicit", "--no-plot", "--epochs", "1"]
  cifar10.main(argv + ["--out", str(tmp_path / "one")])
  cifar10.main(argv + ["--out", str(tmp_path / "four"), "--devices", "4"])
  a = records(tmp_path / "one" / "cifar10" / "implicit" / "seed-1")[-1]
  b = records(tmp_path / "four" / "cifar10" / "implicit" / "seed-1")[-1]
  for key in ("train_loss", "test_loss", "nc_train_nc1", "nc_test_nc3"):
    np.testing.assert_allclose(a[key], b[key], rtol=2e-4, err_msg=key)
  with pytest.raises(SystemExit):
    cifar10.main(argv + ["--out", str(tmp_path / "three"), "--devices", "3",
                         "--batch-size", "32"])


# --------------------------------------------------------------------------- #
# Interruption and resumption
# --------------------------------------------------------------------------- #


def test_imbalanced_noisy_run_records_class_metrics_and_resumes_bitwise(tmp_path):
  """--imbalance step --label-noise: the training set shrinks as the profile says, the
  records carry the imbalance metrics (per-class lists, minority collapse) and the
  reference-ETF distances (0 at the reference epoch 1), and a run stopped mid-epoch resumes
  to the same records (the reference ETFs are read back)."""
  from experiments import cifar10
  from nc_jax.data import imbalance
  argv = ["--source", "synthetic", "--num-examples", "128", "--batch-size", "32", "--epochs",
          "3", "--nc-every", "1", "--devices", "1", "--quiet", "--checkpoint-every", "1",
          "--model", "mlp", "--width", "16", "--method", "implicit", "--no-plot",
          "--imbalance", "step", "--imbalance-ratio", "2", "--label-noise", "0.1"]
  cifar10.main(argv + ["--out", str(tmp_path / "full")])
  full_folder = tmp_path / "full" / "cifar10" / "implicit" / "seed-1"
  full = records(full_folder)
  config = json.loads((full_folder / "config.json").read_text())["train_config"]
  assert (config["imbalance"], config["imbalance_ratio"], config["label_noise"]) == (
      "step", 2.0, 0.1)
  first = full[0]
  assert first["nc_train_w_etf_ref_dist"] == 0.0 and first["nc_test_h_etf_ref_dist"] == 0.0
  assert full[-1]["nc_train_h_etf_ref_dist"] > 0.0
  assert len(first["nc_train_top1_per_class"]) == 10
  # The implicit head's classifier is an ETF: its minority rows have cosine −1/(K−1).
  assert abs(first["nc_train_minority_cosine"] + 1 / 9) < 1e-6
  assert (full_folder / "reference_etf.npz").exists()
  per_class = np.bincount(np.arange(128) % 10)  # synthetic labels are balanced
  kept = imbalance.class_counts(per_class.min(), 10, "step", 2.0).sum()
  assert first["step"] == kept // 32
  part = argv + ["--out", str(tmp_path / "part")]
  assert cifar10.main(part + ["--max-steps", str(kept // 32 + 1)]) == {("implicit", 1): "stopped"}
  assert cifar10.main(part + ["--resume"]) == {("implicit", 1): "done"}
  resumed = records(tmp_path / "part" / "cifar10" / "implicit" / "seed-1")
  assert [without_timings(r) for r in resumed] == [without_timings(r) for r in full]


def test_resume_equals_uninterrupted(tmp_path, capsys):
  from experiments import cifar10
  argv = SMOKE + ["--model", "mlp", "--method", "implicit", "--epochs", "3", "--no-plot"]
  cifar10.main(argv + ["--out", str(tmp_path / "full")])
  part = argv + ["--out", str(tmp_path / "part")]
  # Stopped mid-epoch 2 (steps per epoch: 2).
  assert cifar10.main(part + ["--max-steps", "3"]) == {("implicit", 1): "stopped"}
  folder = tmp_path / "part" / "cifar10" / "implicit" / "seed-1"
  assert not (folder / "done.json").exists() and len(records(folder)) == 1
  with pytest.raises(ValueError, match="pass --resume to continue it or --overwrite"):
    cifar10.main(part)
  with pytest.raises(ValueError, match="different configuration \\(tau: saved 5.0, now 4.0"):
    cifar10.main(part + ["--resume", "--tau", "4"])
  assert cifar10.main(part + ["--resume"]) == {("implicit", 1): "done"}
  full = records(tmp_path / "full" / "cifar10" / "implicit" / "seed-1")
  resumed = records(folder)
  assert [r["epoch"] for r in resumed] == [1, 2, 3]
  # Every record is the uninterrupted run's, bitwise — epoch 2's training means too (the
  # epoch's running sums were checkpointed with the position).
  assert [without_timings(r) for r in resumed] == [without_timings(r) for r in full]
  assert "resuming at epoch 2, batch 1 (step 3)" in capsys.readouterr().out
  np.testing.assert_array_equal(np.load(folder / "margins.npy"),
                                np.load(tmp_path / "full" / "cifar10" / "implicit" / "seed-1"
                                        / "margins.npy"))
  # A finished run can be extended (--resume with more epochs), not shortened.
  with pytest.raises(ValueError, match="past --epochs 2; resume with --epochs >= 3"):
    cifar10.main(part + ["--resume", "--epochs", "2"])
  assert cifar10.main(part + ["--resume", "--epochs", "4"]) == {("implicit", 1): "done"}
  assert [r["epoch"] for r in records(folder)] == [1, 2, 3, 4]
  assert json.loads((folder / "done.json").read_text())["epochs"] == 4
  # One environment line per segment that ran, with where it started; the refused resumes
  # (no --resume, another tau, fewer epochs) wrote none.
  segments = run_folder.RunFolder(folder).read_environment()
  assert [s["start"] for s in segments] == [{"epoch": 0, "batch": 0}, {"epoch": 1, "batch": 1},
                                            {"epoch": 3, "batch": 0}]
  assert segments[0]["versions"]["jax"] == jax.__version__
  assert segments[0]["blas_threads"]["OPENBLAS_NUM_THREADS"] == os.environ.get(
      "OPENBLAS_NUM_THREADS")
  # --overwrite starts again, and so does the environment log.
  assert cifar10.main(part + ["--overwrite", "--epochs", "1"]) == {("implicit", 1): "done"}
  assert len(records(folder)) == 1
  assert [s["start"] for s in run_folder.RunFolder(folder).read_environment()] == [
      {"epoch": 0, "batch": 0}]
