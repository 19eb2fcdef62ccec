"""Shared benchmark helpers: environment report, compilation, timing, memory, Markdown.

Import after :func:`benchmarks.set_thread_defaults` (this module imports JAX).
Everything here uses portable JAX APIs; backend-specific ones (device memory
statistics, compiled memory analysis) are optional and return ``None`` where a
backend or version lacks them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax

from benchmarks import BLAS_THREAD_VARIABLES, cpu_model

MIB = 2.0**20
GIB = 2.0**30


# --------------------------------------------------------------------------- #
# Environment
# --------------------------------------------------------------------------- #


def host_memory_bytes() -> tuple[int | None, int | None]:
  """(total, available) host RAM in bytes from ``/proc/meminfo``; ``None`` if unknown."""
  fields = {}
  try:
    with open("/proc/meminfo", encoding="utf-8") as f:
      for line in f:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024  # kB
  except (OSError, ValueError):
    pass
  total = fields.get("MemTotal")
  if total is None:
    try:
      total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
      total = None
  return total, fields.get("MemAvailable", total)


def device_memory_stats(device: jax.Device | None = None) -> dict[str, int] | None:
  """``device.memory_stats()`` (GPU/TPU allocator counters), or ``None`` (e.g. on CPU)."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 — unsupported on some backends/versions
    return None
  return dict(stats) if stats else None


def memory_budget_bytes(fraction: float) -> tuple[float | None, str]:
  """``fraction`` of the accelerator's memory limit, else of available host RAM."""
  stats = device_memory_stats()
  if stats and stats.get("bytes_limit"):
    return fraction * stats["bytes_limit"], "device memory limit"
  _, available = host_memory_bytes()
  if available:
    return fraction * available, "available host RAM"
  return None, "unknown"


def command_line() -> str:
  """The exact command that started this process (interpreter, ``-m``, arguments)."""
  argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
  return shlex.join(argv)


def environment() -> dict[str, Any]:
  """Machine, software versions, thread settings, date and command, for the report."""
  import jaxlib  # noqa: PLC0415 — only needed for its version

  device = jax.devices()[0]
  total, available = host_memory_bytes()
  stats = device_memory_stats(device)
  return {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
      "command": command_line(),
      "platform": jax.default_backend(),
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "device_memory_limit_bytes": (stats or {}).get("bytes_limit"),
      "cpu_model": cpu_model(),
      "cpu_count": os.cpu_count(),
      "host_memory_total_bytes": total,
      "host_memory_available_bytes": available,
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "threads": {name: os.environ.get(name) for name in BLAS_THREAD_VARIABLES},
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def environment_lines(env: dict[str, Any]) -> list[str]:
  """Human-readable header lines for :func:`environment`."""
  def gib(x):
    return "?" if x is None else f"{x / GIB:.1f} GiB"

  device = f"{env['device_kind']} ×{env['device_count']}"
  if env["device_memory_limit_bytes"]:
    device += f" ({gib(env['device_memory_limit_bytes'])} allocator limit)"
  threads = ", ".join(f"{k}={v}" for k, v in env["threads"].items())
  return [
      f"- date: {env['date_utc']}",
      f"- command: `{env['command']}`",
      f"- platform: {env['platform']}; device: {device}",
      f"- host: {env['cpu_model']}, {env['cpu_count']} CPUs, "
      f"RAM {gib(env['host_memory_total_bytes'])} total / "
      f"{gib(env['host_memory_available_bytes'])} available",
      f"- Python {env['python']}, jax {env['jax']}, jaxlib {env['jaxlib']}",
      f"- threads: {threads}; XLA_FLAGS={env['xla_flags'] or '(unset)'}",
  ]


# --------------------------------------------------------------------------- #
# Compilation and memory
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Compiled:
  """An ahead-of-time compiled function with its compile time and memory estimate."""
  call: Callable[..., Any]
  compile_s: float
  memory_bytes: int | None  # temp + argument + output − alias, from XLA; None if unavailable


def compile_jit(fn: Callable[..., Any], *args) -> Compiled:
  """``jax.jit(fn).lower(*args).compile()``: compiling here keeps it out of every timing."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  return Compiled(compiled, compile_s, compiled_memory_bytes(compiled))


def compile_jitted(jitted: Any, *args) -> Compiled:
  """``jitted.lower(*args).compile()`` for an existing ``jax.jit`` object (keeps its
  shardings and donation), timed like :func:`compile_jit`."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - start
  return Compiled(compiled, compile_s, compiled_memory_bytes(compiled))


def compiled_flops(compiled) -> float | None:
  """XLA's floating-point operation count of one call of an executable, or ``None``.

  From ``cost_analysis()`` (a dict, or a list of one dict per executable in older
  jaxlib). XLA counts what it compiled (e.g. a multiply-add as 2 FLOPs, after its
  own simplifications), so it can differ from a hand count of the model.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 — not implemented on every backend
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis:
    return None
  flops = analysis.get("flops")
  return float(flops) if flops is not None and flops > 0 else None


def compiled_memory_bytes(compiled) -> int | None:
  """XLA's static memory estimate of an executable: temp + argument + output − alias bytes."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 — not implemented on every backend
    return None
  if analysis is None:
    return None
  if isinstance(analysis, (list, tuple)):  # older jaxlib: one entry per executable
    analysis = analysis[0] if analysis else None
    if analysis is None:
      return None
  parts = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")
  total = sum(int(getattr(analysis, name, 0) or 0) for name in parts)
  return total - int(getattr(analysis, "alias_size_in_bytes", 0) or 0)


@dataclasses.dataclass(frozen=True)
class DevicePeak:
  """Device allocator peak during a measurement, relative to the memory live before it.

  ``bytes`` = peak_bytes_in_use after − bytes_in_use before: what the measured
  calls allocated on top of their (already resident) inputs. The allocator's
  peak cannot be reset, so the number is exact only if the measurement set a
  new high-water mark (``exact``); otherwise it is an upper bound.
  """
  bytes: int
  exact: bool


class DevicePeakTracker:
  """Context manager measuring :class:`DevicePeak`; ``result`` stays ``None`` without stats."""

  def __init__(self):
    self.result: DevicePeak | None = None
    self._before: dict[str, int] | None = None

  def __enter__(self):
    self._before = device_memory_stats()
    return self

  def __exit__(self, *exc):
    after = device_memory_stats()
    before = self._before
    keys = ("peak_bytes_in_use", "bytes_in_use")
    if before and after and all(k in before for k in keys) and "peak_bytes_in_use" in after:
      self.result = DevicePeak(
          bytes=max(0, after["peak_bytes_in_use"] - before["bytes_in_use"]),
          exact=after["peak_bytes_in_use"] > before["peak_bytes_in_use"])
    return False


# --------------------------------------------------------------------------- #
# Timing
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class RepeatPolicy:
  """How many timed calls follow the warm-up call.

  ``repeats`` fixes the number; otherwise it is ``target_s / (warm-up time)``
  clipped to ``[1, max_repeats]``: many repeats for fast calls, a single one
  for calls that take seconds (e.g. the dense DDN backward on CPU).
  """
  repeats: int | None = None
  target_s: float = 2.0
  max_repeats: int = 50
  min_repeats: int = 1  # floor of the adaptive count (a median of 1 call is fragile)

  def count(self, warmup_s: float) -> int:
    if self.repeats is not None:
      return max(1, int(self.repeats))
    adaptive = math.floor(self.target_s / max(warmup_s, 1e-9))
    return int(min(self.max_repeats, max(1, self.min_repeats, adaptive)))


@dataclasses.dataclass(frozen=True)
class Timing:
  """Wall-clock seconds of the timed calls (warm-up excluded)."""
  samples: tuple[float, ...]

  @property
  def median_s(self) -> float:
    return statistics.median(self.samples)

  @property
  def min_s(self) -> float:
    return min(self.samples)

  @property
  def repeats(self) -> int:
    return len(self.samples)


def _timed_call(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[float, Any]:
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return time.perf_counter() - start, out


def time_calls(fn: Callable[..., Any], args: Sequence[Any],
               policy: RepeatPolicy) -> tuple[Timing, Any]:
  """One warm-up call, then ``policy.count(warm-up time)`` timed calls, each blocked on.

  ``fn`` should be compiled already (:func:`compile_jit`), so the warm-up only
  absorbs first-call effects (allocation, lazy library initialisation).

  Returns:
    The timing and the warm-up call's output.
  """
  warmup_s, out = _timed_call(fn, args)
  samples = []
  for _ in range(policy.count(warmup_s)):
    elapsed, result = _timed_call(fn, args)
    del result  # free before the next call
    samples.append(elapsed)
  return Timing(tuple(samples)), out


@dataclasses.dataclass(frozen=True)
class StepTiming:
  """Timing of a state-carrying step ``fn(state, *args) -> (state, aux)``.

  Attributes:
    timing: the timed calls, each blocked on (:class:`Timing`).
    warmup_s: wall-clock seconds of the warm-up calls (the first includes
      first-call effects; later ones bring the state to a steady state).
    back_to_back_s: mean seconds per call of ``timing.repeats`` further calls
      dispatched back to back with one block at the end (host dispatch
      overlapping device work, as in a training loop); ``None`` if not measured.
    warmup_device_peak: :class:`DevicePeak` of the warm-up calls (``None``
      without device memory statistics, e.g. on CPU).
    dispatch_s: mean host seconds per call spent *returning from* those back-to-back
      calls (before the final block). Far below ``back_to_back_s``: the host runs ahead
      of the device (asynchronous dispatch). Close to it: each call waits for device
      work, i.e. the step synchronises with the host somewhere (a conditional's
      predicate read, a library call that synchronises). ``None`` if not measured.
  """
  timing: Timing
  warmup_s: tuple[float, ...]
  back_to_back_s: float | None
  warmup_device_peak: DevicePeak | None = None
  dispatch_s: float | None = None


def time_state_steps_interleaved(
    steps: Sequence[tuple[Callable[..., Any], Any, Sequence[Any]]], policy: RepeatPolicy,
    warmup_calls: int = 1, back_to_back: bool = True) -> tuple[list[StepTiming], list[Any]]:
  """Times several steps that consume their state (e.g. donate it) and return the next one.

  ``steps``: ``(fn, state, args)`` triples, ``fn(state, *args) -> (state, aux)``. Each
  step first gets ``warmup_calls`` calls of its own (under a device-peak tracker).
  Then ``policy.count(mean last warm-up time)`` rounds in which every step is called
  once, in turn, the first step rotating (A B C, B C A, C A B, …), each call ended by
  ``jax.block_until_ready`` on its outputs (the new state included): slow drifts of
  the machine (clocks, neighbours) then affect every step alike, and ratios between
  them are more reliable than from consecutive blocks of calls. Then, optionally,
  each step alone for as many calls back to back. Every state is threaded through
  its calls, so a donated state is never reused.

  Returns:
    One :class:`StepTiming` per step, and the final states.
  """
  states = [state for _, state, _ in steps]
  warmups, peaks = [], []
  for i, (fn, _, args) in enumerate(steps):
    times = []
    with DevicePeakTracker() as peak:
      for _ in range(max(1, int(warmup_calls))):
        elapsed, (states[i], _) = _timed_call(fn, (states[i], *args))
        times.append(elapsed)
    warmups.append(tuple(times))
    peaks.append(peak.result)
  rounds = policy.count(statistics.fmean(w[-1] for w in warmups))
  samples = [[] for _ in steps]
  n = len(steps)
  for r in range(rounds):
    for j in range(n):
      i = (r + j) % n  # rotate the starting step each round: no fixed position in the order
      fn, _, args = steps[i]
      elapsed, (states[i], _) = _timed_call(fn, (states[i], *args))
      samples[i].append(elapsed)
  per_call = [None] * len(steps)
  dispatch = [None] * len(steps)
  if back_to_back:
    for i, (fn, _, args) in enumerate(steps):
      state = states[i]
      start = time.perf_counter()
      for _ in range(rounds):
        state, aux = fn(state, *args)
      dispatched = time.perf_counter()
      states[i], _ = jax.block_until_ready((state, aux))
      per_call[i] = (time.perf_counter() - start) / rounds
      dispatch[i] = (dispatched - start) / rounds
  timings = [StepTiming(Timing(tuple(samples[i])), warmups[i], per_call[i], peaks[i],
                        dispatch[i]) for i in range(len(steps))]
  return timings, states


# --------------------------------------------------------------------------- #
# Output
# --------------------------------------------------------------------------- #


def comma_choices(choices: Sequence[str], noun: str = "name"):
  """An argparse ``type``: a comma-separated, non-empty subset of ``choices``."""

  def parse(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in names if v not in choices]
    if unknown or not names:
      raise argparse.ArgumentTypeError(f"unknown {noun}(s) {unknown}; choose from {list(choices)}")
    return names

  return parse


def fmt_num(x: float) -> str:
  """Three significant digits without exponent for x ≥ 1e-3, grouped thousands."""
  if x >= 100:
    return f"{x:,.0f}"
  if x >= 10:
    return f"{x:.1f}"
  if x >= 1:
    return f"{x:.2f}"
  return f"{x:.3f}"


def fmt_mib(nbytes: int | None) -> str:
  """Bytes as MiB for a table cell; "–" when unknown."""
  return "–" if nbytes is None else fmt_num(nbytes / MIB)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                   right_align_from: int = 0) -> str:
  """A GitHub Markdown table; columns from ``right_align_from`` on are right-aligned."""
  align = ["---:" if i >= right_align_from else "---" for i in range(len(headers))]
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)
