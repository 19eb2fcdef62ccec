r"""The performance report: solver, train step and a timed epoch, in one table.

Run from the repository root::

    python -m benchmarks.perf_report --out perf/                  # runs everything
    python -m benchmarks.perf_report --quick --out /tmp/perf      # smoke run (CPU, minutes)
    python -m benchmarks.perf_report --from-json perf/            # re-render saved results

It runs, each in its own process (so one's compilation caches and memory do not
colour the next):

1. ``python -m benchmarks.solver --json <out>/solver.json`` — nearest-ETF forward+backward
   (polar-SVD with the implicit VJP) against the dense DDN port of the official backward;
2. ``python -m benchmarks.train_step --json <out>/train_step.json`` — implicit/standard and
   fixed/standard step ratios on the paper's ResNet18, and CIFAR-stem ResNet18 bf16
   images/s and fraction of peak;
3. a timed epoch: ``python -m experiments.<--epoch-experiment>`` (default
   ``fashion_mnist``) with the implicit method for two epochs (the first compiles); the
   epoch time is the second epoch's training time from its ``metrics.jsonl``, and
   the evaluation time (test split, and the NC metrics on train and test) is what the
   first epoch's record adds beyond training and compilation. Its data comes from
   ``--epoch-args`` (default: synthetic FashionMNIST-sized data, 60,000 examples).

and prints one Markdown table (also ``<out>/report.md``) with the environment of each
part. ``--solver-args`` and ``--step-args`` pass flags on to the two benchmarks (e.g.
``--step-args "--batches 256 --sections heads,throughput"``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time
from typing import Sequence

DEFAULT_EPOCH_ARGS = "--source synthetic --num-examples 60000"


def _run(cmd: list[str], log: pathlib.Path, timeout: float | None) -> int:
  print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
  t0 = time.perf_counter()
  with open(log, "w") as f:
    try:
      rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
      rc = 124
  print(f"  exit {rc} after {time.perf_counter() - t0:.0f} s (log: {log})", flush=True)
  return rc


def run_all(out: pathlib.Path, quick: bool, solver_args: str, step_args: str,
            epoch_experiment: str, epoch_args: str, timeout: float | None,
            skip: Sequence[str]) -> None:
  out.mkdir(parents=True, exist_ok=True)
  py = sys.executable
  q = ["--quick"] if quick else []
  if "solver" not in skip:
    _run([py, "-m", "benchmarks.solver", *q, "--json", str(out / "solver.json"),
          *shlex.split(solver_args)],
         out / "solver.log", timeout)
  if "train_step" not in skip:
    _run([py, "-m", "benchmarks.train_step", *q, "--json", str(out / "train_step.json"),
          *shlex.split(step_args)],
         out / "train_step.log", timeout)
  if "epoch" not in skip:
    runs = out / "epoch_runs"
    cmd = [py, "-m", f"experiments.{epoch_experiment}", "--method", "implicit", "--seed", "1",
           "--epochs", "2", "--nc-every", "1", "--quiet", "--no-plot", "--overwrite",
           "--checkpoint-every", "100", "--out", str(runs), *shlex.split(epoch_args)]
    if quick:
      cmd += ["--model", "mlp", "--batch-size", "64"]
    t0 = time.time()
    rc = _run(cmd, out / "epoch.log", timeout)
    run = runs / epoch_experiment / "implicit" / "seed-1"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
               if x.strip()] if (run / "metrics.jsonl").exists() else []
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() \
        else {}
    (out / "epoch.json").write_text(json.dumps({
        "returncode": rc, "command": " ".join(cmd[1:]), "records": records,
        "config": config, "started_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                       time.gmtime(t0))}, indent=1))


def _load(path: pathlib.Path):
  return json.loads(path.read_text()) if path.exists() else None


def _f(v, fmt=".3g", suffix=""):
  return "n/a" if v is None else format(v, fmt) + suffix


def _dispatch(r: dict) -> str:
  """Host time per back-to-back call, where measured (≈ back-to-back time: the step syncs)."""
  d, b = r.get("dispatch_ms"), r.get("back_to_back_ms")
  if d is None or not b:
    return ""
  return f"; host dispatch {d:.3g} of {b:.3g} ms back-to-back ({100 * d / b:.0f} %)"


def render(out: pathlib.Path) -> str:
  """The single table from the JSON files in ``out`` (missing parts are marked)."""
  solver, step, epoch = (_load(out / n) for n in ("solver.json", "train_step.json",
                                                  "epoch.json"))
  rows: list[tuple[str, str, str]] = []
  envs = []
  if solver:
    env = solver["environment"]
    envs.append(("solver", env))
    by = {}
    for r in solver["results"]:
      by.setdefault((r["d"], r["K"]), {})[r["variant"]] = r
    for (d, k), variants in sorted(by.items(), key=lambda x: (x[0][1], x[0][0])):
      ddn = variants.get("dense-ddn")
      svd = variants.get("polar-svd")
      t_svd = svd["forward_backward"]["median_ms"] if svd and not svd.get("skipped") else None
      for name, ours in variants.items():
        if name == "dense-ddn" or ours.get("skipped"):
          continue
        t = ours["forward_backward"]["median_ms"]
        if ddn and not ddn.get("skipped"):
          td = ddn["forward_backward"]["median_ms"]
          vs = f"dense DDN {td:.3g} ms → {td / t:.3g}× faster"
        else:
          vs = f"dense DDN not run ({(ddn or {}).get('skipped') or 'variant off'})"
        if name != "polar-svd" and t_svd:
          vs += f"; {t_svd / t:.3g}× polar-svd's speed"
        rows.append((f"solver fwd+bwd, d={d}, K={k} ({name}, implicit VJP)", f"{t:.3g} ms", vs))
  else:
    rows.append(("solver", "missing", "solver.json not found"))
  if step:
    envs.append(("train step", step["environment"]))
    heads = step.get("heads") or []
    model = step.get("settings", {}).get("head_model", "?")
    for r in heads:
      if r["head"] == "standard":
        rows.append((f"step of {model}, K={r['K']}, B={r['batch']} (standard head)",
                     f"{r['median_ms']:.3g} ms", f"{r['images_per_s']:.0f} images/s; "
                     f"back-to-back {r['back_to_back_ms']:.3g} ms{_dispatch(r)}"))
    for r in heads:
      if r["head"] != "standard":
        rows.append((f"{r['head']}/standard step ratio, K={r['K']}, B={r['batch']}",
                     f"{r['ratio_to_standard']:.3f}",
                     f"{r['median_ms']:.3g} ms (min-based ratio "
                     f"{r['ratio_to_standard_min']:.3f}){_dispatch(r)}"))
    tp = step.get("throughput")
    if tp:
      rows.append((f"throughput: {tp['model']}, B={tp['batch']}",
                   f"{tp['images_per_s']:.0f} images/s",
                   f"{_f(tp.get('tflops_nominal'))} TFLOP/s nominal, "
                   f"{_f(tp.get('tflops_xla'))} XLA count; "
                   f"{_f(tp['peak_fraction'] and 100 * tp['peak_fraction'], '.1f', '%')} of "
                   f"peak ({tp.get('peak_source')})"))
    for t in step.get("targets") or []:   # as written by train_step.evaluate_targets
      met = t.get("met")
      rows.append((f"target: {t['target']}", _f(t.get("value"), ".4g"),
                   "not measured" if met is None else ("met" if met else "MISSED")))
  else:
    rows.append(("train step", "missing", "train_step.json not found"))
  if epoch and len(epoch["records"]) >= 2:
    r1, r2 = epoch["records"][0], epoch["records"][1]
    cfg = epoch["config"].get("train_config", {})
    n = r2["step"] - r1["step"]
    b = cfg.get("batch_size")
    eval_s = (r2["elapsed"] - r1["elapsed"]) - r2["seconds"]
    rows.append((f"epoch: {cfg.get('model')} ({cfg.get('stem')} stem), implicit, "
                 f"{cfg.get('dataset')} {cfg.get('source')}, B={b}",
                 f"{r2['seconds']:.2f} s",
                 f"{n} steps, {1e3 * r2['seconds'] / n:.3g} ms/step, "
                 f"{n * b / r2['seconds']:.0f} images/s; then test eval + NC metrics "
                 f"(train and test) {eval_s:.2f} s"))
    envs.append(("epoch", {"device_kind": epoch["config"].get("machine"),
                           **epoch["config"].get("versions", {}),
                           "date_utc": epoch.get("started_utc")}))
  else:
    rows.append(("epoch", "missing", "epoch.json not found or the run did not finish "
                 "two epochs"))
  lines = ["| measurement | value | detail |", "|---|---|---|"]
  lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
  lines.append("")
  for name, env in envs:
    keys = ("device_kind", "device_count", "cpu_model", "python", "jax", "jaxlib", "date_utc")
    lines.append(f"- {name}: " + ", ".join(f"{k} {env[k]}" for k in keys if env.get(k)))
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
  p = argparse.ArgumentParser(prog="python -m benchmarks.perf_report", allow_abbrev=False,
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="perf", help="folder for the JSON files, logs and report.md")
  p.add_argument("--from-json", metavar="DIR", help="only render the table from DIR")
  p.add_argument("--quick", action="store_true", help="smoke sizes (CPU)")
  p.add_argument("--epoch-experiment", default="fashion_mnist",
                 choices=("mnist", "fashion_mnist", "cifar10", "cifar100", "stl10"))
  p.add_argument("--epoch-args", default=DEFAULT_EPOCH_ARGS,
                 help=f"data flags of the timed epoch (default: {DEFAULT_EPOCH_ARGS!r})")
  p.add_argument("--solver-args", default="", help="flags for benchmarks.solver")
  p.add_argument("--step-args", default="", help="flags for benchmarks.train_step")
  p.add_argument("--skip", default="", help="comma list of solver, train_step, epoch")
  p.add_argument("--timeout", type=float, default=None, help="seconds per part")
  args = p.parse_args(argv)
  skip = [s for s in args.skip.split(",") if s]
  bad = set(skip) - {"solver", "train_step", "epoch"}
  if bad:
    p.error(f"--skip: expected a comma list of solver, train_step, epoch; got {args.skip!r}")
  out = pathlib.Path(args.from_json or args.out)
  if not args.from_json:
    run_all(out, args.quick, args.solver_args, args.step_args, args.epoch_experiment, args.epoch_args, args.timeout, skip)
  text = render(out)
  (out / "report.md").write_text(text + "\n")
  print(text)
  return text


if __name__ == "__main__":
  os.environ.setdefault("PYTHONUNBUFFERED", "1")
  main()
