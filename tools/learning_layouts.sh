#!/usr/bin/env bash
# The demo's learning in other precisions and layouts (docs/learning.md): the demo config
# (configs/demo.yaml) in bf16, at TP=2 and at DP=2 (same global batch of 8 sequences), each
# followed by its learning report. Usage: tools/learning_layouts.sh [out_dir] (default runs/).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs}
BIN=${BIN:-.venv/bin}
export PATH="$PWD/$BIN:$PATH"
run() {  # name, processes, overrides...
  local name=$1 n=$2; shift 2
  local sets=()
  for s in "$@" "tracking.run_dir=$OUT/learning-$name"; do sets+=(--set "$s"); done
  rm -rf "$OUT/learning-$name"
  local t0=$SECONDS
  deepspeed --num_gpus "$n" --master_port 29661 flamingo_dist/train.py --deepspeed ds_configs/zero2.json \
    --config configs/demo.yaml "${sets[@]}" > "$OUT/learning-$name.log" 2>&1
  echo "== $name: $((SECONDS - t0)) s"
  python tools/demo_report.py "$OUT/learning-$name"
}
mkdir -p "$OUT"
run bf16 1 train.precision=bf16
run tp2 2 parallel.tensor_parallel_size=2
run dp2 2 train.micro_batch_size=4
