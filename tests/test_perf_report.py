"""The performance report: a timed epoch end to end, and the one table from saved results."""

import json

from benchmarks import perf_report


def test_timed_epoch_and_missing_parts(tmp_path):
  text = perf_report.main(["--quick", "--out", str(tmp_path), "--skip", "solver,train_step",
                           "--epoch-args", "--source synthetic --num-examples 256"])
  assert "| solver | missing |" in text and "| train step | missing |" in text
  epoch = json.loads((tmp_path / "epoch.json").read_text())
  assert epoch["returncode"] == 0 and [r["epoch"] for r in epoch["records"]] == [1, 2]
  assert "4 steps" in text and "ms/step" in text          # 256 examples / batch 64
  assert (tmp_path / "report.md").read_text().strip() == text.strip()


def _env(kind):
  return {"device_kind": kind, "device_count": 1, "python": "3.12", "jax": "0.11.2",
          "date_utc": "2026-11-27"}


def _targets():
  """Targets exactly as the train-step benchmark writes them (its own function, stand-in timings)."""
  import types  # noqa: PLC0415

  from benchmarks import train_step  # noqa: PLC0415
  step = lambda head, batch, ms, ratio: train_step.HeadResult(
      k=10, batch=batch, head=head, m=types.SimpleNamespace(median_s=ms / 1e3), ratio=ratio)
  throughput = train_step.ThroughputResult(
      model="R18", batch=512, m=types.SimpleNamespace(median_s=0.1, xla_flops=None),
      nominal_flop_per_image=None, peak_tflops=None, peak_source="unknown device")
  return train_step.evaluate_targets(
      [step("standard", 128, 1.9, 1.0), step("implicit", 256, 2.4, 1.2)], throughput)


def test_table_from_saved_results(tmp_path):
  fb = lambda ms: {"forward_backward": {"median_ms": ms}}
  (tmp_path / "solver.json").write_text(json.dumps({"environment": _env("H100"), "results": [
      {"d": 512, "K": 10, "variant": "polar-svd", "skipped": None, **fb(0.5)},
      {"d": 512, "K": 10, "variant": "dense-ddn", "skipped": None, **fb(5.0)},
      {"d": 512, "K": 10, "variant": "polar-ns", "skipped": None, **fb(0.25)},
      {"d": 2048, "K": 1000, "variant": "polar-svd", "skipped": None, **fb(20.0)},
      {"d": 2048, "K": 1000, "variant": "dense-ddn", "skipped": "needs 1 TiB"}]}))
  from benchmarks import _common, train_step  # noqa: PLC0415

  def head(name, ms, ratio, dispatch_ms):
    """A head row exactly as the train-step benchmark writes it (its own classes)."""
    timing = _common.StepTiming(_common.Timing((ms / 1e3,)), (ms / 1e3,), 0.9 * ms / 1e3,
                                None, dispatch_ms / 1e3)
    m = train_step.StepMeasurement(timing, compile_s=1.0, compiled_bytes=None,
                                   device_peak=None, xla_flops=None)
    return train_step.HeadResult(10, 256, name, m, ratio, ratio).as_json()

  (tmp_path / "train_step.json").write_text(json.dumps({
      "environment": _env("H100"), "settings": {"head_model": "ResNet18"},
      "heads": [head("standard", 2.0, 1.0, 0.1), head("implicit", 2.4, 1.2, 2.0)],
      "throughput": {"model": "R18 bf16", "batch": 512, "images_per_s": 50000.0,
                     "tflops_nominal": 166.5, "tflops_xla": 150.0, "peak_fraction": 0.168,
                     "peak_source": "H100 SXM"},
      "targets": _targets()}))
  text = perf_report.render(tmp_path)
  assert "| solver fwd+bwd, d=512, K=10 (polar-svd, implicit VJP) | 0.5 ms | dense DDN 5 ms → 10× faster |" in text
  assert ("| solver fwd+bwd, d=512, K=10 (polar-ns, implicit VJP) | 0.25 ms | dense DDN 5 ms → 20× "
          "faster; 2× polar-svd's speed |") in text
  assert "dense DDN not run (needs 1 TiB)" in text
  assert ("| implicit/standard step ratio, K=10, B=256 | 1.200 | 2.4 ms (min-based ratio 1.200); "
          "host dispatch 2 of 2.16 ms back-to-back (93 %) |") in text
  assert ("| step of ResNet18, K=10, B=256 (standard head) | 2 ms | 128000 images/s; back-to-back "
          "1.8 ms; host dispatch 0.1 of 1.8 ms back-to-back (6 %) |") in text
  assert "50000 images/s" in text and "16.8% of peak (H100 SXM)" in text
  assert "| target: implicit/standard <= 1.05 at K=10, B=256 | 1.2 | MISSED |" in text
  assert "| target: standard step <= 2.0 ms at K=10, B=128 | 1.9 | met |" in text
  assert "| target: CIFAR-stem ResNet18 bf16 >= 30% of peak (B=512) | n/a | not measured |" in text
  assert "| epoch | missing |" in text
