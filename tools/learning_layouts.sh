#!/usr/bin/env bash
# The demo's learning in other precisions and layouts (docs/learning.md): a demo config in bf16,
# at TP=2 and at DP=2 (same global batch), each followed by its learning report
# (tools/demo_report.py --check; the script exits 1 after the last run if any run's checks failed).
# Usage: tools/learning_layouts.sh [out_dir] [config] [layout...]
#   out_dir  default runs/
#   config   configs/demo.yaml (default: runs named learning-<layout>) or configs/demo_fewshot.yaml
#            (in-context learning too: runs named learning-fewshot-<layout>)
#   layout   bf16, tp2, dp2 (default: all three)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs}
CONFIG=${2:-configs/demo.yaml}
shift $(( $# > 2 ? 2 : $# ))
LAYOUTS=("$@")
[ ${#LAYOUTS[@]} -gt 0 ] || LAYOUTS=(bf16 tp2 dp2)
[ -f "$CONFIG" ] || { echo "no such config: $CONFIG" >&2; exit 2; }
case "$(basename "$CONFIG")" in
  demo.yaml) PREFIX=learning ;;
  demo_fewshot.yaml) PREFIX=learning-fewshot ;;
  *) PREFIX=learning-$(basename "$CONFIG" .yaml) ;;
esac
BIN=${BIN:-.venv/bin}
export PATH="$PWD/$BIN:$PATH"
run() {  # name, processes, overrides...
  local name=$PREFIX-$1 n=$2; shift 2
  local sets=()
  for s in "$@" "tracking.run_dir=$OUT/$name"; do sets+=(--set "$s"); done
  rm -rf "${OUT:?}/$name"
  local t0=$SECONDS
  deepspeed --num_gpus "$n" --master_port 29661 flamingo_dist/train.py --deepspeed ds_configs/zero2.json \
    --config "$CONFIG" "${sets[@]}" > "$OUT/$name.log" 2>&1
  echo "== $name: $((SECONDS - t0)) s"
  python tools/demo_report.py "$OUT/$name" --check || FAILED+=("$name")
}
FAILED=()
mkdir -p "$OUT"
for layout in "${LAYOUTS[@]}"; do
  case $layout in
    bf16) run bf16 1 train.precision=bf16 ;;
    tp2) run tp2 2 parallel.tensor_parallel_size=2 ;;
    # the same global batch: half the micro-batch on each of 2 ranks
    dp2) run dp2 2 "train.micro_batch_size=$(python -c 'import sys
from flamingo_dist.config.load import load_config
print(load_config(sys.argv[1]).train.micro_batch_size // 2)' "$CONFIG")" ;;
    *) echo "unknown layout $layout (bf16, tp2, dp2)" >&2; exit 2 ;;
  esac
done
if [ ${#FAILED[@]} -gt 0 ]; then echo "checks failed: ${FAILED[*]}" >&2; exit 1; fi
