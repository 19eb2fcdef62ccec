"""``benchmarks/gpu_program.py``: the launch-list parser, and the GPU program's structure.

Two parts. The parser is tested on a checked-in excerpt of XLA:GPU's launch-list dump
(below; the format of ``Thunk::ToString`` in jax 0.10.2's XLA, with the quirks that matter:
``condition:`` always in column 0, a ``kSequential``'s first entry on its own line, command
buffers nested in loop bodies and branches).

The structural test compiles, for an NVIDIA H100 on this CPU-only machine (XLA's deviceless
compile, through the tool's child process and the CUDA plugin it installs into
``.gpu-aot/<version>/``), the paper's steady-state train step (ResNet18, batch 256) with the
standard and the implicit-ETF head at K = 10 and 100, and the solver's forward+backward at
512×10, and asserts the target structure: the implicit head adds at most 4 top-level launches
to the standard step and no host synchronisation (no conditional, no while loop, no cuSOLVER
call, no triangular solve); the matmul-only solver is at most 3 launches. Without network for
the plugin's download the structural tests are skipped, unless ``NC_JAX_REQUIRE_GPU_AOT=1``.
"""

import os
import sys

import pytest

from benchmarks import gpu_program as gp

# --------------------------------------------------------------------------- #
# Fixtures: an excerpt of a launch list, its thunk metadata and optimized HLO
# --------------------------------------------------------------------------- #

# Top level: a CUDA graph; a while loop (known trip count) whose body holds a CUDA graph and a
# cuSOLVER call; a kernel; a kSequential (copy + trsm); a cuSOLVER call; a conditional whose
# true branch holds a while loop (unknown trip count) with a CUDA graph in its body; a CUDA
# graph holding a captured conditional; another custom call.
LISTING = (
    "000: kCommandBuffer [source       | next=010 (1)] \n"
    "    001: kCopy         [source       | next=002 (1)] kCopy\n"
    "    002: kCustomKernel [prev=001 (1) | next=003 (1)] loop_add_fusion grid: [40, 1, 1] "
    "threads: [128, 1, 1]  shared_memory: 0 bytes\n"
    "    003: kCustomKernel [prev=002 (1) | sink        ] gemm_fusion_dot_0 grid: [2, 1, 1] "
    "threads: [64, 1, 1]  shared_memory: 1536 bytes\n"
    "010: kWhile         [prev=000 (1) | next=019 (1)]   \n"
    "condition:\n"
    "    011: kCustomKernel [source       | next=012 (1)] input_reduce_fusion grid: [1, 1, 1] "
    "threads: [32, 1, 1]  shared_memory: 0 bytes\n"
    "    012: kCustomKernel [prev=011 (1) | sink        ] loop_compare_fusion grid: [1, 1, 1] "
    "threads: [1, 1, 1]  shared_memory: 0 bytes\n"
    "  body:\n"
    "    000: kCommandBuffer [source | next=018 (1)] \n"
    "        013: kCustomKernel [source       | next=014 (1)] loop_add_fusion_1 grid: [1, 1, 1] "
    "threads: [1, 1, 1]  shared_memory: 0 bytes\n"
    "        014: kCustomKernel [prev=013 (1) | next=015 (1)] gemm_fusion_dot_1 grid: [64, 1, 1] "
    "threads: [64, 1, 1]  shared_memory: 1536 bytes\n"
    "        015: kCopy         [prev=014 (1) | sink        ] kCopy\n"
    "    018: kCustomCall   [prev=000 (1) | sink        ] kCustomCall\n"
    "019: kCustomKernel  [prev=010 (1) | next=021 (1)] wrapped_transpose grid: [40, 1, 1] "
    "threads: [128, 1, 1]  shared_memory: 0 bytes\n"
    "021: kSequential   [prev=019 (1) | next=022 (1)]   020: kCopy            "
    "[source       | next=023 (1)] kCopy\n"
    "  023: kTriangularSolve [prev=020 (1) | sink        ] (no description)\n"
    "022: kCustomCall   [prev=021 (1) | next=040 (1)] kCustomCall\n"
    "040: kConditional  [prev=022 (1) | next=000 (1)]   \n"
    "  false_branch:\n"
    "    041: kCustomKernel [source | sink] loop_select_fusion grid: [1, 1, 1] "
    "threads: [100, 1, 1]  shared_memory: 0 bytes\n"
    "  true_branch:\n"
    "    042: kCustomKernel [source       | next=043 (1)] loop_multiply_fusion grid: [1, 1, 1] "
    "threads: [100, 1, 1]  shared_memory: 0 bytes\n"
    "    043: kWhile        [prev=042 (1) | sink        ]     \n"
    "condition:\n"
    "        044: kCustomKernel [source | sink] loop_compare_fusion_1 grid: [1, 1, 1] "
    "threads: [1, 1, 1]  shared_memory: 0 bytes\n"
    "      body:\n"
    "        000: kCommandBuffer [source | sink] \n"
    "            045: kCustomKernel [source       | next=046 (1)] gemm_fusion_dot_2 "
    "grid: [4, 1, 1] threads: [64, 1, 1]  shared_memory: 1536 bytes\n"
    "            046: kCustomKernel [prev=045 (1) | sink        ] loop_divide_fusion "
    "grid: [1, 1, 1] threads: [100, 1, 1]  shared_memory: 0 bytes\n"
    "000: kCommandBuffer [prev=040 (1) | next=060 (1)] \n"
    "    050: kCustomKernel [source       | next=051 (1)] input_reduce_fusion_2 "
    "grid: [1, 1, 1] threads: [32, 1, 1]  shared_memory: 0 bytes\n"
    "    051: kConditional  [prev=050 (1) | sink        ]     \n"
    "      true_branch:\n"
    "        052: kCustomKernel [source | sink] loop_sin_fusion grid: [40, 1, 1] "
    "threads: [128, 1, 1]  shared_memory: 0 bytes\n"
    "      false_branch:\n"
    "        053: kCustomKernel [source | sink] loop_cos_fusion grid: [40, 1, 1] "
    "threads: [128, 1, 1]  shared_memory: 0 bytes\n"
    "060: kCustomCall   [prev=000 (1) | sink        ] kCustomCall\n")


def _meta(thunk_id, name, kind):
  return (f'thunk_metadata {{\n  thunk_info {{\n    profile_annotation: "{name}"\n'
          f"    thunk_id: {thunk_id}\n  }}\n  thunk_kind: \"{kind}\"\n}}\n")


METADATA = ('thunk_metadata {\n  thunk_info {\n    profile_annotation: "command_buffer_1"\n'
            '  }\n  thunk_kind: "kCommandBuffer"\n}\n'
            + _meta(2, "loop_add_fusion", "kCustomKernel") + _meta(10, "while.3", "kWhile")
            + _meta(18, "cholesky.1", "kCustomCall") + _meta(22, "geqrf.0", "kCustomCall")
            + _meta(23, "triangular-solve", "kTriangularSolve")
            + _meta(40, "cond.1.clone", "kConditional") + _meta(43, "while.7", "kWhile")
            + _meta(51, "cond.2", "kConditional")
            + _meta(60, "lu_pivots_to_permutation.1", "kCustomCall"))

HLO = """\
HloModule jit_f, is_scheduled=true, entry_computation_layout={(f32[512,10]{1,0})->f32[512,10]{1,0}}

ENTRY %main.5 (p0: f32[512,10]) -> f32[512,10] {
  %while.3 = (s32[], f32[512,10]{1,0}) while(%tuple.22), condition=%region_1.3, body=%region_0.2, \
metadata={op_name="jit(f)/while"}, backend_config={"known_trip_count":{"n":"7"},\
"known_init_step":{"init":"0","step":"1"},"known_induction_variable":{"tuple_index":"0"},\
"dynamic_variables":[]}
  %while.7 = f32[512,10]{1,0} while(%x), condition=%region_3.6, body=%region_2.4, \
metadata={op_name="jit(f)/while"}
  %cholesky.1 = (f32[10,10]{0,1}, s32[]) custom-call(%b), custom_call_target="cusolver_potrf_ffi", \
api_version=API_VERSION_TYPED_FFI
  %geqrf.0 = (f32[512,10]{0,1}, f32[10]{0}) custom-call(%a), custom_call_target="cusolver_geqrf_ffi"
  %triangular-solve = (f32[10,512]{0,1}, s8[0]{0}) custom-call(%l, %c), \
custom_call_target="__cublas$triangularSolve", backend_config={"left_side":true}
  ROOT %lu_pivots_to_permutation.1 = s32[10]{0} custom-call(%p), \
custom_call_target="cu_lu_pivots_to_permutation"
}
"""


def _summary():
  return gp.summarise(gp.parse_thunk_listing(LISTING), gp.parse_thunk_metadata(METADATA),
                      gp.parse_hlo(HLO))


# --------------------------------------------------------------------------- #
# Parser
# --------------------------------------------------------------------------- #


def test_listing_tree_follows_xla_nesting():
  root = gp.parse_thunk_listing(LISTING)
  assert [(t.id, t.kind) for t in root.children] == [
      (0, "kCommandBuffer"), (10, "kWhile"), (19, "kCustomKernel"), (21, "kSequential"),
      (22, "kCustomCall"), (40, "kConditional"), (0, "kCommandBuffer"), (60, "kCustomCall")]
  loop = root.children[1]
  assert [(t.id, t.region) for t in loop.children] == [
      (11, "condition"), (12, "condition"), (0, "body"), (18, "body")]
  assert [t.id for t in loop.children[2].children] == [13, 14, 15]
  seq = root.children[3]
  assert [(t.id, t.kind) for t in seq.children] == [(20, "kCopy"), (23, "kTriangularSolve")]
  cond = root.children[5]
  assert [(t.id, t.region) for t in cond.children] == [
      (41, "false_branch"), (42, "true_branch"), (43, "true_branch")]
  inner = cond.children[2]
  assert [(t.id, t.kind, t.region) for t in inner.children] == [
      (44, "kCustomKernel", "condition"), (0, "kCommandBuffer", "body")]
  assert [t.id for t in inner.children[1].children] == [45, 46]
  graph = root.children[6]
  assert [t.id for t in graph.children] == [50, 51]
  assert [(t.id, t.region) for t in graph.children[1].children] == [
      (52, "true_branch"), (53, "false_branch")]


def test_nested_command_buffers_are_not_top_level_launches():
  s = _summary()
  # 2 graphs, the loop, a kernel, the kSequential's copy and trsm, 2 custom calls, the
  # conditional; not the graphs inside the loop body or the conditional's branch.
  assert s.launches == 9
  assert s.top_level_kinds == {"kCommandBuffer": 2, "kWhile": 1, "kCustomKernel": 1,
                               "kCopy": 1, "kTriangularSolve": 1, "kCustomCall": 2,
                               "kConditional": 1}
  assert s.graphs == 4  # two top-level, one in each loop body
  assert s.graph_ops == 11  # 3 + 3 + 2 + 3 (the captured conditional itself is no op)


def test_control_flow_sync_points_and_library_calls():
  s = _summary()
  assert (s.conditionals, s.graph_conditionals) == (1, 1)
  assert (s.whiles_known, s.whiles_unknown, s.graph_whiles) == (1, 1, 0)
  assert s.whiles == 2 and s.sync_points == 2
  assert s.cusolver == ["cusolver_geqrf_ffi", "cusolver_potrf_ffi"]
  assert s.triangular_solves == 1
  assert s.other_custom_calls == ["cu_lu_pivots_to_permutation"]
  loops = {c["id"]: c for c in s.control_flow}
  assert loops[10] == {"kind": "kWhile", "id": 10, "hlo": "while.3", "known_trip_count": 7,
                       "launches": {"condition": 2, "body": 2}}
  assert loops[40]["launches"] == {"false_branch": 1, "true_branch": 2}
  assert loops[43]["known_trip_count"] is None and loops[43]["launches"] == {
      "condition": 1, "body": 1}
  assert 51 not in loops  # captured in a graph: no host control flow


def test_metadata_and_hlo_parsers():
  meta = gp.parse_thunk_metadata(METADATA)
  assert meta[10] == ("while.3", "kWhile") and meta[60][0] == "lu_pivots_to_permutation.1"
  assert 0 not in meta  # the command buffer has no id
  hlo = gp.parse_hlo(HLO)
  assert hlo.while_trip_counts == {"while.3": 7, "while.7": None}
  assert hlo.custom_call_targets["triangular-solve"] == "__cublas$triangularSolve"
  assert hlo.custom_call_targets["lu_pivots_to_permutation.1"] == "cu_lu_pivots_to_permutation"
  assert gp.is_cusolver("cusolver_syevd_ffi") and not gp.is_cusolver("__cublas$gemm")
  assert gp.short_target("cusolver_gesvdj_ffi") == "gesvdj"


def test_unmapped_custom_call_is_reported_not_dropped():
  s = gp.summarise(gp.parse_thunk_listing(LISTING), {}, gp.parse_hlo(""))
  assert s.cusolver == [] and len(s.other_custom_calls) == 3
  assert s.whiles_unknown == 2  # without metadata no trip count is known


def test_summarise_dump_prefers_the_listing_after_thunk_passes(tmp_path):
  prefix = tmp_path / "module_0007.jit_f"
  (tmp_path / f"{prefix.name}.thunk_sequence.txt").write_text(
      "001: kCustomKernel [source | sink] a\n002: kCustomKernel [source | sink] b\n")
  (tmp_path / f"{prefix.name}.thunk_sequence_after_thunk_passes.txt").write_text(LISTING)
  (tmp_path / f"{prefix.name}.thunk_metadata.txt").write_text(METADATA)
  (tmp_path / f"{prefix.name}.sm_9.0a_gpu_after_optimizations.txt").write_text(HLO)
  s = gp.summarise_dump(tmp_path, "jit_f")
  assert s.launches == 9 and s.listing.endswith("after_thunk_passes.txt")
  assert s.cusolver == ["cusolver_geqrf_ffi", "cusolver_potrf_ffi"]
  with pytest.raises(ValueError, match="expected module 'jit_g'"):
    gp.summarise_dump(tmp_path, "jit_g")
  (tmp_path / "module_0008.jit_h.thunk_sequence.txt").write_text("")
  with pytest.raises(ValueError, match="one GPU module"):
    gp.summarise_dump(tmp_path, "jit_f")


# --------------------------------------------------------------------------- #
# Programs, environment, set-up, report
# --------------------------------------------------------------------------- #


def test_program_names_and_selection():
  programs = gp.all_programs(("svd", "newton_schulz", "auto"))
  names = [p.name for p in programs]
  assert len(names) == len(set(names)) == 3 * 3 + 2 * 8 + 4
  assert "solver-newton_schulz-512x10" in names and "step-implicit-k100" in names
  assert "dp2-step-implicit-fo-k10" in names and "step-implicit-k10-first" in names
  solver_fns = [p.function_name for p in programs if p.kind == "solver"]
  assert len(set(solver_fns)) == len(solver_fns) and all(f.isidentifier() for f in solver_fns)
  picked = gp.select_programs(programs, "step-implicit-*,solver-*-512x10")
  assert [p.name for p in picked] == [
      "solver-svd-512x10", "solver-newton_schulz-512x10", "solver-auto-512x10",
      "step-implicit-k10", "step-implicit-fo-k10", "step-implicit-k100", "step-implicit-fo-k100",
      "step-implicit-k10-first", "step-implicit-fo-k10-first", "step-implicit-k100-first",
      "step-implicit-fo-k100-first"]
  with pytest.raises(ValueError, match=r"programs: \['nope\*'\] match none"):
    gp.select_programs(programs, "step-standard-k10,nope*")
  assert gp.Program.from_json(picked[3].as_json()) == picked[3]


def test_child_environment_keeps_the_plugin_out_of_the_caller(tmp_path):
  env = gp.child_environment(tmp_path, {
      "PYTHONPATH": "/some/checkout", "JAX_PLATFORMS": "cuda",
      "XLA_FLAGS": "--xla_dump_to=/x --xla_gpu_graph_min_graph_size=2 --xla_dump_to /y "
                   "--xla_force_host_platform_device_count=8"})
  assert env["PYTHONPATH"].split(os.pathsep) == ["/some/checkout", str(tmp_path.resolve())]
  assert env["JAX_PLATFORMS"] == "cpu" and env["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] == "1"
  assert env["XLA_FLAGS"] == ("--xla_gpu_graph_min_graph_size=2 "
                              "--xla_force_host_platform_device_count=8")
  assert not any(m.startswith("jax_cuda12") for m in sys.modules)  # parent: no plugin
  assert gp.child_environment(None, {"PYTHONPATH": "/a"})["PYTHONPATH"] == "/a"


def test_plugin_check_and_offline_setup_failure(tmp_path):
  plugin = tmp_path / "plugin"
  assert "does not exist" in gp.plugin_problem(plugin, "9.9.9")
  for dist in ("jax_cuda12_plugin-9.9.9.dist-info", "jax_cuda12_pjrt-9.9.9.dist-info",
               "jax_plugins"):
    (plugin / dist).mkdir(parents=True)
  assert gp.plugin_problem(plugin, "9.9.9") is None
  assert "jax-cuda12-plugin 9.9.8" in gp.plugin_problem(plugin, "9.9.8")
  assert gp.setup_plugin(plugin, "9.9.9", log=lambda s: None) == plugin  # present: no pip
  empty = tmp_path / "wheels"
  empty.mkdir()
  with pytest.raises(gp.SetupError, match="pip download failed"):
    gp.setup_plugin(tmp_path / "other", "9.9.9", wheels=empty, log=lambda s: None)
  assert not (tmp_path / "other").exists()


def test_report_rows():
  program = gp.Program("solver-auto-512x10", "solver", factorisation="auto", d=512, k=10)
  ok = gp.ProgramResult(program, _summary(), lower_s=0.1, compile_s=1.5,
                        info={"factorisation": "newton_schulz"})
  row = gp.table_row(ok)
  assert row[:5] == ["solver-auto-512x10 (= newton_schulz)", "9", "4 (11)",
                     "1 (+1 in graph)", "1/1"]
  assert row[5] == "2: geqrf, potrf" and row[6] == "1"
  bad = gp.table_row(gp.ProgramResult(program, error="ValueError: boom\n\nTraceback ..."))
  assert bad[1] == "error: ValueError: boom" and len(bad) == len(gp.HEADERS)
  text = gp.report([ok], {"jax": "0.10.2"})
  assert "| solver-auto-512x10 (= newton_schulz) | 9 |" in text


# --------------------------------------------------------------------------- #
# The GPU program (deviceless H100 compile; CUDA plugin needed)
# --------------------------------------------------------------------------- #

STEP_PROGRAMS = [f"step-{h}-k{k}" for k in (10, 100) for h in ("standard", "implicit")]
SOLVER_PROGRAMS = ["solver-newton_schulz-512x10", "solver-auto-512x10"]
MAX_EXTRA_STEP_LAUNCHES = 4
MAX_SOLVER_LAUNCHES = 3


@pytest.fixture(scope="module")
def plugin_dir():
  """The CUDA plugin folder (``None``: the environment's), set up on first use; skipped (or
  failed) without network."""
  path = gp.resolve_plugin_dir()
  if path is not None and gp.plugin_problem(path, gp.plugin_version()) is not None:
    try:
      gp.setup_plugin(path)
    except gp.SetupError as e:
      if os.environ.get("NC_JAX_REQUIRE_GPU_AOT") == "1":
        pytest.fail(f"NC_JAX_REQUIRE_GPU_AOT=1 and the CUDA plugin could not be set up: {e}")
      pytest.skip(f"CUDA plugin for the deviceless GPU compile not available: {e}")
  return path


def users_environment(environ):
  """``environ`` without the XLA flags the test session added for its CPU compiles
  (tests/conftest.py names them in ``NC_JAX_TEST_ADDED_XLA_FLAGS``): the H100 program is
  compiled as a user's compile makes it."""
  environ = dict(environ)
  added = environ.pop("NC_JAX_TEST_ADDED_XLA_FLAGS", "").split()
  environ["XLA_FLAGS"] = " ".join(f for f in environ.get("XLA_FLAGS", "").split()
                                  if f not in added)
  return environ


def test_the_h100_compile_gets_the_callers_flags_without_the_sessions():
  session = {"XLA_FLAGS": "--xla_dump_hlo_as_text --xla_backend_optimization_level=0",
             "NC_JAX_TEST_ADDED_XLA_FLAGS": "--xla_backend_optimization_level=0", "A": "1"}
  assert users_environment(session) == {"XLA_FLAGS": "--xla_dump_hlo_as_text", "A": "1"}
  # A level the caller chose (nothing added by the session) is kept.
  caller = {"XLA_FLAGS": "--xla_backend_optimization_level=1"}
  assert users_environment(caller) == caller
  # This session: the flag, if added, is in XLA_FLAGS and named for removal.
  added = os.environ.get("NC_JAX_TEST_ADDED_XLA_FLAGS")
  if added:
    assert added in os.environ["XLA_FLAGS"]
    assert added not in users_environment(os.environ)["XLA_FLAGS"]


@pytest.fixture(scope="module")
def gpu_programs(plugin_dir):
  """Each program compiled once for the H100 (one child process): name -> ProgramResult."""
  results, _ = gp.measure(STEP_PROGRAMS + SOLVER_PROGRAMS, plugin_dir=plugin_dir,
                          log=lambda s: None, environ=users_environment(os.environ))
  for r in results:
    assert r.error is None, f"{r.name}: {r.error}"
  return {r.name: r for r in results}


@pytest.mark.slow
@pytest.mark.parametrize("k", [10, 100])
def test_steady_state_implicit_step_has_no_host_sync(gpu_programs, k):
  s = gpu_programs[f"step-implicit-k{k}"].summary
  assert s.conditionals + s.graph_conditionals == 0, s.control_flow
  assert s.whiles == 0, s.control_flow
  assert s.cusolver == []
  assert s.triangular_solves == 0


@pytest.mark.slow
@pytest.mark.parametrize("k", [10, 100])
def test_implicit_step_adds_at_most_four_launches(gpu_programs, k):
  implicit = gpu_programs[f"step-implicit-k{k}"].summary
  standard = gpu_programs[f"step-standard-k{k}"].summary
  assert standard.sync_points == 0 and standard.cusolver == []
  assert implicit.launches <= standard.launches + MAX_EXTRA_STEP_LAUNCHES, (
      implicit.top_level_kinds, standard.top_level_kinds)


@pytest.mark.slow
@pytest.mark.parametrize("name", SOLVER_PROGRAMS)
def test_matmul_only_solver_is_a_few_launches_without_sync(gpu_programs, name):
  s = gpu_programs[name].summary
  assert s.launches <= MAX_SOLVER_LAUNCHES, s.top_level_kinds
  assert s.whiles == 0 and s.conditionals + s.graph_conditionals == 0, s.control_flow
  assert s.cusolver == [] and s.triangular_solves == 0
  # At K = 10 the fused Pallas kernels (nc_jax.pallas_newton_schulz): forward and backward one
  # kernel each, a handful of ops in the graph instead of ~177 with XLA's GEMMs.
  assert s.graph_ops <= 8, s.graph_ops
