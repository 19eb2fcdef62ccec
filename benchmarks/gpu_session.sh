#!/usr/bin/env bash
# One prepared accelerator session (issues #5, #10), sized to finish within 8 minutes of a
# 15-minute device lease: the performance report (benchmarks/perf_report.py) on a quiet GPU —
#   solver forward+backward at (512,10), (512,100), (2048,1000): the default "auto" (on a GPU
#     the matmul-only Newton–Schulz solve, no cuSOLVER, no loop), polar-svd for reference, and
#     the dense DDN port of the official backward;
#   head step ratios on the paper's ResNet18 at K = 10 and 100, batch 256 (standard, implicit,
#     implicit-fo), with host-dispatch time; the CIFAR-stem bf16 throughput;
#   a timed FashionMNIST epoch.
# The 20-epoch FashionMNIST runs of issue #5 are part 2, off unless RUNS=1 (they exist from the
# first lease; a 200-epoch sweep does not fit a lease).
#
# PREFLIGHT=1 runs on a CPU machine *before* a lease, so device time is never spent on compile
# errors: (a) every program the session times, compiled for an H100 without a GPU
# (benchmarks/gpu_program.py: the solver at the three sizes, the steady-state and first-step
# train steps), failing on any compile error or on a host synchronisation in the implicit
# step; (b) the same script end to end on the CPU with tiny sizes (the Python paths of all
# three parts). It prints "preflight ok" and exits 0 only if both pass.
#
# SOLVER_ARGS, STEP_ARGS, EPOCH_ARGS replace the three benchmarks' arguments; PERF_TIMEOUT
# bounds part 1 (default 450 s), PART_TIMEOUT each of its three parts (default 200 s).
# Everything lands in $OUT (default ./gpu_out) as report.md, session.log and runs.tgz.
#
# Usage (repository root; FashionMNIST IDX files in $DATA):
#   PREFLIGHT=1 bash benchmarks/gpu_session.sh          # here, on the CPU, before the lease
#   DATA=/usr/share/datasets/fashion-mnist bash benchmarks/gpu_session.sh   # on the GPU
set -u
OUT=${OUT:-gpu_out}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
EPOCHS=${EPOCHS:-20}
PERF_TIMEOUT=${PERF_TIMEOUT:-450}
PART_TIMEOUT=${PART_TIMEOUT:-200}
RUNS=${RUNS:-0}
RUNS_TIMEOUT=${RUNS_TIMEOUT:-270}
WORK=${WORK:-/tmp/nc_jax_gpu}
SIZES=512x10,512x100,2048x1000
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK/logs"

if [ "${PREFLIGHT:-0}" = 1 ]; then
  set -e
  # (a) The session's programs, compiled for the H100 target (first run: `setup` downloads the
  #     CUDA plugin wheels, ~180 MB, into .gpu-aot/).
  python3 -m benchmarks.gpu_program --setup --json "$OUT/preflight_programs.json" \
    --programs "solver-auto-*,solver-svd-*,step-standard-k10,step-standard-k100,step-implicit-k10,step-implicit-k100,step-implicit-fo-k10,step-implicit-fo-k100,step-implicit-k10-first,step-implicit-k100-first" \
    | tee "$OUT/preflight_programs.md"
  python3 - "$OUT/preflight_programs.json" <<'EOF'
import json, sys
results = json.load(open(sys.argv[1]))["programs"]
failed = [r["name"] for r in results if r["error"] or not r["summary"]]
ok = {r["name"]: r["summary"] for r in results if r["summary"]}
syncs = [n for n, s in ok.items() if n.startswith("step-implicit") and not n.endswith("-first")
         and (s["conditionals"] or s["whiles"] or s["cusolver"] or s["triangular_solves"])]
if failed or syncs:
  sys.exit(f"preflight: compile errors in {failed}; host synchronisations in {syncs}")
EOF
  # (b) The whole script on the CPU at smoke sizes.
  OUT="$WORK/preflight_dry" PREFLIGHT=0 WORK="$WORK/preflight_work" \
    SOLVER_ARGS="--sizes 16x4 --variants polar-auto,polar-svd,dense-ddn" \
    STEP_ARGS="--quick --heads standard,implicit,implicit-fo" \
    EPOCH_ARGS="--source synthetic --num-examples 256 --model mlp" \
    bash "$0"
  grep -q "implicit/standard" "$WORK/preflight_dry/report.md"
  echo "preflight ok"
  exit 0
fi

exec > >(tee "$OUT/session.log") 2>&1
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import jax, flax, optax, sys; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"

# 1. Performance report on a quiet GPU. The first lease (2026-11-27) showed what fits: GPU
#    compiles of QDWH/RGD programs took 8-15 s each and the part timed out, so only the
#    default (auto), the SVD reference and the dense DDN; three heads per (K, B).
t0=$(date +%s)
[ "${SKIP_PERF:-0}" = 1 ] || timeout "$PERF_TIMEOUT" python3 -m benchmarks.perf_report \
  --out "$WORK/perf" --timeout "$PART_TIMEOUT" \
  --solver-args="${SOLVER_ARGS:---sizes $SIZES --variants polar-auto,polar-svd,dense-ddn}" \
  --step-args="${STEP_ARGS:---batches 256 --classes 10,100 --sections heads,throughput --heads standard,implicit,implicit-fo}" \
  --epoch-args="${EPOCH_ARGS:---source idx --data-path $DATA}" || echo "perf_report exit $?"
echo "perf report: $(( $(date +%s) - t0 )) s"
cp "$WORK/perf/report.md" "$OUT/report.md" 2>/dev/null || true

# 2. FashionMNIST, 3 methods x 3 seeds (no preallocation: three processes share the GPU's
#    memory).
if [ "$RUNS" = 1 ]; then
t0=$(date +%s)
export XLA_PYTHON_CLIENT_PREALLOCATE=false
pids=()
for method in standard fixed implicit; do
  timeout "$RUNS_TIMEOUT" python3 -m experiments.fashion_mnist --method "$method" \
    --seeds 1-3 --epochs "$EPOCHS" --source idx --data-path "$DATA" --nc-every 5 \
    --checkpoint-every 1000 --keep 1 --quiet --no-plot --out "$WORK/runs" \
    > "$WORK/logs/$method.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || echo "run pid $p exit $?"; done
echo "fashion_mnist runs: $(( $(date +%s) - t0 )) s"
tail -n 2 "$WORK"/logs/*.log
fi

tar czf "$OUT/runs.tgz" --exclude=checkpoints --exclude=epoch_runs -C "$WORK" \
  $(cd "$WORK" && ls -d runs logs perf 2>/dev/null)
date -u
