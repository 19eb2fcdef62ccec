r"""Benchmark of the training step: head overhead, bf16 throughput, input pipeline.

Run from the repository root::

    python -m benchmarks.train_step                     # full run, Markdown to stdout
    python -m benchmarks.train_step --quick             # tiny MLP, smoke run (< 1 min on CPU)
    python -m benchmarks.train_step --sections heads --classes 100 --batches 256 --json out.json

Three sections (``--sections``, default all):

1. **heads** — the paper's backbone, ResNet18 with the torchvision (ImageNet) stem and
   non-affine BatchNorm (``models.create('resnet18', stem='imagenet', affine=False)``,
   docs/method.md §10.2), float32, on 32×32×3 float32 inputs, trained with AGD (gain 10, the
   released scripts' optimiser, docs/method.md §10.1; ``--optimizer sgd`` for SGD with
   momentum 0.9, lr 0.05, weight decay 5e-4), τ = 5, cross-entropy. For every
   K ∈ ``--classes`` and batch B ∈ ``--batches`` and every head in ``--heads``:
   ``standard`` (learned classifier, rows renormalised), ``fixed`` (canonical ETF),
   ``implicit`` (nearest ETF with the library's default ``factorisation="auto"`` — the
   matmul-only Newton–Schulz solve on GPUs, chosen inside the compiled program — and the
   implicit backward; the paper's method) and ``implicit-fo``
   (the same with ``forward_only``: no gradient through P, the paper's "without DDN
   gradient" ablation); optional extras ``implicit-svd``, ``implicit-eigh``,
   ``implicit-qdwh``, ``implicit-ns`` (a fixed polar factorisation; ``ns`` = matrix products
   only) and ``implicit-rgd`` (warm-started
   Riemannian gradient descent). The timed function is the library's compiled,
   state-donating step, :func:`nc_jax.train.compile_train_step`, compiled ahead of
   time (compile time reported, never timed). Each head gets a fresh AGD-initialised
   state (:func:`nc_jax.optim.agd_init`) and takes its first step through the jitted
   function (for the implicit head a program of its own, the one with the feasibility
   solve: ``HeadState.initialised`` is static); the steady-state program every later step
   runs is then compiled ahead of time and takes ``--warmup-steps`` (default 2) untimed
   steps. Then N rounds
   in which every head of the (K, B) group takes one step in turn (interleaved, the
   first head rotating from round to round, so that drifts of the machine hit all
   heads alike), each step ended by ``jax.block_until_ready`` on the new state:
   "ms/step" is the median of a head's N.
   "× standard" is the ratio of medians to the standard head of the same (K, B),
   and "head overhead" = ratio − 1: the fraction of a standard step that the head's
   extra work costs. "back-to-back ms" is the mean over N more steps dispatched with a
   single block at the end (host dispatch overlapping device work, as in a training
   loop); "host dispatch ms" is the part of it the host spent in the calls themselves,
   before that block: much smaller means asynchronous dispatch, about equal means the
   step waits for the device (a host synchronisation inside it, e.g. a conditional's
   predicate or a synchronising library call). All steps of a row reuse one fixed batch (random normal images; labels
   ``arange(B) mod K`` shuffled, so every class is present, as with stratified batches).

2. **throughput** — CIFAR-stem ResNet18 (``stem='cifar'``: 3×3 stride-1 stem, no
   max-pool; not the paper's backbone), bfloat16 compute with float32 parameters,
   standard head, K = 10, batch ``--throughput-batch`` (default 512), the same optimiser
   and timing. Achieved TFLOP/s = 3.33 GFLOP per image per training step (the issue's
   nominal count: forward ≈ 1.11 GFLOP, backward ≈ 2×) × images/s; "XLA TFLOP/s" uses
   XLA's own count of the compiled step instead. "% of peak" divides by
   ``--peak-tflops`` (default ``auto``: 989 dense bf16 TFLOP/s for an H100/H200 SXM,
   835 for an H100 NVL, 756 for an H100 PCIe; unknown elsewhere, printed n/a).

3. **pipeline** — the device-resident input pipeline alone (no model): synthetic uint8
   CIFAR-shaped images ``(--pipeline-examples, 32, 32, 3)`` (default 50,000, CIFAR's
   training set) and balanced labels (K = 10) on the default device; per epoch a plan
   from :func:`nc_jax.data.batching.epoch_indices` (plain shuffle or stratified), then
   every batch through :func:`nc_jax.data.batching.make_batch` with the ``cifar10``
   ``train_spec`` (random crop with 4-pixel zero padding, horizontal flip, normalise) under
   ``jit``. Two ways, both timed per epoch including the plan: "dispatched" mirrors
   :class:`nc_jax.pipeline.DevicePipeline` (plan copied to the host, one jitted gather+augment call per
   batch, its index row sent to the device, the augmentation key derived on device);
   "in-jit" runs the whole epoch in one compiled ``fori_loop`` (each batch written to the
   loop carry, so it is materialised), the device-side cost the batch adds when, as in
   :meth:`nc_jax.pipeline.DevicePipeline.compile`, it is built inside the train step.

Data parallelism (``--devices``, default ``all``): with more than one local device the
heads and throughput steps run data-parallel through
``compile_train_step(make_mesh(devices), ...)`` (replicated state, batch sharded along
``"data"``; every batch size must be a multiple of the device count); the pipeline
always runs on one device.

``--quick`` replaces both models with a small MLP (3072→64→64, non-affine BN, no biases;
bf16 compute for the throughput section), uses K = 10, B = 16, a throughput batch of 32, a
2,048-image pipeline, one warm-up step and 3 timed steps: a smoke run. Its TFLOP/s
come from XLA's count, and the issue's targets are not evaluated.

Repeats: adaptive, about 1 s of timed steps per row (N = 1 s / the mean of the group's
last warm-up steps), at least 3 and at most 200 (so the ResNet18 rows on a CPU, ~1 s per
step, take 3), unless ``--repeats`` fixes the number.

Memory. "compiled MiB" is XLA's static estimate of the step executable (temp + arguments
+ outputs − aliased (donated) bytes); "device peak MiB" the allocator peak above the
memory live before a row's warm-up steps, where the backend reports it (GPU/TPU; "≤":
upper bound only, see :class:`benchmarks._common.DevicePeak`). The states of a (K, B)
group's heads are all resident while it is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Sequence

from benchmarks import set_thread_defaults

set_thread_defaults()  # before JAX and its LAPACK are loaded

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _common as common  # noqa: E402
from nc_jax import train  # noqa: E402
from nc_jax.config import METHOD_VARIANTS, METHODS, TrainConfig  # noqa: E402
from nc_jax.data import batching, registry  # noqa: E402

# Head variants: name -> the TrainConfig head fields that make it: the methods of
# nc_jax.config.METHOD_VARIANTS, then the implicit head with each factorisation and solver.
HEAD_VARIANTS: dict[str, dict[str, Any]] = {
    **{name: {"head": v.head, "forward_only": v.forward_only, **dict(v.options)}
       for name, v in METHOD_VARIANTS.items()},
    "implicit-svd": {"head": "implicit", "factorisation": "svd"},
    "implicit-eigh": {"head": "implicit", "factorisation": "eigh"},
    "implicit-qdwh": {"head": "implicit", "factorisation": "qdwh"},
    "implicit-ns": {"head": "implicit", "factorisation": "newton_schulz"},
    "implicit-rgd": {"head": "implicit", "solver": "rgd"},
}
# --optimizer -> the TrainConfig optimiser fields.
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "agd": {"optimizer": "agd"},
    "sgd": {"optimizer": "sgd", "learning_rate": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
}
DEFAULT_HEADS = tuple(m for m in METHODS if not METHOD_VARIANTS[m].options)  # the four heads
BASELINE = "standard"
DEFAULT_BATCHES = (128, 256)
DEFAULT_CLASSES = (10, 100)
QUICK_BATCHES = (16,)
QUICK_CLASSES = (10,)
THROUGHPUT_BATCH = 512
QUICK_THROUGHPUT_BATCH = 32
THROUGHPUT_CLASSES = 10
PIPELINE_EXAMPLES = 50_000
QUICK_PIPELINE_EXAMPLES = 2048
PIPELINE_DATASET = "cifar10"
IMAGE_SHAPE = (32, 32, 3)
TAU = 5.0
SECTIONS = ("heads", "throughput", "pipeline")
# Issue's nominal count for the CIFAR-stem ResNet18: FLOPs per image per training step.
NOMINAL_FLOP_PER_IMAGE = 3.33e9
# Dense bf16 peaks (TFLOP/s) by device_kind substring; first match wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("H200", 989.0))
# Targets of the issue (measured on an H100).
TARGET_RATIO = 1.05
TARGET_STANDARD_MS = 2.0
TARGET_STANDARD_BATCH = 128
TARGET_PEAK_FRACTION = 0.30


# --------------------------------------------------------------------------- #
# Models, optimiser, state
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class BenchModel:
  """A backbone as :class:`nc_jax.config.TrainConfig` fields (``model``, ``stem``, ``affine``,
  ``compute_dtype``, ``width``), with a label for the report: the benchmarks build models,
  heads and optimisers exactly as a training run does."""
  config: TrainConfig
  label: str

  def create(self):
    return self.config.backbone()

  def run_config(self, head: str, optimizer: str) -> TrainConfig:
    """The TrainConfig of a benchmarked step: this backbone, the head variant
    (:data:`HEAD_VARIANTS`) and the optimiser (:data:`OPTIMIZERS`), τ = :data:`TAU`."""
    return dataclasses.replace(self.config, tau=TAU, **HEAD_VARIANTS[head],
                               **OPTIMIZERS[optimizer]).validate()


PAPER_RESNET18 = BenchModel(TrainConfig(model="resnet18", stem="imagenet", affine=False),
                            "ResNet18 (paper: ImageNet stem, affine=False), float32")
CIFAR_RESNET18_BF16 = BenchModel(
    TrainConfig(model="resnet18", stem="cifar", affine=False, compute_dtype="bfloat16"),
    "ResNet18 (CIFAR stem, affine=False), bf16 compute / float32 params")
QUICK_MLP = BenchModel(TrainConfig(model="mlp", width=64),
                       "MLP 3072-64-64 (no bias), float32")
QUICK_MLP_BF16 = BenchModel(TrainConfig(model="mlp", width=64, compute_dtype="bfloat16"),
                            "MLP 3072-64-64 (no bias), bf16 compute / float32 params")


def make_batch_data(batch: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Random float32 images (B, 32, 32, 3) and int32 labels with every class present."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, *IMAGE_SHAPE), dtype=np.float32)
  y = rng.permutation(np.arange(batch) % k).astype(np.int32)
  return x, y


def make_mesh(devices: int):
  return train.make_mesh(jax.local_devices()[:devices]) if devices > 1 else None


# --------------------------------------------------------------------------- #
# Step measurement
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class StepMeasurement:
  """Timing, compile time, memory and FLOP count of one compiled train step."""
  step: common.StepTiming
  compile_s: float
  compiled_bytes: int | None
  device_peak: common.DevicePeak | None
  xla_flops: float | None  # XLA's count for one step (whole global batch)

  @property
  def median_s(self) -> float:
    return self.step.timing.median_s

  def as_json(self) -> dict[str, Any]:
    t, peak = self.step.timing, self.device_peak
    return {
        "median_ms": 1e3 * t.median_s, "min_ms": 1e3 * t.min_s, "repeats": t.repeats,
        "samples_ms": [1e3 * s for s in t.samples],
        "warmup_ms": [1e3 * s for s in self.step.warmup_s],
        "back_to_back_ms": (None if self.step.back_to_back_s is None
                            else 1e3 * self.step.back_to_back_s),
        "dispatch_ms": None if self.step.dispatch_s is None else 1e3 * self.step.dispatch_s,
        "compile_s": self.compile_s, "compiled_bytes": self.compiled_bytes,
        "device_peak_bytes": None if peak is None else peak.bytes,
        "device_peak_exact": None if peak is None else peak.exact,
        "xla_flops_per_step": self.xla_flops,
    }


@dataclasses.dataclass
class PreparedStep:
  """A compiled donating step with its fresh state and (placed) batch."""
  compiled: common.Compiled
  state: Any
  batch: tuple[jax.Array, jax.Array]


def prepare_step(cfg: TrainConfig, num_classes: int, batch: int, mesh,
                 seed: int) -> PreparedStep:
  """Builds the run's model, head and optimiser from ``cfg``, a fresh state, and compiles the
  state-donating train step ahead of time."""
  model = cfg.backbone()
  tx = cfg.optimizer_transform(steps_per_epoch=1)
  head_config = cfg.head_config(num_classes, model.feature_dim)
  x, y = make_batch_data(batch, num_classes, seed)
  state = train.create_train_state(model, tx, head_config, jax.random.key(seed),
                                   jnp.asarray(x[:2]), init_params=cfg.init_params())
  if mesh is None:
    x, y = jnp.asarray(x), jnp.asarray(y)
  else:
    state = train.replicate(state, mesh)
    x, y = train.global_batch((x, y), mesh)
  jitted = train.compile_train_step(mesh, model=model, tx=tx, head_config=head_config)
  # The implicit head's first step is its own program (static HeadState.initialised): take
  # it untimed, then compile the program every later step runs. Every head takes it, so all
  # enter the timed warm-up alike.
  state, _ = jitted(state, x, y)
  state = jax.block_until_ready(state)
  return PreparedStep(common.compile_jitted(jitted, state, x, y), state, (x, y))


def measure_steps(prepared: Sequence[PreparedStep], policy: common.RepeatPolicy,
                  warmup_steps: int) -> list[StepMeasurement]:
  """Warm-up, then interleaved timed steps (:func:`common.time_state_steps_interleaved`)."""
  timings, _ = common.time_state_steps_interleaved(
      [(p.compiled.call, p.state, p.batch) for p in prepared], policy,
      warmup_calls=warmup_steps)
  for p in prepared:
    p.state = None  # donated
  return [StepMeasurement(t, p.compiled.compile_s, p.compiled.memory_bytes,
                          t.warmup_device_peak, common.compiled_flops(p.compiled.call))
          for t, p in zip(timings, prepared)]


# --------------------------------------------------------------------------- #
# Section 1: heads
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class HeadResult:
  k: int
  batch: int
  head: str
  m: StepMeasurement
  ratio: float | None = None  # median / standard median of the same (K, B)
  ratio_min: float | None = None  # the same with the fastest steps (JSON only)

  @property
  def images_per_s(self) -> float:
    return self.batch / self.m.median_s

  @property
  def overhead(self) -> float | None:
    return None if self.ratio is None else self.ratio - 1.0

  def as_json(self) -> dict[str, Any]:
    return {"K": self.k, "batch": self.batch, "head": self.head,
            "head_config": HEAD_VARIANTS[self.head], **self.m.as_json(),
            "images_per_s": self.images_per_s, "ratio_to_standard": self.ratio,
            "ratio_to_standard_min": self.ratio_min, "head_overhead": self.overhead}


def run_heads(spec: BenchModel, head_names: Sequence[str], classes: Sequence[int],
              batches: Sequence[int], optimizer: str, mesh, policy, warmup_steps: int,
              seed: int) -> list[HeadResult]:
  results = []
  for k in classes:
    for b in batches:
      prepared = []
      for name in head_names:
        prepared.append(prepare_step(spec.run_config(name, optimizer), k, b, mesh, seed))
      group = [HeadResult(k, b, name, m)
               for name, m in zip(head_names, measure_steps(prepared, policy, warmup_steps))]
      del prepared
      for r in group:
        _log(f"[heads K={k} B={b}] {r.head}: {_num(1e3 * r.m.median_s)} ms/step "
             f"(compile {r.m.compile_s:.1f} s, {r.m.step.timing.repeats} repeats)")
      base = next((r for r in group if r.head == BASELINE), None)
      if base is not None:
        for r in group:
          r.ratio = r.m.median_s / base.m.median_s
          r.ratio_min = r.m.step.timing.min_s / base.m.step.timing.min_s
      results += group
  return results


# --------------------------------------------------------------------------- #
# Section 2: throughput
# --------------------------------------------------------------------------- #


def auto_peak_tflops(device_kind: str) -> float | None:
  for key, peak in PEAK_BF16_TFLOPS:
    if key.lower() in device_kind.lower():
      return peak
  return None


@dataclasses.dataclass
class ThroughputResult:
  model: str
  batch: int
  m: StepMeasurement
  nominal_flop_per_image: float | None
  peak_tflops: float | None
  peak_source: str

  @property
  def images_per_s(self) -> float:
    return self.batch / self.m.median_s

  @property
  def tflops(self) -> float | None:
    f = self.nominal_flop_per_image
    return None if f is None else f * self.images_per_s / 1e12

  @property
  def xla_tflops(self) -> float | None:
    return None if self.m.xla_flops is None else self.m.xla_flops / self.m.median_s / 1e12

  @property
  def peak_fraction(self) -> float | None:
    achieved = self.tflops if self.tflops is not None else self.xla_tflops
    return None if achieved is None or not self.peak_tflops else achieved / self.peak_tflops

  def as_json(self) -> dict[str, Any]:
    return {"model": self.model, "batch": self.batch, "K": THROUGHPUT_CLASSES,
            **self.m.as_json(), "images_per_s": self.images_per_s,
            "nominal_flop_per_image": self.nominal_flop_per_image,
            "tflops_nominal": self.tflops, "tflops_xla": self.xla_tflops,
            "peak_tflops": self.peak_tflops, "peak_source": self.peak_source,
            "peak_fraction": self.peak_fraction}


def run_throughput(spec: BenchModel, batch: int, optimizer: str, mesh, policy, warmup_steps,
                   seed: int, nominal_flop_per_image: float | None, peak: float | None,
                   peak_source: str) -> ThroughputResult:
  cfg = spec.run_config("standard", optimizer)
  (m,) = measure_steps([prepare_step(cfg, THROUGHPUT_CLASSES, batch, mesh, seed)], policy,
                       warmup_steps)
  r = ThroughputResult(spec.label, batch, m, nominal_flop_per_image, peak, peak_source)
  _log(f"[throughput B={batch}] {_num(r.images_per_s)} images/s "
       f"(compile {m.compile_s:.1f} s, {m.step.timing.repeats} repeats)")
  return r


# --------------------------------------------------------------------------- #
# Section 3: input pipeline
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class PipelineResult:
  plan: str          # "plain" or "stratified"
  examples: int
  batch: int
  batches: int       # per epoch
  plan_s: float      # median epoch_indices time (+ host copy for "dispatched")
  dispatched: common.Timing  # whole epochs, plan included
  in_jit: common.Timing

  def rates(self, timing: common.Timing) -> tuple[float, float]:
    """(batches/s, images/s) of whole epochs, the plan included."""
    per_epoch = timing.median_s
    return self.batches / per_epoch, self.batches * self.batch / per_epoch

  def as_json(self) -> dict[str, Any]:
    out = {"plan": self.plan, "examples": self.examples, "batch": self.batch,
           "batches_per_epoch": self.batches, "plan_ms": 1e3 * self.plan_s}
    for name, t in (("dispatched", self.dispatched), ("in_jit", self.in_jit)):
      bps, ips = self.rates(t)
      out[name] = {"epoch_median_ms": 1e3 * t.median_s, "epoch_min_ms": 1e3 * t.min_s,
                   "repeats": t.repeats, "batches_per_s": bps, "images_per_s": ips}
    return out


def make_pipeline_data(n: int, k: int, seed: int) -> tuple[jax.Array, jax.Array]:
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8)
  labels = rng.permutation(np.arange(n) % k).astype(np.int32)
  return batching.put_on_device(images, labels)


def run_pipeline(examples: int, batch_sizes: Sequence[int], policy: common.RepeatPolicy,
                 seed: int) -> list[PipelineResult]:
  info = registry.get_dataset_info(PIPELINE_DATASET)
  spec, k = info.train_spec, info.num_classes
  images, labels = make_pipeline_data(examples, k, seed)
  rng = jax.random.key(seed)

  @jax.jit
  def one_batch(images, labels, idx, rng, step):
    # As the train step of nc_jax.pipeline.DevicePipeline: augmentation key fold_in(fold_in(rng, 1), step).
    key = jax.random.fold_in(jax.random.fold_in(rng, 1), step)
    x, y = batching.make_batch(images, labels, idx, key, spec, True)
    return x, y, step + 1

  @jax.jit
  def whole_epoch(images, labels, plan, rng):
    # Each batch becomes the loop carry, so it is materialised (as a train step's input
    # is) and cannot be optimised away; a reduction instead (a checksum) fused into the
    # augmentation and doubled its cost on CPU.
    def body(i, carry):
      key = jax.random.fold_in(jax.random.fold_in(rng, 1), i)
      return batching.make_batch(images, labels, plan[i], key, spec, True)
    b = plan.shape[1]
    init = (jnp.zeros((b, *IMAGE_SHAPE), jnp.float32), jnp.zeros((b,), jnp.int32))
    return jax.lax.fori_loop(0, plan.shape[0], body, init)

  results = []
  for stratified in (False, True):
    for b in batch_sizes:
      epoch = [0]

      def plan_for():
        epoch[0] += 1
        key = jax.random.fold_in(jax.random.fold_in(rng, 0), epoch[0])
        return batching.epoch_indices(key, labels, b, stratified, num_classes=k)

      def dispatched():
        plan = np.asarray(plan_for())  # as nc_jax.pipeline.epoch_plan: host copy
        step = jnp.zeros((), jnp.int32)
        out = None
        for row in plan:
          out = one_batch(images, labels, jnp.asarray(row), rng, step)
          step = out[2]
        return out

      def in_jit():
        return whole_epoch(images, labels, plan_for(), rng)

      plan_timing, _ = common.time_calls(plan_for, (), policy)
      disp, _ = common.time_calls(dispatched, (), policy)
      fused, _ = common.time_calls(in_jit, (), policy)
      r = PipelineResult("stratified" if stratified else "plain", examples, b,
                         batching.num_batches(examples, b), plan_timing.median_s, disp, fused)
      _log(f"[pipeline {r.plan} B={b}] dispatched {_num(r.rates(disp)[1])} images/s, "
           f"in-jit {_num(r.rates(fused)[1])} images/s")
      results.append(r)
  return results


# --------------------------------------------------------------------------- #
# Targets
# --------------------------------------------------------------------------- #


def evaluate_targets(head_results: Sequence[HeadResult],
                     throughput: ThroughputResult | None) -> list[dict[str, Any]]:
  """The issue's targets, each with the measured value and whether it is met."""
  out = []
  for r in head_results:
    if r.head == "implicit" and r.ratio is not None:
      out.append({"target": f"implicit/standard <= {TARGET_RATIO} at K={r.k}, B={r.batch}",
                  "value": r.ratio, "met": r.ratio <= TARGET_RATIO})
    if r.head == BASELINE and r.batch == TARGET_STANDARD_BATCH:
      ms = 1e3 * r.m.median_s
      out.append({"target": f"standard step <= {TARGET_STANDARD_MS} ms at K={r.k}, "
                            f"B={TARGET_STANDARD_BATCH}",
                  "value": ms, "met": ms <= TARGET_STANDARD_MS})
  if throughput is not None:
    frac = throughput.peak_fraction
    out.append({"target": f"CIFAR-stem ResNet18 bf16 >= {TARGET_PEAK_FRACTION:.0%} of peak "
                          f"(B={throughput.batch})",
                "value": frac, "met": None if frac is None else frac >= TARGET_PEAK_FRACTION})
  return out


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


_num = common.fmt_num


def _ms(seconds: float | None) -> str:
  return "–" if seconds is None else _num(1e3 * seconds)


_mib = common.fmt_mib


def _peak(m: StepMeasurement) -> str:
  if m.device_peak is None:
    return "–"
  return ("" if m.device_peak.exact else "≤ ") + _mib(m.device_peak.bytes)


def _pct(x: float | None, signed: bool = False) -> str:
  if x is None:
    return "n/a"
  return f"{100 * x:+.1f} %" if signed else f"{100 * x:.1f} %"


HEAD_HEADERS = ("K", "batch", "head", "ms/step", "min ms", "back-to-back ms",
                "host dispatch ms", "repeats",
                "images/s", "× standard", "head overhead", "compile s", "compiled MiB",
                "device peak MiB")


def head_row(r: HeadResult) -> list[str]:
  m = r.m
  return [str(r.k), str(r.batch), r.head, _ms(m.median_s), _ms(m.step.timing.min_s),
          _ms(m.step.back_to_back_s), _ms(m.step.dispatch_s), str(m.step.timing.repeats),
          _num(r.images_per_s), "–" if r.ratio is None else f"{r.ratio:.3f}",
          "–" if r.head == BASELINE or r.overhead is None else _pct(r.overhead, signed=True),
          f"{m.compile_s:.1f}", _mib(m.compiled_bytes), _peak(m)]


THROUGHPUT_HEADERS = ("model", "batch", "ms/step", "back-to-back ms", "repeats", "images/s",
                      "TFLOP/s (3.33 GFLOP/img)", "XLA TFLOP/s", "XLA GFLOP/img",
                      "peak TFLOP/s", "% of peak", "compile s", "compiled MiB",
                      "device peak MiB")


def throughput_row(r: ThroughputResult) -> list[str]:
  m = r.m
  xla_per_image = None if m.xla_flops is None else m.xla_flops / r.batch / 1e9
  return [r.model, str(r.batch), _ms(m.median_s), _ms(m.step.back_to_back_s),
          str(m.step.timing.repeats), _num(r.images_per_s),
          "n/a" if r.tflops is None else f"{r.tflops:.3g}",
          "n/a" if r.xla_tflops is None else f"{r.xla_tflops:.3g}",
          "n/a" if xla_per_image is None else f"{xla_per_image:.3g}",
          "n/a" if r.peak_tflops is None else f"{r.peak_tflops:g} ({r.peak_source})",
          _pct(r.peak_fraction), f"{m.compile_s:.1f}", _mib(m.compiled_bytes), _peak(m)]


PIPELINE_HEADERS = ("plan", "batch", "batches/epoch", "plan ms", "dispatched batches/s",
                    "dispatched images/s", "in-jit batches/s", "in-jit images/s", "repeats")


def pipeline_row(r: PipelineResult) -> list[str]:
  db, di = r.rates(r.dispatched)
  jb, ji = r.rates(r.in_jit)
  return [r.plan, str(r.batch), str(r.batches), _ms(r.plan_s), _num(db), _num(di), _num(jb),
          _num(ji), f"{r.dispatched.repeats}/{r.in_jit.repeats}"]


def report(env: dict[str, Any], settings: dict[str, Any], head_results, throughput,
           pipeline, targets) -> str:
  lines = ["# Training-step benchmark (`benchmarks/train_step.py`)", ""]
  lines += common.environment_lines(env)
  lines += [f"- settings: optimiser {settings['optimizer_label']}, τ = {TAU}, cross-entropy, "
            f"warm-up steps {settings['warmup_steps']}, repeats {settings['repeats_policy']}, "
            f"devices {settings['devices']} "
            f"({'data-parallel mesh' if settings['devices'] > 1 else 'no mesh'}), "
            f"seed {settings['seed']}", ""]
  if head_results:
    lines += [f"## Head overhead: {settings['head_model']}, 32×32×3 float32 inputs", ""]
    lines.append(common.markdown_table(HEAD_HEADERS, [head_row(r) for r in head_results],
                                       right_align_from=3))
    lines += ["", "ms/step: median of steps each blocked on (compile and warm-up excluded; "
              "the heads of a (K, batch) group interleaved step by step); "
              "back-to-back ms: mean of as many steps with one block at the end; "
              "host dispatch ms: host time per call before that block (≈ back-to-back "
              "ms: the step synchronises with the host; far less: dispatch is "
              "asynchronous). "
              "× standard: ratio of medians to the standard head at the same (K, batch); "
              "head overhead = ratio − 1 (the extra cost of the head, as a fraction of a "
              "standard step). images/s = batch / median. compiled MiB: XLA memory analysis "
              "(temp + arguments + outputs − donated). device peak: allocator peak of the "
              "warm-up steps above the live memory ('–': not reported by the backend, e.g. "
              "CPU).", ""]
  if throughput is not None:
    lines += [f"## Throughput: standard head, K = {THROUGHPUT_CLASSES}", ""]
    lines.append(common.markdown_table(THROUGHPUT_HEADERS, [throughput_row(throughput)],
                                       right_align_from=1))
    lines += ["", "TFLOP/s (3.33 GFLOP/img): the issue's nominal FLOPs per image per training "
              "step (CIFAR-stem ResNet18 only) × images/s; XLA TFLOP/s: XLA's cost-analysis "
              "count of the compiled step / median time. % of peak uses the nominal count "
              "where it applies, else XLA's.", ""]
  if pipeline:
    n = pipeline[0].examples
    lines += [f"## Input pipeline: {n:,} synthetic uint8 32×32×3 images on "
              f"{env['device_kind']}, `{PIPELINE_DATASET}` train_spec (pad-4 crop, flip, "
              "normalise), no model", ""]
    lines.append(common.markdown_table(PIPELINE_HEADERS, [pipeline_row(r) for r in pipeline],
                                       right_align_from=1))
    lines += ["", "Per epoch: plan = `epoch_indices` (median ms); dispatched = host plan + one "
              "jitted `make_batch` call per batch (as `nc_jax.pipeline.DevicePipeline`); in-jit = the "
              "whole epoch's batches in one compiled loop (the device cost inside a fused "
              "train step). Rates are whole epochs, the plan included; repeats = "
              "dispatched/in-jit epochs timed.", ""]
  if targets:
    lines += [f"## Targets (the issue's, set for an NVIDIA H100; this device: "
              f"{env['device_kind']})", ""]
    for t in targets:
      v = t["value"]
      value = ("n/a" if v is None else f"{100 * v:.1f} %" if "peak" in t["target"]
               else f"{v:.3f}" if "/" in t["target"] else f"{v:.2f} ms")
      met = {True: "met", False: "not met", None: "n/a"}[t["met"]]
      lines.append(f"- {t['target']}: {value} — {met}")
  elif settings.get("quick"):
    lines.append("Targets: not evaluated (`--quick` uses an MLP, not the targets' ResNet18).")
  return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def _int_list(text: str) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
  return values


def _devices(text: str) -> str | int:
  if text == "all":
    return text
  try:
    n = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected 'all' or a device count, got {text!r}") from None
  if n < 1:
    raise argparse.ArgumentTypeError(f"expected a positive device count, got {n}")
  return n


def _peak_arg(text: str) -> str | float:
  if text == "auto":
    return text
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected 'auto' or TFLOP/s, got {text!r}") from None
  if not value > 0:
    raise argparse.ArgumentTypeError(f"expected a positive peak, got {text!r}")
  return value


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.train_step",
      description="Train-step time per head, bf16 throughput and input-pipeline throughput.")
  parser.add_argument("--sections", type=common.comma_choices(SECTIONS, "section"),
                      default=SECTIONS,
                      help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
  parser.add_argument("--heads", type=common.comma_choices(tuple(HEAD_VARIANTS), "head"),
                      default=DEFAULT_HEADS,
                      help=f"comma-separated subset of {','.join(HEAD_VARIANTS)} "
                           f"(default: {','.join(DEFAULT_HEADS)})")
  parser.add_argument("--batches", type=_int_list, default=None,
                      help="batch sizes of the heads section and the pipeline (default: "
                           "128,256; --quick: 16)")
  parser.add_argument("--classes", type=_int_list, default=None,
                      help="numbers of classes K (default: 10,100; --quick: 10)")
  parser.add_argument("--throughput-batch", type=int, default=None,
                      help=f"batch of the throughput section (default {THROUGHPUT_BATCH}; "
                           f"--quick: {QUICK_THROUGHPUT_BATCH})")
  parser.add_argument("--peak-tflops", type=_peak_arg, default="auto",
                      help="device peak for the %% of peak column, TFLOP/s (default auto: "
                           "dense bf16 of a known GPU, else n/a)")
  parser.add_argument("--pipeline-examples", type=int, default=None,
                      help=f"synthetic dataset size (default {PIPELINE_EXAMPLES:,}; "
                           f"--quick: {QUICK_PIPELINE_EXAMPLES:,})")
  parser.add_argument("--optimizer", choices=("agd", "sgd"), default="agd",
                      help="agd (default, the released scripts') or sgd (momentum 0.9, "
                           "lr 0.05, weight decay 5e-4)")
  parser.add_argument("--devices", type=_devices, default="all",
                      help="'all' local devices (data-parallel mesh when > 1) or a count")
  parser.add_argument("--warmup-steps", type=int, default=None,
                      help="untimed steps before timing (default 2; --quick: 1)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed steps/epochs per row (default: adaptive, ~1 s, 3-200)")
  parser.add_argument("--json", metavar="PATH", default=None,
                      help="also write machine-readable results to PATH")
  parser.add_argument("--quick", action="store_true",
                      help="tiny MLP, K=10, batch 16, few repeats: a smoke run")
  parser.add_argument("--seed", type=int, default=0)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  quick = args.quick
  batches = args.batches or (QUICK_BATCHES if quick else DEFAULT_BATCHES)
  classes = args.classes or (QUICK_CLASSES if quick else DEFAULT_CLASSES)
  tp_batch = args.throughput_batch or (QUICK_THROUGHPUT_BATCH if quick else THROUGHPUT_BATCH)
  examples = args.pipeline_examples or (QUICK_PIPELINE_EXAMPLES if quick else PIPELINE_EXAMPLES)
  warmup_steps = args.warmup_steps if args.warmup_steps is not None else (1 if quick else 2)
  n_local = len(jax.local_devices())
  devices = n_local if args.devices == "all" else args.devices
  if devices > n_local:
    parser.error(f"--devices {devices}: only {n_local} local devices")
  sections = args.sections
  sizes = ([*batches] if "heads" in sections else []) + (
      [tp_batch] if "throughput" in sections else [])
  bad = [b for b in sizes if b % devices]
  if bad:
    parser.error(f"batch sizes {bad} are not multiples of the device count {devices}")
  if "pipeline" in sections and examples < max(batches):
    parser.error(f"--pipeline-examples {examples} is smaller than a batch ({max(batches)})")
  if quick:
    policy = common.RepeatPolicy(args.repeats, target_s=0.05, max_repeats=3, min_repeats=3)
  else:
    policy = common.RepeatPolicy(args.repeats, target_s=1.0, max_repeats=200, min_repeats=3)
  head_spec = QUICK_MLP if quick else PAPER_RESNET18
  tp_spec = QUICK_MLP_BF16 if quick else CIFAR_RESNET18_BF16
  env = common.environment()
  if args.peak_tflops == "auto":
    peak = auto_peak_tflops(env["device_kind"])
    peak_source = "auto: dense bf16" if peak is not None else "unknown device"
  else:
    peak, peak_source = float(args.peak_tflops), "--peak-tflops"
  mesh = make_mesh(devices)
  settings = {
      "quick": quick, "sections": list(sections), "heads": list(args.heads),
      "batches": list(batches), "classes": list(classes), "throughput_batch": tp_batch,
      "pipeline_examples": examples, "optimizer": args.optimizer,
      "optimizer_label": ("AGD (gain 10, orthogonal init)" if args.optimizer == "agd" else
                          "SGD (momentum 0.9, lr 0.05, weight decay 5e-4)"),
      "devices": devices, "warmup_steps": warmup_steps, "seed": args.seed,
      "head_model": head_spec.label, "throughput_model": tp_spec.label,
      "repeats_policy": (f"fixed {policy.repeats}" if policy.repeats is not None else
                         f"adaptive (~{policy.target_s:g} s, {policy.min_repeats}-"
                         f"{policy.max_repeats})"),
      "peak_tflops": peak, "peak_source": peak_source,
  }

  head_results, throughput, pipeline = [], None, []
  if "heads" in sections:
    head_results = run_heads(head_spec, args.heads, classes, batches, args.optimizer, mesh,
                             policy, warmup_steps, args.seed)
  if "throughput" in sections:
    nominal = None if quick else NOMINAL_FLOP_PER_IMAGE
    throughput = run_throughput(tp_spec, tp_batch, args.optimizer, mesh, policy, warmup_steps,
                                args.seed, nominal, peak, peak_source)
  if "pipeline" in sections:
    pipeline = run_pipeline(examples, batches, policy, args.seed)
  targets = [] if quick else evaluate_targets(head_results, throughput)

  print(report(env, settings, head_results, throughput, pipeline, targets), end="")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"environment": env, "settings": settings,
                 "heads": [r.as_json() for r in head_results],
                 "throughput": None if throughput is None else throughput.as_json(),
                 "pipeline": [r.as_json() for r in pipeline],
                 "targets": targets}, f, indent=2)
      f.write("\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
