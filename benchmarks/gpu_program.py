r"""The GPU program of the solver and the train step, compiled for an H100 without a GPU.

Run from the repository root::

    python -m benchmarks.gpu_program setup        # once: CUDA plugin wheels -> .gpu-aot/<version>/
    python -m benchmarks.gpu_program              # every program; Markdown table to stdout
    python -m benchmarks.gpu_program --list
    python -m benchmarks.gpu_program --programs 'solver-*-512x10,step-implicit-*' --json out.json

Why. On a GPU the latency of a small step is set by its structure more than by its
arithmetic (a 512×10 polar factor is microseconds of work): how many launches the host
issues one after another, and how often it waits for the device. XLA can compile any JAX
program for an NVIDIA H100 on this CPU-only machine ("deviceless" ahead-of-time compile:
``jax.experimental.topologies.get_topology_desc(platform="cuda", topology="1x1x1",
target_config=<benchmarks/h100.txtpb>)``), and its dump of the compiled executable's
launch list (``*.thunk_sequence_after_thunk_passes.txt``, or ``*.thunk_sequence.txt`` when
XLA's thunk passes changed nothing) shows that structure exactly. This tool compiles a list
of programs that way and counts, per program:

* **launches** — top-level entries of the launch list, what the host launches one by one
  per execution (a ``kSequential`` wrapper counts as the launches it holds). A
  ``kCommandBuffer`` is one launch: one CUDA graph holding many kernels.
* **CUDA graphs (ops)** — ``kCommandBuffer`` entries at any depth, and the operations
  (kernels, GEMMs, copies) inside them.
* **cond** — ``kConditional`` run by the host: one device→host synchronisation per
  execution (the runtime copies the predicate and waits). Conditionals captured inside a
  CUDA graph (device-side conditional nodes, no synchronisation) are shown as "+N in graph".
* **while known/unknown** — ``kWhile`` loops run by the host, split by whether XLA knows the
  trip count (``backend_config={"known_trip_count":...}`` on the ``while`` of the optimized
  HLO, found through the thunk's profile annotation in ``*.thunk_metadata.txt``). Unknown:
  a copy of the predicate and a host wait per iteration; known: no synchronisation.
* **cuSOLVER** — custom calls to cuSOLVER (targets ``cusolver_*``): they cannot be captured
  in CUDA graphs, so each splits the graph around it, and some synchronise internally.
* **trsm** — ``kTriangularSolve`` (cuBLAS trsm; not capturable either).
* **other custom calls** — the remaining ``kCustomCall`` entries, by target.
* **lower s / compile s** — seconds to build the abstract inputs, trace and lower, and for
  XLA to compile, on this host.

Counts are static: a loop body's launches count once however often it runs (the JSON lists
each host-run loop's launches per iteration). Nothing is timed on a GPU, GEMM and
convolution algorithms are XLA's heuristic choices (no autotuning), but everything
structural that decides latency is the real program.

Programs (``--programs``: comma-separated names or shell-style globs; default all):

* ``solver-<factorisation>-<d>x<K>`` — forward and backward of the implicit-ETF solver,
  ``jax.value_and_grad`` of :math:`\langle G, P^\star(Y, P_{prev})\rangle` with respect to
  ``Y`` (``nc_jax.nearest_etf(Y, P_prev, factorisation=f)``), float32, for every
  factorisation of ``nc_jax.solver.FACTORISATIONS`` and ``"auto"`` at (d, K) = (512, 10),
  (512, 100), (2048, 1000). The compiling process answers ``"gpu"`` to
  ``jax.default_backend()``, so ``"auto"`` resolves as on the GPU.
* ``step-<head>-k<K>`` — the library's train step, :func:`nc_jax.train.compile_train_step`,
  for the paper's backbone (``models.create('resnet18', stem='imagenet', affine=False)``),
  AGD, τ = 5, float32 32×32×3 inputs, batch 256, heads ``standard``, ``fixed``,
  ``implicit``, ``implicit-fo`` (``benchmarks.train_step.HEAD_VARIANTS``, built with that
  benchmark's own definitions), K = 10 and 100. The compiled step is the **steady-state**
  one: its state argument has the abstract value of a state that a step returned
  (``jax.eval_shape(step, state0, images, labels)[0]``), so a head whose first step is a
  separate program (selected by the state's pytree structure) is measured on the step
  every later iteration runs.
* ``step-<head>-k<K>-first`` (implicit heads) — the first-step program, compiled for the
  freshly initialised state (the one step per run that takes the feasibility solve).
* ``dp2-step-<head>-k<K>`` — the same step data-parallel over a two-GPU topology
  (``get_topology_desc(..., topology="1x1x2")``: one slice, one host, two devices; the
  CUDA plugin's topology string is ``<slices>x<hosts per slice>x<devices per host>``),
  through ``compile_train_step(train.make_mesh(topo.devices), ...)``: replicated state,
  batch 256 split 128 + 128, the gradient all-reduce as collectives in the launch list.

How. The CUDA plugin (``jax-cuda12-plugin`` and ``jax-cuda12-pjrt`` of the installed
jaxlib's version; ~180 MB) is installed with ``pip install --no-deps --target`` into a
directory of its own (``setup``; default ``.gpu-aot/<version>/``, or ``--plugin-dir`` /
``$NC_JAX_GPU_AOT_DIR``), never into the environment: with the plugin importable, every
plain ``import jax`` on a machine without a GPU prints a CUDA traceback. (Where the
environment has the plugin already, as on a GPU machine with ``jax[cuda12]``, that one is
used and ``setup`` has nothing to do; the compile is the same deviceless one.) The compiles run
in a child process (this file run as a script) whose ``PYTHONPATH`` is the caller's with the
plugin directory appended (so a caller's ``PYTHONPATH=/some/checkout`` decides which
``nc_jax`` is compiled; the table reports the file), with ``JAX_PLATFORMS=cpu``,
``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`` and the caller's ``XLA_FLAGS`` (e.g.
``--xla_gpu_enable_command_buffer=...``) minus any ``--xla_dump_to``: each program is dumped
to a fresh directory of its own through the compile option ``xla_dump_to``, so each dump
holds exactly one module, the program's. The parent process never imports the plugin. If
the child dies (e.g. a crash inside XLA), the program it was compiling is reported failed and
a new child carries on with the rest.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import fnmatch
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TARGET_CONFIG = Path(__file__).resolve().parent / "h100.txtpb"
PLUGIN_DIR_ENV = "NC_JAX_GPU_AOT_DIR"
PLUGIN_PACKAGES = ("jax-cuda12-plugin", "jax-cuda12-pjrt")

SOLVER_SIZES = ((512, 10), (512, 100), (2048, 1000))
STEP_HEADS = ("standard", "fixed", "implicit", "implicit-fo")
STEP_CLASSES = (10, 100)
STEP_BATCH = 256
IMAGE_SHAPE = (32, 32, 3)
SHARDED_DEVICES = 2

# Launch-list entries that hold others rather than launch work themselves.
CONTROL_FLOW_KINDS = ("kWhile", "kConditional")
CONTAINER_KINDS = ("kCommandBuffer", "kSequential") + CONTROL_FLOW_KINDS
_CUSOLVER_TARGET = re.compile(r"(cu|hip)solver|potrf|getrf|geqrf|orgqr|ormqr|syevd|syevj|gesvd|"
                              r"cholesky", re.IGNORECASE)


class SetupError(RuntimeError):
  """The CUDA plugin could not be installed (no network, no matching wheel, pip failed)."""


# --------------------------------------------------------------------------- #
# Programs
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Program:
  """One program to compile. ``kind`` ``"solver"`` uses (factorisation, d, k); ``"step"``
  uses (head, k, batch, devices)."""
  name: str
  kind: str
  factorisation: str | None = None
  d: int | None = None
  k: int | None = None
  head: str | None = None
  batch: int | None = None
  devices: int = 1
  first: bool = False  # step: the first-step program (fresh state) instead of the steady one

  @property
  def function_name(self) -> str:
    """The Python name of the traced function (XLA names the module ``jit_<this>``)."""
    if self.kind == "solver":
      return re.sub(r"\W", "_", self.name)
    return "train_step"  # the library's own function, jitted by compile_train_step

  def as_json(self) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> "Program":
    return cls(**data)


def topology_string(devices: int) -> str:
  """The CUDA plugin's topology for ``devices`` GPUs on one host:
  ``<slices>x<hosts per slice>x<devices per host>``."""
  return f"1x1x{int(devices)}"


def solver_factorisations() -> tuple[str, ...]:
  """``nc_jax.solver.FACTORISATIONS`` and ``"auto"`` (imports nc_jax, hence JAX on the CPU)."""
  from nc_jax import solver  # pylint: disable=import-outside-toplevel
  return tuple(solver.FACTORISATIONS) + ("auto",)


def all_programs(factorisations: Sequence[str] | None = None) -> list[Program]:
  """Every program, in report order (``factorisations`` default: :func:`solver_factorisations`)."""
  if factorisations is None:
    factorisations = solver_factorisations()
  programs = [Program(f"solver-{f}-{d}x{k}", "solver", factorisation=f, d=d, k=k)
              for d, k in SOLVER_SIZES for f in factorisations]
  for prefix, devices in (("", 1), ("dp2-", SHARDED_DEVICES)):
    programs += [Program(f"{prefix}step-{head}-k{k}", "step", head=head, k=k, batch=STEP_BATCH,
                         devices=devices)
                 for k in STEP_CLASSES for head in STEP_HEADS]
  # The implicit head's first step is a program of its own (it runs once per run).
  programs += [Program(f"step-{head}-k{k}-first", "step", head=head, k=k, batch=STEP_BATCH,
                       first=True)
               for k in STEP_CLASSES for head in STEP_HEADS if head.startswith("implicit")]
  return programs


def select_programs(programs: Sequence[Program], patterns: str | Sequence[str] | None
                    ) -> list[Program]:
  """The programs matching any of ``patterns`` (names or globs), in ``programs`` order.

  Raises:
    ValueError: a pattern matches no program, or no pattern is given.
  """
  if patterns is None:
    return list(programs)
  if isinstance(patterns, str):
    patterns = [p.strip() for p in patterns.split(",") if p.strip()]
  if not patterns:
    raise ValueError("programs: expected at least one name or glob, got none")
  names = [p.name for p in programs]
  unmatched = [pat for pat in patterns if not any(fnmatch.fnmatchcase(n, pat) for n in names)]
  if unmatched:
    raise ValueError(f"programs: {unmatched} match none of the programs "
                     f"(`python -m benchmarks.gpu_program --list` lists them)")
  return [p for p in programs if any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns)]


# --------------------------------------------------------------------------- #
# Parsing XLA's dumps (pure text; no JAX)
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Thunk:
  """One entry of XLA:GPU's launch list (a "thunk") and the entries it holds.

  ``region``: the label of the part of its parent it sits in (``"condition"``, ``"body"``,
  ``"true_branch"``, …; ``None`` directly under a command buffer, sequence or the root).
  """
  id: int
  kind: str
  indent: int
  text: str = ""
  region: str | None = None
  children: list["Thunk"] = dataclasses.field(default_factory=list)
  current_region: str | None = dataclasses.field(default=None, repr=False)

  def walk(self) -> Iterable["Thunk"]:
    for child in self.children:
      yield child
      yield from child.walk()


_THUNK_LINE = re.compile(r"^( *)(\d+): (k\w+)(.*)$")
_INLINE_CHILD = re.compile(r"^\s+(\d+): (k\w+)(.*)$")
_LABEL_LINE = re.compile(r"^( *)([A-Za-z_][\w ]*?):\s*$")


def parse_thunk_listing(text: str) -> Thunk:
  """The tree of a ``*.thunk_sequence*.txt`` dump; returns a root (kind ``"root"``).

  Format (XLA's ``Thunk::ToString``): one line per thunk, ``NNN: kKind [edges] description``,
  nested entries indented deeper than their parent. A ``kWhile`` is followed by a
  ``condition:`` label in column 0 (always) and a ``body:`` label; a ``kConditional`` by one
  label per branch; the entries of a part follow its label, indented deeper. A
  ``kSequential`` prints its first entry on its own line, after the edges' ``]``.
  """
  root = Thunk(id=-1, kind="root", indent=-1)
  stack = [root]
  last: Thunk | None = None

  def add(indent: int, thunk_id: str, kind: str, rest: str) -> Thunk:
    while stack[-1].indent >= indent:
      stack.pop()
    parent = stack[-1]
    node = Thunk(int(thunk_id), kind, indent, rest.strip(), parent.current_region)
    parent.children.append(node)
    stack.append(node)
    return node

  for line in text.splitlines():
    if not line.strip():
      continue
    m = _THUNK_LINE.match(line)
    if m:
      indent, rest = len(m.group(1)), m.group(4)
      node = add(indent, m.group(2), m.group(3), rest)
      close = rest.find("]")
      inline = _INLINE_CHILD.match(rest[close + 1:]) if close >= 0 else None
      if inline:  # a kSequential's first entry, printed on the same line
        node.text = rest[:close + 1].strip()
        node = add(indent + 2, inline.group(1), inline.group(2), inline.group(3))
      last = node
      continue
    m = _LABEL_LINE.match(line)
    if not m:
      continue
    indent, label = len(m.group(1)), m.group(2)
    if last is not None and last.kind in CONTROL_FLOW_KINDS and not last.children:
      owner = last  # the label right after its loop/conditional ("condition:" is in column 0)
    else:
      while len(stack) > 1 and stack[-1].indent >= indent:
        stack.pop()
      owner = stack[-1]
    while stack[-1] is not owner:
      stack.pop()
    owner.current_region = label
  return root


def parse_thunk_metadata(text: str) -> dict[int, tuple[str, str]]:
  """``thunk id -> (profile annotation, kind)`` from a ``*.thunk_metadata.txt`` dump.

  The annotation is the HLO instruction's name (``"while.3"``, ``"cholesky.0"``); entries
  without an id (command buffers, sequences) are left out.
  """
  out = {}
  for block in re.finditer(r"thunk_metadata \{(.*?)thunk_kind: \"(\w+)\"\s*\}", text, re.DOTALL):
    body = block.group(1)
    tid = re.search(r"thunk_id: (\d+)", body)
    note = re.search(r'profile_annotation: "([^"]*)"', body)
    if tid:
      out[int(tid.group(1))] = (note.group(1) if note else "", block.group(2))
  return out


@dataclasses.dataclass
class HloInfo:
  """What the launch list does not show, from the optimized HLO text.

  ``custom_call_targets``: instruction name -> ``custom_call_target``;
  ``while_trip_counts``: ``while`` instruction name -> known trip count or ``None``.
  """
  custom_call_targets: dict[str, str]
  while_trip_counts: dict[str, int | None]


_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


def parse_hlo(text: str) -> HloInfo:
  """Custom-call targets and while-loop trip counts of an optimized HLO module's text."""
  targets, trips = {}, {}
  for line in text.splitlines():
    m = _HLO_INSTRUCTION.match(line)
    if not m:
      continue
    name, rest = m.groups()
    if " custom-call(" in rest:
      t = re.search(r'custom_call_target="([^"]+)"', rest)
      if t:
        targets[name] = t.group(1)
    elif " while(" in rest:
      n = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
      trips[name] = int(n.group(1)) if n else None
  return HloInfo(targets, trips)


def is_cusolver(target: str) -> bool:
  return bool(_CUSOLVER_TARGET.search(target))


def short_target(target: str) -> str:
  """``cusolver_potrf_ffi`` -> ``potrf``; other targets unchanged."""
  return re.sub(r"^(cu|hip)solver_|_ffi$", "", target)


@dataclasses.dataclass
class LaunchSummary:
  """The structure of one compiled program (see the module docstring for each count)."""
  launches: int
  top_level_kinds: dict[str, int]
  graphs: int
  graph_ops: int
  conditionals: int
  graph_conditionals: int
  whiles_known: int
  whiles_unknown: int
  graph_whiles: int
  cusolver: list[str]
  triangular_solves: int
  other_custom_calls: list[str]
  control_flow: list[dict[str, Any]]
  listing: str  # which dump the counts come from

  @property
  def whiles(self) -> int:
    return self.whiles_known + self.whiles_unknown + self.graph_whiles

  @property
  def sync_points(self) -> int:
    """Static count of host synchronisation sites: host conditionals and unknown-trip loops."""
    return self.conditionals + self.whiles_unknown

  def as_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["whiles"], out["sync_points"] = self.whiles, self.sync_points
    return out


def _host_launches(nodes: Sequence[Thunk]) -> list[Thunk]:
  """What the host launches for ``nodes``: ``kSequential`` entries replaced by their contents."""
  out = []
  for n in nodes:
    out += _host_launches(n.children) if n.kind == "kSequential" else [n]
  return out


def summarise(root: Thunk, metadata: dict[int, tuple[str, str]], hlo: HloInfo,
              listing: str = "") -> LaunchSummary:
  """Counts of :class:`LaunchSummary` for a parsed launch list.

  Args:
    root: :func:`parse_thunk_listing` of the (after-passes) launch list.
    metadata: :func:`parse_thunk_metadata` of the same module (thunk id -> HLO name).
    hlo: :func:`parse_hlo` of the optimized module.
    listing: the dump's file name, recorded in the summary.
  """
  top = _host_launches(root.children)
  graphs = graph_ops = cond = graph_cond = known = unknown = graph_whiles = trsm = 0
  cusolver, others, control = [], [], []

  def target_of(node: Thunk) -> str:
    name = metadata.get(node.id, ("", ""))[0]
    return hlo.custom_call_targets.get(name, f"?{name or node.id}")

  def visit(node: Thunk, in_graph: bool) -> None:
    nonlocal graphs, graph_ops, cond, graph_cond, known, unknown, graph_whiles, trsm
    kind = node.kind
    if kind == "kCommandBuffer":
      graphs += 1
    elif in_graph and kind not in CONTAINER_KINDS:
      graph_ops += 1
    if kind == "kConditional":
      if in_graph:
        graph_cond += 1
      else:
        cond += 1
    elif kind == "kWhile":
      name = metadata.get(node.id, ("", ""))[0]
      trips = hlo.while_trip_counts.get(name)
      if in_graph:
        graph_whiles += 1
      elif trips is None:
        unknown += 1
      else:
        known += 1
    elif kind == "kTriangularSolve":
      trsm += 1
    elif kind == "kCustomCall":
      target = target_of(node)
      (cusolver if is_cusolver(target) else others).append(target)
    if kind in CONTROL_FLOW_KINDS and not in_graph:
      regions: dict[str, list[Thunk]] = collections.defaultdict(list)
      for child in node.children:
        regions[child.region or "?"].append(child)
      name = metadata.get(node.id, ("", ""))[0]
      control.append({
          "kind": kind, "id": node.id, "hlo": name,
          "known_trip_count": hlo.while_trip_counts.get(name) if kind == "kWhile" else None,
          "launches": {r: len(_host_launches(c)) for r, c in regions.items()}})
    for child in node.children:
      visit(child, in_graph or kind == "kCommandBuffer")

  for child in root.children:
    visit(child, False)
  return LaunchSummary(
      launches=len(top), top_level_kinds=dict(collections.Counter(n.kind for n in top)),
      graphs=graphs, graph_ops=graph_ops, conditionals=cond, graph_conditionals=graph_cond,
      whiles_known=known, whiles_unknown=unknown, graph_whiles=graph_whiles,
      cusolver=sorted(cusolver), triangular_solves=trsm, other_custom_calls=sorted(others),
      control_flow=control, listing=listing)


def find_module_dumps(dump_dir: str | os.PathLike) -> dict[str, dict[str, Path]]:
  """``module prefix -> {"listing", "metadata", ...}`` for the GPU modules in a dump folder.

  The listing is ``*.thunk_sequence_after_thunk_passes.txt`` (after XLA's command-buffer
  pass), else ``*.thunk_sequence.txt`` (written alone when the passes changed nothing).
  """
  modules: dict[str, dict[str, Path]] = {}
  for path in sorted(Path(dump_dir).glob("module_*.thunk_sequence*.txt")):
    prefix, _, suffix = path.name.partition(".thunk_sequence")
    files = modules.setdefault(prefix, {})
    if suffix == "_after_thunk_passes.txt" or "listing" not in files:
      files["listing"] = path
  for prefix, files in modules.items():
    meta = Path(dump_dir) / f"{prefix}.thunk_metadata.txt"
    if meta.exists():
      files["metadata"] = meta
    hlo = sorted(Path(dump_dir).glob(f"{prefix}.*gpu_after_optimizations.txt"))
    if hlo:
      files["hlo"] = hlo[0]
  return modules


def summarise_dump(dump_dir: str | os.PathLike, module_name: str,
                   hlo_text: str | None = None) -> LaunchSummary:
  """:func:`summarise` of the one GPU module ``module_name`` dumped into ``dump_dir``.

  Args:
    dump_dir: an ``xla_dump_to`` folder.
    module_name: the HLO module's name (``jit_<function>``).
    hlo_text: the optimized HLO (``compiled.as_text()``); default: XLA's dump of it.

  Raises:
    ValueError: no launch list, or more than one GPU module, or a module of another name.
  """
  modules = find_module_dumps(dump_dir)
  if len(modules) != 1:
    raise ValueError(f"dump_dir: expected the launch list of one GPU module in {dump_dir}, "
                     f"found {len(modules)} ({sorted(modules)})")
  prefix, files = next(iter(modules.items()))
  if prefix.split(".", 1)[-1] != module_name:
    raise ValueError(f"dump_dir: expected module {module_name!r} in {dump_dir}, got {prefix!r}")
  if hlo_text is None:
    hlo_text = files["hlo"].read_text() if "hlo" in files else ""
  metadata = (parse_thunk_metadata(files["metadata"].read_text()) if "metadata" in files
              else {})
  return summarise(parse_thunk_listing(files["listing"].read_text()), metadata,
                   parse_hlo(hlo_text), listing=files["listing"].name)


# --------------------------------------------------------------------------- #
# The CUDA plugin (set-up)
# --------------------------------------------------------------------------- #


def plugin_version() -> str:
  """The plugin version to use: the installed jaxlib's (equal to jax's in its releases).

  The plugin's binaries are built with jaxlib and must match it exactly.
  """
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  return metadata.version("jaxlib")


def default_plugin_dir(version: str | None = None) -> Path:
  """``$NC_JAX_GPU_AOT_DIR`` if set, else ``<repository>/.gpu-aot/<version>``."""
  env = os.environ.get(PLUGIN_DIR_ENV)
  if env:
    return Path(env).expanduser()
  return REPO_ROOT / ".gpu-aot" / (version or plugin_version())


def environment_has_plugin(version: str | None = None) -> bool:
  """Whether this environment already has both plugin packages at ``version`` (a GPU
  machine with ``jax[cuda12]``); checks the packages' metadata, imports nothing."""
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  version = version or plugin_version()
  try:
    return all(metadata.version(p) == version for p in PLUGIN_PACKAGES)
  except metadata.PackageNotFoundError:
    return False


def resolve_plugin_dir(plugin_dir: str | os.PathLike | None = None,
                       version: str | None = None) -> Path | None:
  """The plugin folder to put on the child's path: ``plugin_dir`` if given, else
  ``$NC_JAX_GPU_AOT_DIR`` if set, else ``None`` if the environment has the plugin (GPU
  machines), else ``.gpu-aot/<version>``."""
  if plugin_dir is not None:
    return Path(plugin_dir)
  if not os.environ.get(PLUGIN_DIR_ENV) and environment_has_plugin(version):
    return None
  return default_plugin_dir(version)


def plugin_problem(plugin_dir: str | os.PathLike, version: str) -> str | None:
  """Why ``plugin_dir`` does not hold both plugin packages at ``version``; ``None`` if it does."""
  plugin_dir = Path(plugin_dir)
  if not plugin_dir.is_dir():
    return f"{plugin_dir} does not exist"
  for package in PLUGIN_PACKAGES:
    dist = package.replace("-", "_")
    if not (plugin_dir / f"{dist}-{version}.dist-info").is_dir():
      found = sorted(p.name for p in plugin_dir.glob(f"{dist}-*.dist-info"))
      return (f"{plugin_dir} has no {package} {version} (found: {', '.join(found) or 'none'}; "
              f"it must match the installed jaxlib {version})")
  return None


def _run_pip(args: list[str], what: str) -> None:
  cmd = [sys.executable, "-m", "pip", *args]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
    raise SetupError(f"setup: {what} failed (exit {proc.returncode}; no network, or no wheel "
                     f"for Python {platform.python_version()} on {platform.machine()}?):\n"
                     f"$ {shlex.join(cmd)}\n{tail}")


def setup_plugin(plugin_dir: str | os.PathLike | None = None, version: str | None = None, *,
                 wheels: str | os.PathLike | None = None,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)
                 ) -> Path | None:
  """Installs the CUDA plugin wheels into ``plugin_dir`` (skips if they are there).

  ``pip download --no-deps`` of ``jax-cuda12-plugin==V`` and ``jax-cuda12-pjrt==V`` (V: the
  installed jaxlib's version), then ``pip install --no-deps --target``: no NVIDIA runtime
  wheels, nothing in the environment. Installed into a temporary sibling folder and moved
  into place, so an interrupted set-up leaves nothing half-installed.

  Args:
    plugin_dir: target folder (default :func:`resolve_plugin_dir`: nothing to do where the
      environment has the plugin, as on a GPU machine).
    version: plugin version (default :func:`plugin_version`).
    wheels: a folder holding the two wheels: install from it without an index (offline).
    log: progress messages.

  Returns:
    The plugin folder, or ``None`` if the environment has the plugin.

  Raises:
    SetupError: pip failed (no network, no wheel for this Python/platform), or
      ``plugin_dir`` exists with other content.
  """
  version = version or plugin_version()
  resolved = resolve_plugin_dir(plugin_dir, version)
  if resolved is None:
    log(f"setup: this environment has the CUDA plugin {version} already; nothing to install")
    return None
  plugin_dir = resolved
  problem = plugin_problem(plugin_dir, version)
  if problem is None:
    log(f"setup: CUDA plugin {version} already in {plugin_dir}")
    return plugin_dir
  foreign = plugin_dir.exists() and any(plugin_dir.iterdir())
  if foreign and not (plugin_dir / "jax_plugins").is_dir():
    raise SetupError(f"setup: {plugin_dir} exists and is not a plugin folder; remove it or "
                     f"choose another --plugin-dir")
  plugin_dir.parent.mkdir(parents=True, exist_ok=True)
  requirements = [f"{p}=={version}" for p in PLUGIN_PACKAGES]
  with tempfile.TemporaryDirectory(prefix=f".{plugin_dir.name}-", dir=plugin_dir.parent) as tmp:
    download = Path(tmp) / "wheels"
    source = (["--no-index", "--find-links", str(wheels)] if wheels is not None else [])
    log(f"setup: downloading {', '.join(requirements)} (~180 MB)")
    _run_pip(["download", "--no-deps", "--only-binary=:all:", "--timeout", "20", "--retries",
              "1", "--dest", str(download), *source, *requirements], "pip download")
    files = sorted(str(p) for p in download.glob("*.whl"))
    if len(files) != len(PLUGIN_PACKAGES):
      raise SetupError(f"setup: expected {len(PLUGIN_PACKAGES)} wheels, pip downloaded {files}")
    target = Path(tmp) / "install"
    log(f"setup: installing into {plugin_dir}")
    _run_pip(["install", "--no-deps", "--no-compile", "--target", str(target), *files],
             "pip install --target")
    if plugin_dir.exists():
      shutil.rmtree(plugin_dir)
    os.replace(target, plugin_dir)
  problem = plugin_problem(plugin_dir, version)
  if problem is not None:
    raise SetupError(f"setup: installed, but {problem}")
  return plugin_dir


# --------------------------------------------------------------------------- #
# Compiling (parent side: the child process and its results)
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class ProgramResult:
  """A compiled program's launch structure and compile times, or the error."""
  program: Program
  summary: LaunchSummary | None = None
  lower_s: float | None = None
  compile_s: float | None = None
  module: str | None = None
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  error: str | None = None

  @property
  def name(self) -> str:
    return self.program.name

  def as_json(self) -> dict[str, Any]:
    return {"name": self.name, "program": self.program.as_json(), "module": self.module,
            "lower_s": self.lower_s, "compile_s": self.compile_s, "info": self.info,
            "error": self.error,
            "summary": None if self.summary is None else self.summary.as_json()}


def strip_dump_flags(xla_flags: str) -> str:
  """``XLA_FLAGS`` without ``--xla_dump_to`` (each program gets its own dump folder)."""
  tokens = shlex.split(xla_flags)
  kept, skip = [], False
  for tok in tokens:
    if skip:
      skip = False
      continue
    if tok == "--xla_dump_to":
      skip = True
      continue
    if tok.startswith("--xla_dump_to="):
      continue
    kept.append(tok)
  return " ".join(kept)


def child_environment(plugin_dir: str | os.PathLike | None,
                      environ: dict[str, str] | None = None) -> dict[str, str]:
  """The compiling child's environment: the caller's, plus the plugin on ``PYTHONPATH``
  (after the caller's entries; ``plugin_dir=None``: the environment has it), CPU as JAX's
  platform, no CUDA checks, no ``--xla_dump_to``."""
  env = dict(os.environ if environ is None else environ)
  paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  if plugin_dir is not None:
    paths.append(str(Path(plugin_dir).resolve()))
  env["PYTHONPATH"] = os.pathsep.join(paths)
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
  env["XLA_FLAGS"] = strip_dump_flags(env.get("XLA_FLAGS", ""))
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # XLA's "no CUDA driver" notices
  for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    env.setdefault(name, "1")
  return env


def _read_events(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
  """The complete JSON lines of ``path`` after byte ``offset``, and the new offset."""
  if not path.exists():
    return [], offset
  with open(path, "rb") as f:
    f.seek(offset)
    data = f.read()
  complete = data[:data.rfind(b"\n") + 1]
  lines = complete.decode("utf-8").splitlines()
  return [json.loads(line) for line in lines if line.strip()], offset + len(complete)


def measure(programs: Sequence[Program | str], *, plugin_dir: str | os.PathLike | None = None,
            target_config: str | os.PathLike = DEFAULT_TARGET_CONFIG,
            dump_dir: str | os.PathLike | None = None,
            log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
            environ: dict[str, str] | None = None
            ) -> tuple[list[ProgramResult], dict[str, Any]]:
  """Compiles ``programs`` for the H100 in a child process and summarises their launch lists.

  Args:
    programs: :class:`Program` objects or names of :func:`all_programs`.
    plugin_dir: the CUDA plugin folder (default :func:`resolve_plugin_dir`); must hold the
      plugin (:func:`setup_plugin`).
    target_config: the GPU's ``GpuTargetConfig`` text proto.
    dump_dir: keep every program's full XLA dump in ``dump_dir/<program>/`` (default: a
      temporary folder, deleted; only the files the counts need are written there).
    log: progress messages.
    environ: the caller's environment (default ``os.environ``).

  Returns:
    ``(results in programs' order, environment of the compiling process)``.

  Raises:
    SetupError: the plugin folder lacks the plugin.
  """
  if any(isinstance(p, str) for p in programs):
    by_name = {p.name: p for p in all_programs()}
    unknown = [p for p in programs if isinstance(p, str) and p not in by_name]
    if unknown:
      raise ValueError(f"programs: unknown names {unknown}; choose from {sorted(by_name)}")
    programs = [by_name[p] if isinstance(p, str) else p for p in programs]
  programs = list(dict.fromkeys(programs))
  version = plugin_version()
  plugin_dir = resolve_plugin_dir(plugin_dir, version)
  problem = None if plugin_dir is None else plugin_problem(plugin_dir, version)
  if problem is not None:
    raise SetupError(f"plugin_dir: {problem}; run `python -m benchmarks.gpu_program setup`")
  target_config = Path(target_config).resolve()
  if not target_config.is_file():
    raise ValueError(f"target_config: expected a GpuTargetConfig text file, got {target_config}")
  keep = dump_dir is not None
  work = Path(tempfile.mkdtemp(prefix="nc_jax_gpu_program_"))
  base = Path(dump_dir).resolve() if keep else work / "dumps"
  results: dict[str, ProgramResult] = {}
  environment: dict[str, Any] = {}
  env = child_environment(plugin_dir, environ)
  try:
    remaining = list(programs)
    attempt = 0
    while remaining:
      attempt += 1
      events_path = work / f"events-{attempt}.jsonl"
      spec = {"programs": [], "target_config": str(target_config), "events": str(events_path),
              "keep_all": keep}
      for p in remaining:
        d = base / p.name
        if d.exists():
          shutil.rmtree(d)
        spec["programs"].append({"program": p.as_json(), "dump_dir": str(d)})
      spec_path = work / f"spec-{attempt}.json"
      spec_path.write_text(json.dumps(spec))
      stderr_path = work / f"stderr-{attempt}.txt"
      with open(stderr_path, "w", encoding="utf-8") as err:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_child",
                                 str(spec_path)], env=env, stdout=err, stderr=subprocess.STDOUT,
                                cwd=str(work))
        offset, started = 0, None
        try:
          while True:
            code = proc.poll()
            events, offset = _read_events(events_path, offset)
            for ev in events:
              if ev["event"] == "hello":
                environment = ev["environment"]
              elif ev["event"] == "start":
                started = ev["name"]
              elif ev["event"] == "done":
                started = None
                p = next(q for q in remaining if q.name == ev["name"])
                r = results[p.name] = _finish(p, ev, base / p.name)
                log(f"gpu_program: {p.name}: " + (
                    f"error: {r.error.splitlines()[0]}" if r.error else
                    f"{r.summary.launches} launches, compile {r.compile_s:.1f} s"))
            if code is not None:
              break
            time.sleep(0.2)
        except BaseException:  # e.g. KeyboardInterrupt: do not leave the compile running
          if proc.poll() is None:
            proc.kill()
            proc.wait()
          raise
      remaining = [p for p in remaining if p.name not in results]
      if remaining and code != 0:
        lines = [l for l in stderr_path.read_text(errors="replace").splitlines() if l.strip()]
        last = lines[-1].strip() if lines else "(no output)"
        tail = "\n".join(lines[-15:])
        victims = [p for p in remaining if p.name == started] or remaining
        for p in victims:
          results[p.name] = ProgramResult(
              p, error=f"compiling process exited {code}: {last}\n\n{tail}")
          log(f"gpu_program: {p.name}: compiling process exited {code}")
        remaining = [p for p in remaining if p.name not in results]
      elif remaining:
        for p in remaining:
          results[p.name] = ProgramResult(p, error="compiling process ended without a result")
        remaining = []
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return [results[p.name] for p in programs], environment


def _finish(program: Program, event: dict[str, Any], dump: Path) -> ProgramResult:
  result = ProgramResult(program, lower_s=event.get("lower_s"), compile_s=event.get("compile_s"),
                         module=event.get("module"), info=event.get("info", {}),
                         error=event.get("error"))
  if result.error is None:
    try:
      hlo = dump / "optimized_hlo.txt"
      result.summary = summarise_dump(dump, result.module,
                                      hlo.read_text() if hlo.exists() else None)
    except (OSError, ValueError) as e:
      result.error = f"reading the dump: {e}"
  return result


# --------------------------------------------------------------------------- #
# Compiling (child side: runs with the plugin importable)
# --------------------------------------------------------------------------- #


_KEEP_SUFFIXES = (".thunk_sequence.txt", ".thunk_sequence_after_thunk_passes.txt",
                  ".thunk_metadata.txt", "gpu_after_optimizations.txt", ".config.pbtxt",
                  "optimized_hlo.txt")


def _prune_dump(dump_dir: Path) -> None:
  """Deletes what the counts do not need (per-kernel LLVM IR and PTX, buffer assignment)."""
  for path in dump_dir.iterdir():
    if path.is_file() and not path.name.endswith(_KEEP_SUFFIXES):
      path.unlink()


def _build_solver(program: Program, topo) -> tuple[Callable, tuple]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import SingleDeviceSharding  # pylint: disable=import-outside-toplevel
  import nc_jax  # pylint: disable=import-outside-toplevel

  factorisation = program.factorisation

  def fn(y, p_prev, g):
    return jax.value_and_grad(
        lambda y: jnp.vdot(g, nc_jax.nearest_etf(y, p_prev, factorisation=factorisation)))(y)

  fn.__name__ = fn.__qualname__ = program.function_name
  spec = jax.ShapeDtypeStruct((program.d, program.k), jnp.float32,
                              sharding=SingleDeviceSharding(topo.devices[0]))
  return jax.jit(fn), (spec, spec, spec)


def _build_step(program: Program, topo) -> tuple[Callable, tuple, dict[str, Any]]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import SingleDeviceSharding  # pylint: disable=import-outside-toplevel
  from benchmarks import train_step as bench  # pylint: disable=import-outside-toplevel
  from nc_jax import train  # pylint: disable=import-outside-toplevel

  cfg = bench.PAPER_RESNET18.run_config(program.head, "agd")
  model = cfg.backbone()
  head_config = cfg.head_config(program.k, model.feature_dim)
  tx, init_params = cfg.optimizer_transform(steps_per_epoch=1), cfg.init_params()
  if program.devices == 1:
    mesh = None
    rep = data = SingleDeviceSharding(topo.devices[0])
  else:
    mesh = train.make_mesh(topo.devices[:program.devices])
    rep, data = train.replicated(mesh), train.batch_sharding(mesh)

  def abstract(tree, sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)

  sample = jax.ShapeDtypeStruct((2, *IMAGE_SHAPE), jnp.float32)
  state0 = jax.eval_shape(
      lambda key, x: train.create_train_state(model, tx, head_config, key, x,
                                              init_params=init_params),
      jax.random.key(0), sample)
  state0 = abstract(state0, rep)
  images = jax.ShapeDtypeStruct((program.batch, *IMAGE_SHAPE), jnp.float32, sharding=data)
  labels = jax.ShapeDtypeStruct((program.batch,), jnp.int32, sharding=data)
  step = train.compile_train_step(mesh, model=model, tx=tx, head_config=head_config)
  steady = abstract(jax.eval_shape(step, state0, images, labels)[0], rep)
  info = {"head_config": repr(head_config),
          "steady_state_differs_from_init": (jax.tree.structure(steady)
                                             != jax.tree.structure(state0))}
  return step, (state0 if program.first else steady, images, labels), info


def _answer_gpu_info_from_target(device_kind: str) -> None:
  """Makes Pallas-Triton's lowering see the compile target's GPU when none is attached.

  From jax 0.11, ``pallas_call``'s Triton lowering asks ``gpu_info.get_gpu_info()`` for the
  compute capability, which looks at an attached (or abstract-mesh) device and fails on a
  CPU-only machine ("No supported GPU devices found"); jax 0.10 did not ask. An abstract mesh
  would answer it but clashes with the steps' own meshes, so this child process (and only it:
  the library never does this) answers from the topology's device kind. No-op where the
  module or the kind is unknown.
  """
  try:
    from jax._src.pallas.triton import gpu_info  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  version = getattr(gpu_info, "gpu_version_from_device_kind", lambda _: None)(device_kind)
  if version is not None:
    gpu_info.get_gpu_info = lambda: gpu_info.get_gpu_info_from_version(version)


def _child_main(spec_path: str) -> int:
  """Compiles the programs of a spec file; appends one JSON line per event to its events file."""
  # Run as a script: drop this file's folder from the path (its module names would shadow
  # packages), and let the repository come after PYTHONPATH and the installed packages.
  here = str(Path(__file__).resolve().parent)
  sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != Path(here)]
  sys.path.append(str(REPO_ROOT))
  spec = json.loads(Path(spec_path).read_text())
  events = open(spec["events"], "a", encoding="utf-8")  # pylint: disable=consider-using-with

  def emit(**event):
    events.write(json.dumps(event) + "\n")
    events.flush()

  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  # nc_jax chooses some things by jax.default_backend() at trace time ("auto"
  # factorisation); the programs run on the GPU, so answer as a GPU process would.
  jax.default_backend = lambda: "gpu"
  import nc_jax  # pylint: disable=import-outside-toplevel
  from nc_jax import solver  # pylint: disable=import-outside-toplevel

  target = Path(spec["target_config"]).read_text()
  topos: dict[int, Any] = {}

  def topology(devices: int):
    if devices not in topos:
      topos[devices] = topologies.get_topology_desc(
          platform="cuda", topology=topology_string(devices), target_config=target)
    return topos[devices]

  from importlib import metadata  # pylint: disable=import-outside-toplevel
  versions = {}
  for package in ("jaxlib", "jax-cuda12-plugin"):
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      versions[package] = None
  try:
    auto = solver.resolve_factorisation("auto")
  except Exception as e:  # pylint: disable=broad-except
    auto = f"? ({e})"
  device_kind = topology(1).devices[0].device_kind
  _answer_gpu_info_from_target(device_kind)
  emit(event="hello", environment={
      "jax": jax.__version__, "jaxlib": versions["jaxlib"],
      "cuda_plugin": versions["jax-cuda12-plugin"],
      "nc_jax": str(Path(nc_jax.__file__).resolve().parent),
      "python": platform.python_version(), "device_kind": device_kind,
      "auto_factorisation": auto, "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "target_config": spec["target_config"]})
  for item in spec["programs"]:
    program = Program.from_json(item["program"])
    dump = Path(item["dump_dir"])
    dump.mkdir(parents=True, exist_ok=True)
    emit(event="start", name=program.name)
    out: dict[str, Any] = {"event": "done", "name": program.name, "info": {}}
    try:
      t0 = time.perf_counter()
      topo = topology(program.devices)
      if program.kind == "solver":
        fn, args = _build_solver(program, topo)
      else:
        fn, args, out["info"] = _build_step(program, topo)
      lowered = fn.trace(*args).lower()
      out["lower_s"] = time.perf_counter() - t0
      t1 = time.perf_counter()
      compiled = lowered.compile({"xla_dump_to": str(dump)})
      out["compile_s"] = time.perf_counter() - t1
      text = compiled.as_text()
      (dump / "optimized_hlo.txt").write_text(text)
      m = re.match(r"HloModule (\S+?),?\s", text)
      out["module"] = m.group(1) if m else None
      if program.kind == "solver":
        out["info"]["factorisation"] = (solver.resolve_factorisation(program.factorisation)
                                        if program.factorisation == "auto"
                                        else program.factorisation)
      del compiled, lowered
    except Exception as e:  # pylint: disable=broad-except
      first = (str(e).strip().splitlines() or [""])[0]
      out["error"] = f"{type(e).__name__}: {first}\n\n{traceback.format_exc(limit=6)}"
    if not spec.get("keep_all"):
      _prune_dump(dump)
    jax.clear_caches()
    emit(**out)
  events.close()
  return 0


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #


HEADERS = ("program", "launches", "CUDA graphs (ops)", "cond", "while known/unknown",
           "cuSOLVER", "trsm", "other custom calls", "lower s", "compile s")


def _counted(names: Sequence[str]) -> str:
  if not names:
    return "0"
  counts = collections.Counter(short_target(n) for n in names)
  return f"{len(names)}: " + ", ".join(f"{n}×{c}" if c > 1 else n
                                       for n, c in sorted(counts.items()))


def table_row(r: ProgramResult) -> list[str]:
  if r.summary is None:
    first = (r.error or "failed").strip().splitlines()[0]
    return [r.name, f"error: {first[:120]}"] + [""] * (len(HEADERS) - 2)
  s = r.summary
  cond = str(s.conditionals) + (f" (+{s.graph_conditionals} in graph)" if s.graph_conditionals
                                else "")
  whiles = f"{s.whiles_known}/{s.whiles_unknown}" + (
      f" (+{s.graph_whiles} in graph)" if s.graph_whiles else "")
  name = r.name
  if r.info.get("factorisation") and r.program.factorisation == "auto":
    name += f" (= {r.info['factorisation']})"
  others = "–" if not s.other_custom_calls else _counted(s.other_custom_calls)
  return [name, str(s.launches), f"{s.graphs} ({s.graph_ops})", cond, whiles,
          _counted(s.cusolver), str(s.triangular_solves), others,
          "–" if r.lower_s is None else f"{r.lower_s:.1f}",
          "–" if r.compile_s is None else f"{r.compile_s:.1f}"]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                   right_align_from: int = 1) -> str:
  align = ["---:" if i >= right_align_from else "---" for i in range(len(headers))]
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def host_environment(command: str) -> dict[str, Any]:
  from benchmarks import cpu_model  # pylint: disable=import-outside-toplevel  (parent only)
  return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "host": f"{cpu_model()}, {os.cpu_count()} cores", "command": command}


def report(results: Sequence[ProgramResult], environment: dict[str, Any],
           total_s: float | None = None) -> str:
  env = environment
  lines = ["# GPU program structure (`benchmarks/gpu_program.py`)", "",
           f"- target: {env.get('device_kind', '?')} "
           f"(`{Path(env.get('target_config', '?')).name}`), "
           f"deviceless compile; jax {env.get('jax', '?')}, CUDA plugin "
           f"{env.get('cuda_plugin', '?')}, Python {env.get('python', '?')}",
           f"- nc_jax: `{env.get('nc_jax', '?')}`; `auto` factorisation on the GPU = "
           f"{env.get('auto_factorisation', '?')}",
           f"- compiled on: {env.get('host', '?')}, {env.get('date', '?')}"
           + ("" if total_s is None else f", {total_s:.0f} s in all"),
           f"- XLA_FLAGS: `{env.get('xla_flags') or '(none)'}`",
           f"- command: `{env.get('command', '?')}`", ""]
  lines.append(markdown_table(HEADERS, [table_row(r) for r in results]))
  lines += ["", "launches: top-level entries of XLA's launch list (host launches per "
            "execution; a CUDA graph counts once); CUDA graphs: kCommandBuffer entries (ops "
            "inside them); cond: host-run conditionals (a device→host sync each); while: "
            "host-run loops with known trip count / unknown (a sync per iteration); cuSOLVER "
            "and trsm cannot be captured in CUDA graphs. Static counts (a loop body counts "
            "once). Steps: steady state (the state a step returns), batch 256, ResNet18 "
            "(ImageNet stem, affine=False), AGD, τ = 5; dp2: two H100s, data-parallel."]
  failed = [r for r in results if r.error]
  for r in failed:
    lines += ["", f"{r.name} failed:", "```", r.error.rstrip(), "```"]
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.gpu_program",
      description="Compile the solver and train step for an H100 (no GPU needed) and count "
                  "launches, CUDA graphs, conditionals, loops and cuSOLVER calls.")
  parser.add_argument("command", nargs="?", choices=("run", "setup"), default="run",
                      help="'setup': install the CUDA plugin and exit; 'run' (default): compile")
  parser.add_argument("--setup", action="store_true",
                      help="install the CUDA plugin first if it is missing")
  parser.add_argument("--programs", default=None,
                      help="comma-separated program names or globs (default: all; see --list)")
  parser.add_argument("--list", action="store_true", help="print the program names and exit")
  parser.add_argument("--json", metavar="PATH", default=None,
                      help="also write machine-readable results to PATH")
  parser.add_argument("--plugin-dir", default=None,
                      help=f"CUDA plugin folder (default ${PLUGIN_DIR_ENV}, else the "
                           "environment's plugin if it has one, else .gpu-aot/<jaxlib version>/)")
  parser.add_argument("--wheels", default=None,
                      help="setup: install from this folder of wheels, without an index")
  parser.add_argument("--target-config", default=str(DEFAULT_TARGET_CONFIG),
                      help="GpuTargetConfig text proto of the GPU (default: benchmarks/h100.txtpb)")
  parser.add_argument("--dump-dir", default=None,
                      help="keep each program's full XLA dump in DIR/<program>/")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  command = "python -m benchmarks.gpu_program " + shlex.join(
      sys.argv[1:] if argv is None else list(argv))
  plugin_dir = Path(args.plugin_dir) if args.plugin_dir else None
  if args.command == "setup":
    try:
      setup_plugin(plugin_dir, wheels=args.wheels)
    except SetupError as e:
      print(e, file=sys.stderr)
      return 2
    return 0
  try:
    programs = select_programs(all_programs(), args.programs)
  except ValueError as e:
    print(e, file=sys.stderr)
    return 2
  if args.list:
    print("\n".join(p.name for p in programs))
    return 0
  t0 = time.perf_counter()
  try:
    if args.setup:
      plugin_dir = setup_plugin(plugin_dir, wheels=args.wheels)
    results, env = measure(programs, plugin_dir=plugin_dir, target_config=args.target_config,
                           dump_dir=args.dump_dir)
  except (SetupError, ValueError) as e:
    print(e, file=sys.stderr)
    return 2
  env.update(host_environment(command))
  total = time.perf_counter() - t0
  print(report(results, env, total), end="")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"environment": env, "total_s": total,
                 "programs": [r.as_json() for r in results]}, f, indent=2)
      f.write("\n")
  return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "_child":
    sys.exit(_child_main(sys.argv[2]))
  sys.exit(main())
