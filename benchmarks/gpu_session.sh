#!/usr/bin/env bash
# One prepared accelerator session (issue #5), sized for a 15-minute device lease:
#   1. the performance report (benchmarks/perf_report.py: solver vs dense DDN, head step
#      ratios on the paper's ResNet18, CIFAR-stem bf16 throughput, a timed FashionMNIST epoch),
#      on a quiet GPU;
#   2. FashionMNIST with the paper's recipe (ResNet18 ImageNet stem, AGD gain 10, batch 256,
#      tau 5, stratified batches for implicit), 3 methods x 3 seeds, EPOCHS epochs: one process
#      per method running its seeds in turn (so each compiles once), the three side by side
#      on the one GPU (each run is launch-bound at this image size). Nine processes at once
#      were tried first and spent minutes in concurrent compilation and autotuning.
# SOLVER_ARGS, STEP_ARGS, EPOCH_ARGS replace the three benchmarks' arguments (a CPU dry run:
#   SOLVER_ARGS="--sizes 16x4 --variants polar-ns" STEP_ARGS=--quick EPOCH_ARGS="--source synthetic
#   --num-examples 256 --model mlp" bash benchmarks/gpu_session.sh).
# SKIP_PERF=1 skips part 1; part 2 runs only with RUNS=1 (the 20-epoch runs exist from the first
# lease, and a full 200-epoch sweep does not fit one lease: the owed GPU numbers come first).
# Everything lands in $OUT (default ./gpu_out) as report.md, session.log and runs.tgz.
#
# Usage (repository root; FashionMNIST IDX files in $DATA):
#   DATA=/usr/share/datasets/fashion-mnist EPOCHS=30 bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-gpu_out}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
EPOCHS=${EPOCHS:-20}
PERF_TIMEOUT=${PERF_TIMEOUT:-520}
PART_TIMEOUT=${PART_TIMEOUT:-170}
RUNS=${RUNS:-0}
RUNS_TIMEOUT=${RUNS_TIMEOUT:-270}
WORK=${WORK:-/tmp/nc_jax_gpu}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK/logs"
exec > >(tee "$OUT/session.log") 2>&1

date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import jax, flax, optax, sys; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"

# 1. Performance report on a quiet GPU.
t0=$(date +%s)
# Sized from the 2026-11-27 lease: GPU compilation of every solver variant at every size took
# longer than 150 s, so only the default, the fastest GPU factorisation measured so far (qdwh),
# the matmul-only one (newton_schulz: no cuSOLVER call, never timed on a GPU yet) and the dense
# DDN; the step section adds the matmul-only implicit head ("implicit" itself now runs the
# default factorisation "auto" = qdwh on GPUs; the svd head was measured in the first lease).
[ "${SKIP_PERF:-0}" = 1 ] || timeout "$PERF_TIMEOUT" python3 -m benchmarks.perf_report \
  --out "$WORK/perf" --timeout "$PART_TIMEOUT" \
  --solver-args="${SOLVER_ARGS:---sizes 512x10,512x100,2048x1000 --variants polar-svd,polar-qdwh,polar-ns,dense-ddn}" \
  --step-args="${STEP_ARGS:---batches 256 --classes 10,100 --sections heads,throughput --heads standard,fixed,implicit,implicit-fo,implicit-ns}" \
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
