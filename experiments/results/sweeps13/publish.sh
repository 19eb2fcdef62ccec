#!/usr/bin/env bash
# Copies every finished run (it has done.json) under runs/sweeps13/ into
# experiments/results/sweeps13/, keeping its relative path: the records only (config.json,
# metrics.jsonl, margins.npy, done.json, reference_etf.npz), not checkpoints or figures.
# Unfinished runs stay where they are; `sweep.sh` resumes them.
set -euo pipefail
src=runs/sweeps13
dst=experiments/results/sweeps13
find "$src" -name done.json | sort | while read -r done; do
  run=$(dirname "$done")
  rel=${run#"$src"/}
  mkdir -p "$dst/$rel"
  for f in config.json metrics.jsonl margins.npy done.json reference_etf.npz; do
    if [ -f "$run/$f" ]; then cp "$run/$f" "$dst/$rel/$f"; fi
  done
done
echo "finished runs in $dst: $(find "$dst" -name done.json | wc -l)"
